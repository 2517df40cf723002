"""A quick identity of a series' source file or folder: size, modification time and a content hash.

Prepared plane tensors record the stamp of the files they were made from; a rerun of
``prepare`` compares it and prepares again any series whose source was replaced. The hash
covers the first and last MiB of each file and its size, so it is fast on large archives yet
notices a file replaced by another of the same size and time stamp.
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
        digest.update(f"{file.name}\0{stat.st_size}\0".encode("utf-8", "surrogateescape"))
        _hash_edges(file, stat.st_size, digest)
    return {"bytes": total, "mtime_ns": newest, "sha256": digest.hexdigest()}


def _hash_edges(file: Path, size: int, digest) -> None:
    with open(file, "rb") as handle:
        digest.update(handle.read(EDGE_BYTES))
        if size > 2 * EDGE_BYTES:
            handle.seek(size - EDGE_BYTES)
        digest.update(handle.read(EDGE_BYTES))
