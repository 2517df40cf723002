"""MRNet exams: one ``(slices, 256, 256)`` uint8 ``.npy`` per plane, no geometry in the file.

The plane comes from the folder name (``train/sagittal/0000.npy``). The affine given here is a
plausible one for that plane (0.625 mm pixels, 3 mm slices, standard radiological orientation),
so ``plane_from_affine`` returns the plane and every later stage can treat MRNet like any scan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ScanError
from ..planes import check_plane
from .volume import Volume

SPLITS = ("train", "valid")
LABELS = ("abnormal", "acl", "meniscus")
PIXEL_MM = 0.625
SLICE_MM = 3.0

# RAS directions of voxel axes i (across columns), j (down rows) and k (across slices), per plane.
_DIRECTIONS = {
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)),  # columns anterior, rows inferior
    "coronal": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, -1.0, 0.0)),  # columns to the left, rows inferior
    "axial": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),  # columns to the left, rows posterior
}


def mrnet_affine(plane: str, shape: tuple) -> np.ndarray:
    """Voxel->RAS affine for an (i, j, k) = (256, 256, slices) MRNet volume, centred on the origin."""
    check_plane(plane)
    affine = np.eye(4)
    for axis, (direction, step) in enumerate(zip(_DIRECTIONS[plane], (PIXEL_MM, PIXEL_MM, SLICE_MM))):
        affine[:3, axis] = np.asarray(direction) * step
    centre = (np.asarray(shape[:3], float) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def mrnet_shape(path: str | Path) -> tuple:
    """(slices, rows, cols) from the .npy header only; ScanError for a damaged or 2D file."""
    path = Path(path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise ScanError(f"{path.name}: MRNet .npy cannot be read ({type(exc).__name__}: {exc}); the file is corrupt or truncated") from exc
    if array.ndim != 3:
        raise ScanError(f"{path.name}: MRNet arrays are (slices, rows, cols); this one has shape {array.shape}, remove it")
    return tuple(int(n) for n in array.shape)


def read_mrnet(path: str | Path, plane: str) -> Volume:
    """Read an MRNet exam as a Volume: array (i, j, k) = (cols, rows, slices) with a plane affine."""
    path = Path(path)
    mrnet_shape(path)
    try:
        stored = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ScanError(f"{path.name}: MRNet .npy cannot be read ({type(exc).__name__}: {exc}); the file is corrupt or truncated") from exc
    array = np.ascontiguousarray(stored.transpose(2, 1, 0)).astype(np.float32)
    return Volume(array=array, affine=mrnet_affine(plane, array.shape), meta={"plane": plane})
