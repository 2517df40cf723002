"""Planes from geometry: the slice normal's dominant patient axis names the plane."""

from __future__ import annotations

import numpy as np

PLANES = ("sagittal", "coronal", "axial")

# RAS patient axes: x runs left-right, y posterior-anterior, z inferior-superior.
_PLANE_OF_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}


def check_plane(plane: str, field: str = "plane") -> str:
    from .errors import OrthodiffError

    if plane not in PLANES:
        raise OrthodiffError(f"{field}={plane!r} is not a plane; use one of {', '.join(PLANES)}")
    return plane


def slice_normal(row_cosine, column_cosine) -> np.ndarray:
    """Unit normal of the slice plane: the cross product of the two in-plane direction cosines."""
    normal = np.cross(np.asarray(row_cosine, float), np.asarray(column_cosine, float))
    length = np.linalg.norm(normal)
    if length < 1e-6:
        raise ValueError("in-plane direction cosines are parallel; the geometry is degenerate")
    return normal / length


def plane_from_normal(normal) -> str:
    """Sagittal when the normal points mostly L-R, coronal when A-P, axial when S-I."""
    normal = np.asarray(normal, float)
    return _PLANE_OF_AXIS[int(np.argmax(np.abs(normal)))]


def plane_from_affine(affine, slice_axis: int = 2) -> str:
    """Plane of a volume whose voxel axis ``slice_axis`` runs across slices (NIfTI: the third)."""
    affine = np.asarray(affine, float)
    in_plane = [axis for axis in range(3) if axis != slice_axis]
    return plane_from_normal(slice_normal(affine[:3, in_plane[0]], affine[:3, in_plane[1]]))
