"""A volume with its geometry, and readers for the file formats that hold one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ScanError
from .access import access_problem

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
        raise ScanError(f"{path}: {_unreadable(path, exc, 'cannot be read')}") from exc
    return volume


def _unreadable(path: Path, exc: Exception, what: str) -> str:
    """The real reason a reader failed: no permission, a vanished file, else damage."""
    if isinstance(exc, OSError) and not isinstance(exc, EOFError):
        problem = exc
    else:
        problem = None  # SimpleITK and nibabel wrap I/O errors: open the file to tell them apart
        try:
            with open(path, "rb") as handle:
                handle.read(1)
        except OSError as error:
            problem = error
    if problem is not None and (isinstance(problem, (PermissionError, FileNotFoundError)) or problem.errno is not None):
        return access_problem(problem)
    return f"{what} ({type(exc).__name__}: {exc}); the file is corrupt or truncated"


def _read_nifti(path: Path, dtype) -> Volume:
    import nibabel as nib

    image = nib.load(str(path))
    _check_nifti_pixdim(path, image)
    array = np.asarray(image.dataobj, dtype=dtype)
    return Volume(array=array, affine=np.asarray(image.affine, float))


def _read_itk(path: Path, dtype) -> Volume:
    import SimpleITK as sitk

    _itk_header(path)  # the full read turns a negative spacing into a flipped direction: refuse it first
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


@dataclass
class VolumeHeader:
    """Shape and voxel->RAS affine of an image file, read without its voxels."""

    shape: tuple
    affine: np.ndarray


def read_volume_header(path: str | Path) -> VolumeHeader:
    """Header of a NIfTI, NRRD or MetaImage file; ScanError for a corrupt or truncated file.

    Truncation is checked without decoding: an uncompressed NIfTI must be as long as its header
    says; a gzipped one must record that uncompressed length in its gzip trailer (when it does
    not, the data is decompressed once to tell extra bytes from a truncated file).
    """
    path = Path(path)
    suffix = suffix_of(path)
    try:
        if suffix in NIFTI_SUFFIXES:
            header = _nifti_header(path)
        elif suffix in ITK_SUFFIXES:
            header = _itk_header(path)
        else:
            raise ScanError(f"{path}: unsupported file type {suffix!r}; use NIfTI, NRRD, MHA or a DICOM folder")
    except ScanError:
        raise
    except Exception as exc:
        raise ScanError(f"{path}: {_unreadable(path, exc, 'header cannot be read')}") from exc
    return header


def _nifti_header(path: Path) -> VolumeHeader:
    import nibabel as nib

    image = nib.load(str(path))
    _check_nifti_pixdim(path, image)
    shape = tuple(int(n) for n in image.shape)
    # The array proxy knows where the voxels start (the header's vox_offset may read 0).
    offset = int(getattr(image.dataobj, "offset", image.header["vox_offset"]))
    data_end = offset + int(np.prod(shape)) * image.get_data_dtype().itemsize
    if str(path).lower().endswith(".gz"):
        if _gzip_length(path) != data_end % 2**32:
            try:
                np.asarray(image.dataobj)
            except Exception as exc:
                raise ScanError(f"{path}: gzipped NIfTI is truncated or corrupt ({type(exc).__name__}); copy the file again") from exc
    elif path.stat().st_size < data_end:
        raise ScanError(
            f"{path}: NIfTI is truncated ({path.stat().st_size} of {data_end} bytes); copy the file again"
        )
    return VolumeHeader(shape=shape, affine=np.asarray(image.affine, float))


def _check_nifti_pixdim(path: Path, image) -> None:
    """Refuse voxel sizes (pixdim) that are not positive finite mm. nibabel quietly takes their
    absolute value (0 becomes 1) and ITK reads such a file mirrored, so the header as written
    is read before nibabel's fixes."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as handle:
        written = type(image.header).from_fileobj(handle, check=False)
    spatial = min(len(image.shape), 3)
    _check_spacing(path, "NIfTI pixdim", np.asarray(written["pixdim"][1 : 1 + spatial], float))


def _check_spacing(path: Path, what: str, spacing) -> None:
    if not all(np.isfinite(value) and value > 0 for value in spacing):
        shown = " ".join(f"{float(value):g}" for value in spacing)
        raise ScanError(
            f"{path}: {what} ({shown}) is not a positive voxel size in mm; read as it is, the image would be "
            "mirrored or flat: fix the header or convert the scan again"
        )


def _gzip_length(path: Path) -> int:
    """Uncompressed length modulo 2**32 that a gzip stream records in its last four bytes."""
    with open(path, "rb") as handle:
        handle.seek(-4, 2)
        return int.from_bytes(handle.read(4), "little")


def _itk_header(path: Path) -> VolumeHeader:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetNumberOfComponents() != 1:
        raise ScanError(f"{path}: has {reader.GetNumberOfComponents()} components per voxel; store one scalar image per file")
    dimension = reader.GetDimension()
    size = tuple(int(n) for n in reader.GetSize())
    _check_spacing(path, "spacing", reader.GetSpacing()[: min(dimension, 3)])
    spacing = np.ones(3)
    origin = np.zeros(3)
    direction = np.eye(3)
    n = min(dimension, 3)
    spacing[:n] = reader.GetSpacing()[:n]
    origin[:n] = reader.GetOrigin()[:n]
    direction[:n, :n] = np.asarray(reader.GetDirection(), float).reshape(dimension, dimension)[:n, :n]
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(spacing)
    affine[:3, 3] = lps_to_ras @ origin
    return VolumeHeader(shape=size, affine=affine)
