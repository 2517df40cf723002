"""A volume with its geometry, and readers for the file formats that hold one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ScanError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Volume:
    """Voxels in storage order (i, j, k) and the affine that maps voxel indices to RAS millimetres.

    The third voxel axis runs across slices, as dcm2niix writes NIfTI; ``plane_from_affine``
    reads the plane from it.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def suffix_of(path: str | Path) -> str:
    name = str(path).lower()
    for suffix in NIFTI_SUFFIXES + ITK_SUFFIXES + (".npy",):
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def read_volume(path: str | Path, dtype=np.float32) -> Volume:
    """Read a NIfTI, NRRD or MetaImage file; raise ScanError naming the file on failure."""
    path = Path(path)
    suffix = suffix_of(path)
    try:
        if suffix in NIFTI_SUFFIXES:
            volume = _read_nifti(path, dtype)
        elif suffix in ITK_SUFFIXES:
            volume = _read_itk(path, dtype)
        else:
            raise ScanError(f"{path}: unsupported file type {suffix!r}; use NIfTI, NRRD, MHA or a DICOM folder")
    except ScanError:
        raise
    except Exception as exc:  # the readers raise many types for a broken file
        raise ScanError(f"{path}: cannot be read ({type(exc).__name__}: {exc}); the file is corrupt or truncated") from exc
    return volume


def _read_nifti(path: Path, dtype) -> Volume:
    import nibabel as nib

    image = nib.load(str(path))
    array = np.asarray(image.dataobj, dtype=dtype)
    return Volume(array=array, affine=np.asarray(image.affine, float))


def _read_itk(path: Path, dtype) -> Volume:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    # SimpleITK returns (k, j, i) arrays and LPS geometry; convert to (i, j, k) and RAS.
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(dtype, copy=False)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), float)
    origin = np.asarray(image.GetOrigin(), float)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(spacing)
    affine[:3, 3] = lps_to_ras @ origin
    return Volume(array=array, affine=affine)
