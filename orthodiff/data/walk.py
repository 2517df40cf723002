"""Walking an archive: every folder once, symlinked folders followed, nothing dropped in silence.

``os.walk`` skips symlinked folders and folders it cannot enter without a word; here each of
them is either walked or reported. A symlinked folder is followed once: the real tree is walked
first, then links whose target was not walked yet, so a link to a folder already scanned (or to
one of its own parents) is reported instead of counted twice or looped on.

Hidden entries (names starting with '.') are skipped: they are the system's (.DS_Store, .Trash,
the ._ files macOS leaves beside every file). One that holds a readable scan is reported, so a
series is never dropped unseen; it is scanned once renamed without the dot.

Sharding: the units of an archive are its top-level entries (patient or exam folders). Shard
``I/N`` walks units I, I+N, I+2N, ... of their sorted list, so every unit (and every study inside
it) lands in exactly one shard. Loose top-level files and hidden entries go to shard 1.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OrthodiffError, ScanError
from ..io.dicom import access_problem, looks_like_dicom
from ..io.volume import ITK_SUFFIXES, NIFTI_SUFFIXES, read_volume_header, suffix_of


def walk_archive(archive: Path, problems: list, shard: tuple[int, int] | None = None):
    """Yield (folder, sorted file names) for every folder under ``archive`` (hidden ones skipped).

    Problems (folders that cannot be entered, broken links, links to folders walked already,
    hidden entries that hold a scan) are appended to ``problems`` as (path, reason).
    """
    archive = Path(archive)
    visited = {_identity(archive)}
    links: list[Path] = []
    units = _shard_units(archive, problems, shard)
    yield from _walk(archive, archive, problems, visited, links, units)
    while links:
        link = links.pop(0)
        try:
            identity = _identity(link)
        except OSError as exc:
            problems.append((link, f"{_rel(link, archive)}: symbolic link cannot be followed: {access_problem(exc)}"))
            continue
        if identity in visited:
            problems.append(
                (link, f"{_rel(link, archive)}: symbolic link to a folder scanned already (or to its own parent); "
                 "skipped so nothing is counted twice, nothing to do")
            )
            continue
        visited.add(identity)
        yield from _walk(link, archive, problems, visited, links, None)


def _walk(folder: Path, archive: Path, problems, visited: set, links: list, units):
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as exc:
        problems.append((folder, f"{_rel(folder, archive)}: folder cannot be entered: {access_problem(exc)}"))
        return
    files, subfolders = [], []
    for entry in entries:
        if units is not None and entry.name not in units:
            continue  # another shard's unit
        path = Path(entry.path)
        if entry.name.startswith("."):
            _report_hidden_scan(path, archive, problems)
            continue
        try:
            is_link = entry.is_symlink()
            is_dir = entry.is_dir()  # follows links
            exists = is_dir or entry.is_file() or not is_link or os.path.exists(path)
        except OSError as exc:
            problems.append((path, f"{_rel(path, archive)}: {access_problem(exc)}"))
            continue
        if is_link and not exists:
            problems.append((path, f"{_rel(path, archive)}: broken symbolic link (its target is missing); fix or remove it"))
        elif is_dir and is_link:
            links.append(path)
        elif is_dir:
            subfolders.append(path)
        else:
            files.append(entry.name)
    yield folder, files
    for subfolder in subfolders:
        try:
            visited.add(_identity(subfolder))
        except OSError as exc:
            problems.append((subfolder, f"{_rel(subfolder, archive)}: folder cannot be entered: {access_problem(exc)}"))
            continue
        yield from _walk(subfolder, archive, problems, visited, links, None)


def _shard_units(archive: Path, problems, shard: tuple[int, int] | None) -> set | None:
    """Names of the top-level entries shard (I, N) walks (None: all). Loose top-level files go to shard 1."""
    if shard is None or shard[1] == 1:
        return None
    index, count = shard
    try:
        entries = sorted(entry.name for entry in os.scandir(archive))
    except OSError as exc:
        raise OrthodiffError(f"{archive}: archive folder cannot be read: {access_problem(exc)}") from exc
    folders = [name for name in entries if not name.startswith(".") and (archive / name).is_dir()]
    mine = {name for rank, name in enumerate(folders) if rank % count == index - 1}
    if index == 1:
        mine |= {name for name in entries if name not in folders}
    return mine


def _report_hidden_scan(path: Path, archive: Path, problems) -> None:
    """Name a hidden file or folder that holds a readable scan; hidden system files stay silent."""
    found = _first_scan(path)
    if found is None:
        return
    what = "hidden folder" if found != path else "hidden file"
    example = f" ({_rel(found, archive)})" if found != path else ""
    problems.append(
        (path, f"{_rel(path, archive)}: {what} holds a readable scan{example} but was skipped because its name "
         "starts with '.'; rename it without the dot to scan it, or delete it")
    )


def _first_scan(path: Path) -> Path | None:
    """``path`` itself when it is a readable scan file, else the first one inside it (a folder), else None."""
    if not path.is_dir():
        return path if _is_scan_file(path) else None
    for folder, subfolders, files in os.walk(path):
        subfolders.sort()
        for name in sorted(files):
            if _is_scan_file(Path(folder) / name):
                return Path(folder) / name
    return None


def _is_scan_file(path: Path) -> bool:
    """Whether the file reads as NIfTI, NRRD/MHA, .npy or DICOM (the macOS ._ copies do not)."""
    suffix = suffix_of(path.name)
    try:
        if suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
            read_volume_header(path)
            return True
        if suffix == ".npy":
            with open(path, "rb") as handle:
                return handle.read(6) == b"\x93NUMPY"
        return looks_like_dicom(path)
    except (ScanError, OSError):
        return False


def units_fingerprint(archive: Path) -> str:
    """sha256 of the sorted names of the archive's top-level folders, which decide every shard's
    share: shards scanned before and after a folder was added (or from another archive at the
    same path) differ in it."""
    import hashlib

    try:
        names = sorted(entry.name for entry in os.scandir(archive) if not entry.name.startswith(".") and entry.is_dir())
    except OSError as exc:
        raise OrthodiffError(f"{archive}: archive folder cannot be read: {access_problem(exc)}") from exc
    return hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()


def _identity(path: Path) -> tuple:
    stat = os.stat(path)  # follows links: the real folder
    return (stat.st_dev, stat.st_ino)


def _rel(path: Path, archive: Path) -> str:
    try:
        return Path(path).relative_to(archive).as_posix() or "."
    except ValueError:
        return str(path)
