"""Writing files so that an interrupted run never leaves a half-written one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; shared archives need the umask's mode
        os.replace(tmp_path, path)
    except OSError as exc:
        full = disk_full_errno(exc)
        if full is None:
            raise
        # Name the file being written: the writer's own error (pyarrow's, a temp name) may not.
        raise OSError(full, os.strerror(full), str(path)) from exc
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def disk_full_errno(exc: BaseException) -> int | None:
    """ENOSPC or EDQUOT when ``exc`` says the disk is full (pyarrow says so only in its message), else None."""
    if not isinstance(exc, OSError):
        return None
    if exc.errno in _DISK_FULL:
        return exc.errno
    text = str(exc)
    return next((code for code in _DISK_FULL if os.strerror(code) in text), None)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a private staging folder beside ``path``; on success make it readable as the umask
    allows and swap it onto ``path`` (an existing folder is moved aside, then removed). On failure
    the staging folder is removed and ``path`` is left as it was."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
        mask = _umask()
        for item in [staging, *staging.rglob("*")]:  # mkdtemp/mkstemp make 0700/0600
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


_SAFE_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_NAME_BYTES = 200  # leaves room under the usual 255-byte limit for suffixes and temporary names


def safe_filename(identifier, max_bytes: int = MAX_NAME_BYTES) -> str:
    """A file name for any id: bounded in bytes and injective.

    An id made only of ``[A-Za-z0-9._-]``, not starting with a dot and short enough, is its own
    name. Any other id has its other characters replaced by ``_``, is cut to fit, and gets
    ``-`` plus the first 16 hex digits of its sha256, so two ids never share a name.
    """
    import hashlib

    text = str(identifier)
    cleaned = "".join(c if c in _SAFE_CHARACTERS else "_" for c in text)
    if cleaned == text and text and not text.startswith(".") and len(text.encode()) <= max_bytes:
        return text
    suffix = "-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    head = cleaned.lstrip(".")[: max(0, max_bytes - len(suffix))]
    return head + suffix


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in blocks so a large checkpoint never sits in memory whole."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def read_format_json(path: str | os.PathLike, fmt: str, what: str, damaged: str) -> dict:
    """A JSON object whose ``format`` field is ``fmt`` (an orthodiff ``what``); a file that is not
    JSON, or another format, is one line (``damaged`` says what to do). Versions are the caller's."""
    from .errors import OrthodiffError

    try:
        data = read_json(path)
    except ValueError as exc:
        raise OrthodiffError(f"{path}: not valid JSON ({exc}); {damaged}") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found != fmt:
        raise OrthodiffError(f"{path}: not an orthodiff {what} (format {found!r})")
    return data


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_table(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as Parquet or CSV, chosen by the suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)


def read_table(path: str | os.PathLike):
    import pandas as pd

    path = Path(path)
    if not path.exists():
        from .errors import OrthodiffError

        raise OrthodiffError(f"{path}: file not found; create it first (see `orthodiff --help`)")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def npy_is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a readable .npy file as long as its header says (a truncated one is not)."""
    import numpy as np

    try:
        with open(path, "rb") as handle:
            major, _ = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(handle)
            expected = handle.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return os.path.getsize(path) == expected
    except (OSError, ValueError):
        return False
