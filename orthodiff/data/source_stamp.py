"""The identity of a series' source file or folder: size, modification time and a content hash.

Prepared plane tensors record the stamp of the files they were made from; a rerun of
``prepare`` compares it and prepares again any series whose source changed. The hash covers
every byte of every file (for a folder, a DICOM series, each file's name and content), because
a file rewritten in place with its size and time stamp restored shows no other sign of the
change. Reading the bytes is cheap next to decoding them: the real 192-file DICOM series
(25 MB) hashes in about 22 ms, where reading one echo of it as a volume takes about 115 ms.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..fileio import sha256_file

# The stamp's layout; a record stamped under another one cannot be compared and is prepared again.
SCHEME = "sha256-content-v2"


def source_stamp(path) -> dict:
    """``{"bytes", "mtime_ns", "sha256", "scheme"}`` of a file, or of the files directly inside a
    folder (a DICOM series folder); OSError when it cannot be read."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    total, newest = 0, 0
    for file in files:
        stat = file.stat()
        total += stat.st_size
        newest = max(newest, stat.st_mtime_ns)
        digest.update(f"{file.name}\0{stat.st_size}\0".encode("utf-8", "surrogateescape"))
        digest.update(sha256_file(file).encode())
    return {"bytes": total, "mtime_ns": newest, "sha256": digest.hexdigest(), "scheme": SCHEME}


def comparable(stamp) -> bool:
    """Whether a recorded stamp was made the way ``source_stamp`` makes one now."""
    return isinstance(stamp, dict) and stamp.get("scheme") == SCHEME

