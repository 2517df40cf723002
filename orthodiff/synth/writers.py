"""Writing a rendered study as files a scanner export would hold: NIfTI or DICOM, plus segmentations."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..fileio import atomic_path
from .acquisition import LPS_FROM_RAS, SeriesGeometry
from .population import StudySpec
from .study import RenderedSeries

_UID_ROOT = "1.2.826.0.1.3680043.10.1401."  # a fixed prefix; the rest is a hash, so UIDs are reproducible
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def deterministic_uid(*parts) -> str:
    digest = int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:28], 16)
    return (_UID_ROOT + str(digest))[:64]


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """A NIfTI with the affine in both sform and qform (code 1: scanner coordinates)."""
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def write_dicom_series(folder: Path, series: RenderedSeries, spec: StudySpec, plane: str, series_number: int, seed: int) -> None:
    """One file per slice with the geometry tags a reader needs (LPS, as DICOM defines them)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    g: SeriesGeometry = series.geometry
    row_lps, col_lps, normal_lps = (LPS_FROM_RAS @ v for v in (g.row_dir, g.col_dir, g.normal))
    origin_lps = LPS_FROM_RAS @ g.origin
    study_uid = deterministic_uid(seed, spec.study_id, "study")
    series_uid = deterministic_uid(seed, spec.study_id, plane)
    frame_uid = deterministic_uid(seed, spec.study_id, "frame")
    study_date = f"{2019 + spec.index % 6}{1 + spec.index % 12:02d}{1 + spec.index % 28:02d}"
    image = np.clip(series.image, 0, None).astype(np.uint16)
    for k in range(g.slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = deterministic_uid(seed, spec.study_id, plane, k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Manufacturer = "MR", "orthodiff-synth"
        ds.PatientID, ds.PatientName = spec.patient_id, spec.patient_id
        ds.PatientSex, ds.PatientAge = spec.sex, f"{spec.age:03d}Y"
        ds.PatientSize, ds.PatientWeight = round(spec.height / 100.0, 3), spec.weight
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyID, ds.StudyDate, ds.SeriesDate = spec.study_id[:16], study_date, study_date
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.SeriesDescription = plane
        ds.BodyPartExamined = spec.joint.upper()
        ds.InstitutionName = spec.site
        ds.MagneticFieldStrength = spec.field_strength
        ds.EchoTime, ds.RepetitionTime = series.echo_time_ms, 3000.0
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "SK", "2D"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.EchoNumbers, ds.AcquisitionNumber = 1, 1
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_lps, *col_lps)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin_lps + k * g.spacing_mm * normal_lps]
        ds.SliceLocation = round(float(np.dot(origin_lps + k * g.spacing_mm * normal_lps, normal_lps)), 4)
        ds.PixelSpacing = [round(g.pixel_mm, 6), round(g.pixel_mm, 6)]  # row spacing, column spacing
        ds.SliceThickness, ds.SpacingBetweenSlices = g.slice_mm, g.spacing_mm
        ds.Rows, ds.Columns = g.rows, g.cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        # NIfTI voxel (column i, row j) -> DICOM pixel (row j, column i).
        ds.PixelData = np.ascontiguousarray(image[:, :, k].T).tobytes()
        with atomic_path(folder / f"IM{k + 1:04d}.dcm") as tmp:
            ds.save_as(str(tmp), enforce_file_format=True)


def write_study(out: Path, spec: StudySpec, series: dict[str, RenderedSeries], fmt: str, seed: int) -> list[Path]:
    """Write every series of one study under OUT/<patient>/<study>/; return the written paths."""
    folder = out / spec.patient_id / spec.study_id
    written = []
    for number, (plane, item) in enumerate(series.items(), start=1):
        affine = item.geometry.affine
        if fmt == "nifti":
            write_nifti(folder / f"{plane}.nii.gz", item.image, affine)
            written.append(folder / f"{plane}.nii.gz")
        else:
            write_dicom_series(folder / plane, item, spec, plane, number, seed)
            written.append(folder / plane)
        write_nifti(folder / f"{plane}_seg.nii.gz", item.seg, affine)
    return written
