"""A predicted segmentation as a DICOM Segmentation object (highdicom) that references its source
DICOM series, so 3D Slicer, OHIF and a PACS show it aligned on the images it was predicted from.

One frame per source slice and segment (empty frames omitted), on the source slices' own
positions and orientation; one segment per class but the background (label 0), labelled with
the class name. Only for series read from DICOM: a NIfTI or NRRD input has no images to refer to.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import OrthodiffError
from ..fileio import atomic_path

ALGORITHM = "orthodiff"
SERIES_NUMBER = 9901  # high, so viewers list the derived series after the acquired ones
TYPE2_INHERITED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                   "ReferringPhysicianName", "AccessionNumber", "StudyID")


def source_datasets(row: dict) -> list:
    """The DICOM headers of a manifest row's volume, in the volume's slice order (k = 0, 1, ...)."""
    import pydicom

    from ..io.dicom import index_dicom_folder

    volumes, _ = index_dicom_folder(row["path"])
    uid = str(row.get("series_uid") or "")
    echo = row.get("echo_index")
    echo = -1 if echo is None or (isinstance(echo, float) and np.isnan(echo)) else int(echo)
    matches = [v for v in volumes if (not uid or v.series_uid == uid) and (echo < 0 or v.echo_index == echo)]
    if len(matches) != 1:
        raise OrthodiffError(f"{row['path']}: cannot find the source slices of series {row['series_id']} again")
    headers = [pydicom.dcmread(str(path), stop_before_pixels=True) for path in matches[0].files]
    for header in headers:  # a SEG copies these patient/study attributes (type 2: may be empty)
        for keyword in TYPE2_INHERITED:
            if keyword not in header:
                setattr(header, keyword, "")
    return headers


def write_dicom_seg(path: Path, labels: np.ndarray, classes: list[str], sources: list) -> Path:
    """Write ``labels`` (i = columns, j = rows, k = slices, on the source grid; values are class
    indices) as a DICOM SEG referencing ``sources`` (one header per slice k)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__

    labels = np.asarray(labels)
    if labels.shape[2] != len(sources):
        raise OrthodiffError(f"{path}: {labels.shape[2]} segmentation slices for {len(sources)} source images")
    frames = np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8)  # (slices, rows, cols)
    algorithm = hd.AlgorithmIdentificationSequence(name=ALGORITHM, version=__version__,
                                                   family=codes.DCM.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(name),
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in enumerate(classes[1:], start=1)
    ]
    with warnings.catch_warnings():  # archives' one-part patient names ("P0001") are copied as they are
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        seg = _segmentation(hd, sources, frames, segments, __version__)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    return path


def _segmentation(hd, sources, frames, segments, version):
    from pydicom.uid import generate_uid

    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=ALGORITHM,
        manufacturer_model_name=ALGORITHM,
        software_versions=version,
        device_serial_number="0",
        series_description=f"{ALGORITHM} segmentation"[:64],
        omit_empty_frames=bool(frames.any()),  # a SEG needs at least one frame
    )
