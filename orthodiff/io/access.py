"""Why a file or folder of an archive cannot be opened, in words a user can act on; shared by the
DICOM and the NIfTI/NRRD readers and the archive walk."""

from __future__ import annotations

import errno


def access_problem(exc: OSError) -> str:
    """The real reason a file or folder cannot be opened, and what to do, for one errors line."""
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; give the scanning account read access (chmod/chown) or remove it"
    if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOENT:
        return "file vanished during the scan (deleted or moved); scan again once the archive is stable"
    return f"cannot be read ({exc.strerror or type(exc).__name__}); check the disk or network share"


__all__ = ["access_problem"]
