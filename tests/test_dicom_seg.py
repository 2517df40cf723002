"""``orthodiff predict`` writes each segmentation of a DICOM input as a DICOM Segmentation object
that references its source series: read back with highdicom and pydicom, its frames lie on the
source slices and its segments carry the class names. Patient and study values that do not conform
to the standard are written empty or left out, and listed; only missing geometry stops a SEG."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pipeline_fixtures import dicom_exams, tiny_pipeline

from orthodiff.errors import OrthodiffError
from orthodiff.pipeline.dicom_seg import source_datasets, write_dicom_seg
from orthodiff.pipeline.predict import run_prediction

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory)


def _check_seg_against_source(folder: Path, plane: str, classes: list) -> None:
    summary = json.loads((folder / "prediction.json").read_text())
    entry = summary["series"][plane]
    assert entry["segmentation"]["dicom_seg"] == f"segmentation_{plane}.dcm"
    seg_path = folder / entry["segmentation"]["dicom_seg"]

    nifti = nib.load(folder / entry["segmentation"]["nifti"])
    # each test folder holds one series (all echoes of one for the real one)
    row = {"path": entry["source"], "series_id": entry["series_id"], "series_uid": "",
           "echo_index": _echo_index(entry["series_id"])}
    sources = source_datasets(row)
    assert len(sources) == nifti.shape[2]
    _check_seg_on_sources(seg_path, sources, np.asarray(nifti.dataobj).transpose(2, 1, 0), classes)


def _check_seg_on_sources(seg_path: Path, sources: list, expected: np.ndarray, classes: list) -> None:
    """The SEG at ``seg_path`` refers to ``sources`` (one header per slice, in order), lies on their
    geometry and holds ``expected`` (slices, rows, cols) class indices, segments named by ``classes``."""
    import highdicom as hd
    import pydicom

    # pydicom: a SEG of the source study and series, frames on the source slices' geometry
    raw = pydicom.dcmread(seg_path)
    assert raw.Modality == "SEG" and raw.SOPClassUID == SEGMENTATION_STORAGE
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    assert raw.StudyInstanceUID == sources[0].StudyInstanceUID
    assert raw.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {str(item.ReferencedSOPInstanceUID) for item in raw.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        <= set(by_uid)
    shared = raw.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in sources[0].ImageOrientationPatient], atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in sources[0].PixelSpacing], atol=1e-6)
    assert raw.Rows == sources[0].Rows and raw.Columns == sources[0].Columns
    segmented = sum(len(set(np.unique(labels)) - {0}) for labels in expected)  # non-empty (slice, segment) pairs
    assert int(raw.NumberOfFrames) == (segmented or len(sources) * (len(classes) - 1))
    for frame in raw.PerFrameFunctionalGroupsSequence:
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert uid in by_uid
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-4)

    # highdicom: segment labels are the class names, and the label map equals the expected one, slice by slice
    seg = hd.seg.segread(seg_path)
    assert [item.SegmentLabel for item in seg.SegmentSequence] == classes[1:]
    uids = [str(s.SOPInstanceUID) for s in sources]
    referenced = {str(uids[2]) for uids in seg.get_source_image_uids()}
    present = [u for u in uids if u in referenced]
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
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
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
    (folder,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert (folder / "segmentation_sagittal.nii.gz").exists()
    assert not list(folder.glob("*.dcm"))
    assert "dicom_seg" not in json.loads((folder / "prediction.json").read_text())["series"]["sagittal"]["segmentation"]


# ------------------------------------------------------- real headers that do not conform to the standard
CLASSES = ["background", "bone", "cartilage"]
PATIENT_NAME = 0x00100010


@pytest.fixture(scope="module")
def first_echo(knee_dicom_dir) -> list[Path]:
    """The 24 files of the real series' first echo (one volume)."""
    import pydicom

    files = sorted(knee_dicom_dir.glob("*.dcm"))
    chosen = [f for f in files if int(pydicom.dcmread(f, stop_before_pixels=True).EchoNumbers) == 1]
    assert len(chosen) == 24
    return chosen


def _copy_with(files: list[Path], folder: Path, defect) -> Path:
    """The files copied into ``folder``, each with ``defect(dataset)`` applied and saved."""
    import pydicom

    folder.mkdir(parents=True)
    for path in files:
        dataset = pydicom.dcmread(path)
        defect(dataset)
        dataset.save_as(folder / path.name)
    return folder


def _labels(sources: list) -> np.ndarray:
    """A small two-class segmentation on the source grid (columns, rows, slices), some slices empty."""
    labels = np.zeros((int(sources[0].Columns), int(sources[0].Rows), len(sources)), np.uint8)
    labels[100:150, 80:120, 6:14] = 1
    labels[110:120, 90:100, 9:11] = 2
    return labels


def _sex(dataset):
    dataset.PatientSex = "0000"


def _long_name(dataset):
    dataset.PatientName = "Verylongfamilyname" * 4 + "^Given"


def _badly_encoded_name(dataset):
    dataset.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, but the name is Latin-1 bytes
    dataset.add_new(PATIENT_NAME, "PN", b"M\xfcller^J\xf6rg")


def _undeclared_name(dataset):
    del dataset.SpecificCharacterSet  # the default repertoire is ASCII
    dataset.add_new(PATIENT_NAME, "PN", b"M\xfcller^J\xf6rg")


def _study_date(dataset):
    dataset.StudyDate = "2021-13-45"


def _study_date_zeros(dataset):
    dataset.StudyDate = "0000"


def _study_time(dataset):
    dataset.StudyTime = "25:61"


def _missing(dataset):
    for keyword in ("StudyID", "AccessionNumber", "PatientBirthDate"):
        delattr(dataset, keyword)


DEFECTS = {  # defect: (attributes the SEG must not copy as they are, what it holds instead)
    "patient_sex_0000": (_sex, {"PatientSex": ""}),
    "over_long_patient_name": (_long_name, {"PatientName": ""}),
    "badly_encoded_patient_name": (_badly_encoded_name, {"PatientName": ""}),
    "patient_name_outside_the_character_set": (_undeclared_name, {"PatientName": ""}),
    "malformed_study_date": (_study_date, {"StudyDate": ""}),
    "study_date_0000": (_study_date_zeros, {"StudyDate": ""}),
    "bad_study_time": (_study_time, {"StudyTime": ""}),
    "missing_optional_attributes": (_missing, {"StudyID": "", "AccessionNumber": "", "PatientBirthDate": ""}),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_a_non_conforming_header_value_still_gives_a_seg_and_is_listed(first_echo, tmp_path, defect):
    import pydicom

    inject, expected_values = DEFECTS[defect]
    folder = _copy_with(first_echo, tmp_path / "series", inject)
    sources = source_datasets({"path": str(folder), "series_id": "knee"})
    before = [header.to_json_dict() for header in sources]
    labels = _labels(sources)

    changes = write_dicom_seg(tmp_path / "seg.dcm", labels, CLASSES, sources)

    assert {change.attribute for change in changes} == set(expected_values)
    assert all(change.reason and change.action == "written empty" for change in changes)
    assert [header.to_json_dict() for header in sources] == before, "the source headers were changed"
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    for keyword, value in expected_values.items():
        assert keyword in seg and str(seg.data_element(keyword).value or "") == value, keyword
    untouched = {"PatientID", "PatientSex", "PatientName", "StudyDate", "StudyTime"} - set(expected_values)
    for keyword in untouched:  # what conforms is carried over as the source holds it
        assert str(seg.data_element(keyword).value) == str(sources[0].data_element(keyword).value), keyword
    _check_seg_on_sources(tmp_path / "seg.dcm", sources, labels.transpose(2, 1, 0), CLASSES)


def test_a_conforming_real_series_is_copied_without_changes(first_echo, tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    for path in first_echo:
        shutil.copy(path, folder / path.name)
    sources = source_datasets({"path": str(folder), "series_id": "knee"})
    assert write_dicom_seg(tmp_path / "seg.dcm", _labels(sources), CLASSES, sources) == []


def test_an_over_long_optional_value_is_left_out(first_echo, tmp_path):
    import pydicom

    def describe(dataset):
        dataset.StudyDescription = "knee " * 20  # LO holds at most 64 characters
        dataset.PatientAge = "45"  # AS is nnnD, nnnW, nnnM or nnnY

    folder = _copy_with(first_echo, tmp_path / "series", describe)
    sources = source_datasets({"path": str(folder), "series_id": "knee"})
    changes = write_dicom_seg(tmp_path / "seg.dcm", _labels(sources), CLASSES, sources)
    assert {(c.attribute, c.action) for c in changes} == {("StudyDescription", "left out"), ("PatientAge", "left out")}
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert "StudyDescription" not in seg and "PatientAge" not in seg


@pytest.mark.parametrize("keyword", ["ImageOrientationPatient", "ImagePositionPatient", "SOPInstanceUID",
                                     "PixelSpacing"])
def test_a_source_without_geometry_or_identity_is_refused_with_the_reason(first_echo, tmp_path, keyword):
    import pydicom

    folder = tmp_path / "series"
    folder.mkdir()
    for path in first_echo:
        shutil.copy(path, folder / path.name)
    sources = source_datasets({"path": str(folder), "series_id": "knee"})
    broken = list(sources)
    broken[5] = pydicom.dcmread(sources[5].filename, stop_before_pixels=True)
    delattr(broken[5], keyword)
    with pytest.raises(OrthodiffError, match=keyword) as info:
        write_dicom_seg(tmp_path / "seg.dcm", _labels(sources), CLASSES, broken)
    message = str(info.value)
    assert "\n" not in message and Path(sources[5].filename).name in message
    assert not (tmp_path / "seg.dcm").exists()


def test_the_seg_has_the_segmentation_iod_modules(first_echo, tmp_path):
    """What validate_iods (dicom-validator) would check, without the standard's XML it needs online:
    the Segmentation IOD's required module attributes, as highdicom sets them."""
    import pydicom

    folder = _copy_with(first_echo, tmp_path / "series", _sex)
    sources = source_datasets({"path": str(folder), "series_id": "knee"})
    write_dicom_seg(tmp_path / "seg.dcm", _labels(sources), CLASSES, sources)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.file_meta.MediaStorageSOPClassUID == SEGMENTATION_STORAGE
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesInstanceUID",
                    "SeriesNumber", "FrameOfReferenceUID", "Manufacturer", "ContentDate", "ContentTime",
                    "InstanceNumber", "ContentLabel", "SegmentationType", "DimensionOrganizationSequence"):
        assert keyword in seg, keyword  # type 1 and 2 attributes of the Patient .. Segmentation Image modules
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.ImageType[0] == "DERIVED" and seg.BitsAllocated == 1 and seg.SamplesPerPixel == 1
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert [int(item.SegmentNumber) for item in seg.SegmentSequence] == [1, 2]
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "orthodiff"
        assert item.SegmentedPropertyCategoryCodeSequence and item.SegmentedPropertyTypeCodeSequence
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "orthodiff" and algorithm.AlgorithmVersion
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning
    pointers = [int(item.DimensionIndexPointer) for item in seg.DimensionIndexSequence]
    assert pydicom.tag.Tag("ReferencedSegmentNumber") in pointers
    assert pydicom.tag.Tag("ImagePositionPatient") in pointers
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert shared.PixelMeasuresSequence[0].PixelSpacing and shared.PixelMeasuresSequence[0].SliceThickness
    assert len(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == 6
    assert len(seg.PerFrameFunctionalGroupsSequence) == int(seg.NumberOfFrames)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        assert len(frame.PlanePositionSequence[0].ImagePositionPatient) == 3
        assert len(frame.FrameContentSequence[0].DimensionIndexValues) == len(pointers)
        assert frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber in (1, 2)


def test_predict_writes_the_seg_of_a_real_exam_with_patient_sex_0000_and_lists_the_change(built, first_echo, tmp_path):
    folder = _copy_with(first_echo, tmp_path / "exam", _sex)
    run_prediction(built["pipeline"], [folder], tmp_path / "out", explain=False)
    (study,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    summary = json.loads((study / "prediction.json").read_text())
    segmentation = summary["series"]["sagittal"]["segmentation"]
    assert segmentation["dicom_seg"] == "segmentation_sagittal.dcm"
    assert [change["attribute"] for change in segmentation["dicom_seg_header_changes"]] == ["PatientSex"]
    assert not any("DICOM SEG not written" in note for note in summary["notes"])
    report = (study / "report.html").read_text()
    assert "segmentation_sagittal.dcm" in report and "PatientSex" in report and "M, F or O" in report
