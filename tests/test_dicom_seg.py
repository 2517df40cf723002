"""``orthodiff predict`` writes each segmentation of a DICOM input as a DICOM Segmentation object
that references its source series: read back with highdicom and pydicom, its frames lie on the
source slices and its segments carry the class names."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pipeline_fixtures import dicom_exams, tiny_pipeline

from orthodiff.pipeline.predict import run_prediction

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory)


def _check_seg_against_source(folder: Path, plane: str, classes: list) -> None:
    import highdicom as hd
    import pydicom

    summary = json.loads((folder / "prediction.json").read_text())
    entry = summary["series"][plane]
    assert entry["segmentation"]["dicom_seg"] == f"segmentation_{plane}.dcm"
    seg_path = folder / entry["segmentation"]["dicom_seg"]

    # pydicom: a SEG of the source study and series, frames on the source slices' geometry
    raw = pydicom.dcmread(seg_path)
    assert raw.Modality == "SEG" and raw.SOPClassUID == SEGMENTATION_STORAGE
    from orthodiff.pipeline.dicom_seg import source_datasets

    nifti = nib.load(folder / entry["segmentation"]["nifti"])
    # each test folder holds one series (all echoes of one for the real one)
    row = {"path": entry["source"], "series_id": entry["series_id"], "series_uid": "",
           "echo_index": _echo_index(entry["series_id"])}
    sources = source_datasets(row)
    assert len(sources) == nifti.shape[2]
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    assert raw.StudyInstanceUID == sources[0].StudyInstanceUID
    assert raw.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    shared = raw.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in sources[0].ImageOrientationPatient], atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in sources[0].PixelSpacing], atol=1e-6)
    assert raw.Rows == sources[0].Rows and raw.Columns == sources[0].Columns
    assert int(raw.NumberOfFrames) >= 1
    for frame in raw.PerFrameFunctionalGroupsSequence:
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert uid in by_uid
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-4)

    # highdicom: segment labels are the class names, and the label map equals the NIfTI's, slice by slice
    seg = hd.seg.segread(seg_path)
    assert [item.SegmentLabel for item in seg.SegmentSequence] == classes[1:]
    uids = [str(s.SOPInstanceUID) for s in sources]
    referenced = {str(uids[2]) for uids in seg.get_source_image_uids()}
    present = [u for u in uids if u in referenced]
    expected = np.asarray(nifti.dataobj).transpose(2, 1, 0)  # (slices, rows, cols) in source order
    if present:
        labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=present, combine_segments=True,
                                                   skip_overlap_checks=True)
        for index, uid in enumerate(present):
            np.testing.assert_array_equal(labels[index], expected[uids.index(uid)])
    missing = [uids.index(u) for u in uids if u not in referenced]
    assert all(not expected[k].any() for k in missing), "a slice with segmented voxels has no frame"


def _echo_index(series_id: str) -> int:
    last = series_id.rsplit("/", 1)[-1]
    return int(last[4:]) - 1 if last.startswith("echo") and last[4:].isdigit() else -1


def test_synthetic_dicom_study_gets_a_seg_per_plane_on_the_source_grid(built, tmp_path_factory):
    archive = dicom_exams(tmp_path_factory)
    exam = sorted(archive.glob("P*/knee-*"))[0]
    out = tmp_path_factory.mktemp("seg") / "out"
    run_prediction(built["pipeline"], [exam], out, explain=False)
    folder = out / exam.name
    classes = json.loads((built["pipeline"] / "pipeline.json").read_text())["classes"]
    for plane in ("sagittal", "coronal", "axial"):
        _check_seg_against_source(folder, plane, classes)


def test_a_real_multi_echo_series_gets_a_seg_referencing_the_echo_used(built, knee_dicom_dir, tmp_path):
    run_prediction(built["pipeline"], [knee_dicom_dir], tmp_path / "out", explain=False)
    folders = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert len(folders) == 1
    summary = json.loads((folders[0] / "prediction.json").read_text())
    assert summary["planes_used"] == ["sagittal"]
    classes = json.loads((built["pipeline"] / "pipeline.json").read_text())["classes"]
    _check_seg_against_source(folders[0], "sagittal", classes)


def test_nifti_inputs_get_no_dicom_seg(built, tmp_path):
    study = built["archive"] / "P0001" / "knee-0001"
    run_prediction(built["pipeline"], [study / "sagittal.nii.gz"], tmp_path / "out", explain=False)
    folder = tmp_path / "out" / "knee-0001"
    assert (folder / "segmentation_sagittal.nii.gz").exists()
    assert not list(folder.glob("*.dcm"))
    assert "dicom_seg" not in json.loads((folder / "prediction.json").read_text())["series"]["sagittal"]["segmentation"]
