"""A quick identity of a series' source file or folder: size, modification time and a content hash.

Prepared plane tensors record the stamp of the files they were made from; a rerun of
``prepare`` compares it and prepares again any series whose source was replaced. For a file the
hash covers its size and its first and last MiB, so it is fast on large archives yet notices a
file replaced by another of the same size and time stamp. For a folder (a DICOM series: hundreds
of small files) it covers every file's name, size and modification time, the first MiB of the
first file and the last MiB of the last, so checking an unchanged series stays cheap.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

EDGE_BYTES = 1 << 20


def source_stamp(path) -> dict:
    """``{"bytes", "mtime_ns", "sha256"}`` of a file, or of the files directly inside a folder
    (a DICOM series folder); OSError when it cannot be read."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    total, newest = 0, 0
    for file in files:
        stat = file.stat()
        total += stat.st_size
        newest = max(newest, stat.st_mtime_ns)
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode("utf-8", "surrogateescape"))
    if files:
        _hash_edges(files[0], files[0].stat().st_size, digest, tail=len(files) == 1)
        if len(files) > 1:
            _hash_edges(files[-1], files[-1].stat().st_size, digest, head=False)
    return {"bytes": total, "mtime_ns": newest, "sha256": digest.hexdigest()}


def _hash_edges(file: Path, size: int, digest, head: bool = True, tail: bool = True) -> None:
    """Feed the first and/or last MiB of ``file`` (the whole file when it is small) to ``digest``."""
    with open(file, "rb") as handle:
        if head:
            digest.update(handle.read(EDGE_BYTES))
        if tail:
            handle.seek(max(size - EDGE_BYTES, EDGE_BYTES if head else 0))
            digest.update(handle.read(EDGE_BYTES))
