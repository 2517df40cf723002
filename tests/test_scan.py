"""`orthodiff scan`: planes from geometry, studies, segmentations, labels, metadata, bad input."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_io_dicom import oblique_affine, write_dicom_series

from orthodiff.data.manifest import load_series, read_manifest
from orthodiff.data.scan import MANIFEST_COLUMNS, scan_archive
from orthodiff.errors import OrthodiffError
from orthodiff.planes import PLANES, plane_from_affine


def write_nifti(path: Path, affine: np.ndarray, shape=(12, 10, 5), seed: int = 0, array=None, dtype=np.float32) -> Path:
    import nibabel as nib

    if array is None:
        array = np.random.default_rng(seed).random(shape).astype(dtype) * 100
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), affine), str(path))
    return path


def write_itk(path: Path, affine: np.ndarray, shape=(12, 10, 5), seed: int = 0) -> Path:
    """An NRRD/MHA with the geometry of a voxel->RAS affine (SimpleITK stores LPS)."""
    import SimpleITK as sitk

    array = np.random.default_rng(seed).random(shape).astype(np.float32)
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :]
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def truth_archive(root: Path) -> dict:
    """Three patients, one study each (P2 two studies), planes with obliquity; returns truth."""
    truth = {}
    layout = {
        ("P1", "knee-01"): {"sagittal": 8.0, "coronal": -10.0, "axial": 14.0},
        ("P2", "knee-02"): {"sagittal": -15.0, "axial": 5.0},
        ("P2", "knee-03"): {"coronal": 20.0},
    }
    for (patient, study), planes in layout.items():
        for index, (plane, degrees) in enumerate(planes.items()):
            affine = oblique_affine(plane, degrees=degrees)
            # File names deliberately do not say the plane: the scan must read the geometry.
            path = write_nifti(root / patient / study / f"series{index}.nii.gz", affine, seed=index)
            write_nifti(root / patient / study / f"series{index}_seg.nii.gz", affine, array=np.ones((12, 10, 5)), dtype=np.uint8)
            truth[str(path)] = (patient, study, plane)
    itk = write_itk(root / "P3" / "knee-04" / "t2.nrrd", oblique_affine("coronal", degrees=-25.0))
    write_itk(root / "P3" / "knee-04" / "t2-label.nrrd", oblique_affine("coronal", degrees=-25.0))
    # No metadata row for knee-04: the patient is the study (folder names are not trusted for it).
    truth[str(itk)] = ("knee-04", "knee-04", "coronal")
    mha = write_itk(root / "P3" / "knee-04" / "pd.mha", oblique_affine("sagittal", degrees=30.0))
    truth[str(mha)] = ("knee-04", "knee-04", "sagittal")
    (root / "labels.csv").write_text("study_id,acl_tear,effusion\nknee-01,1,0\nknee-02,0,\nknee-03,0,1\n")
    (root / "metadata.csv").write_text(
        "patient_id,study_id,joint,site,field_strength,age,sex,height,weight\n"
        "P1,knee-01,knee,A,3.0,40,F,170,65\n"
        "P2,knee-02,knee,B,1.5,55,M,180,90\n"
        "P2,knee-03,knee,B,1.5,56,M,180,91\n"
    )
    return truth


def test_nifti_and_itk_tree_gives_true_planes_segs_labels_and_metadata(tmp_path):
    archive = tmp_path / "archive"
    truth = truth_archive(archive)
    result = scan_archive(archive, tmp_path / "manifest.parquet")
    frame = read_manifest(tmp_path / "manifest.parquet")
    assert result.errors == []
    assert list(frame.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    assert list(frame.columns[len(MANIFEST_COLUMNS):]) == ["label_acl_tear", "label_effusion"]
    assert len(frame) == len(truth)
    for row in frame.itertuples():
        assert (row.patient_id, row.study_id, row.plane) == truth[row.path]
        assert row.series_id == f"{row.study_id}/{row.plane}"
        assert row.format == ("nifti" if row.path.endswith(".nii.gz") else "itk")
    # Sorted by patient, study, plane (sagittal, coronal, axial), series id.
    assert frame["series_id"].tolist() == [
        "knee-01/sagittal", "knee-01/coronal", "knee-01/axial", "knee-02/sagittal", "knee-02/axial",
        "knee-03/coronal", "knee-04/sagittal", "knee-04/coronal",
    ]  # fmt: skip
    by_id = frame.set_index("series_id")
    assert by_id.loc["knee-01/axial", "seg_path"].endswith("series2_seg.nii.gz")
    assert by_id.loc["knee-04/coronal", "seg_path"].endswith("t2-label.nrrd")
    assert by_id.loc["knee-04/sagittal", "seg_path"] == ""
    row = by_id.loc["knee-01/coronal"]
    assert (row.n_slices, row.rows, row.cols) == (5, 10, 12)
    np.testing.assert_allclose([row.spacing_col, row.spacing_row, row.spacing_slice], [0.5, 0.6, 3.0], atol=1e-5)
    tilted = oblique_affine("coronal", degrees=-10.0)[:3, 2]
    np.testing.assert_allclose([row.normal_x, row.normal_y, row.normal_z], tilted / np.linalg.norm(tilted), atol=1e-5)
    assert (row.site, row.sex, row.age, row.field_strength, row.label_acl_tear) == ("A", "F", 40.0, 3.0, 1.0)
    assert np.isnan(by_id.loc["knee-02/axial", "label_effusion"])
    assert np.isnan(by_id.loc["knee-04/coronal", "label_acl_tear"])  # no labels row: unknown
    assert frame["echo_index"].dtype == np.int64 and (frame["echo_index"] == -1).all()
    volume = load_series(frame.iloc[3])
    assert volume.array.shape == (12, 10, 5)
    assert plane_from_affine(volume.affine) == frame.iloc[3]["plane"]
    assert pd.read_csv(tmp_path / "manifest.errors.csv").empty


def test_dicom_studies_from_tags_and_echo_series_ids(tmp_path, knee_dicom_dir):
    archive = tmp_path / "archive"
    (archive / "anon" / "mese").mkdir(parents=True)
    for path in sorted(knee_dicom_dir.iterdir())[:48]:  # 6 slice positions x 8 echoes
        shutil.copyfile(path, archive / "anon" / "mese" / path.name)
    affine = oblique_affine("axial")
    image = np.arange(8 * 8 * 4, dtype=float).reshape(8, 8, 4)
    tags = {"PatientID": "PX", "StudyID": "1", "PatientSex": "F", "PatientAge": "044Y", "MagneticFieldStrength": "15000"}
    write_dicom_series(archive / "a" / "ax", image, affine, series_uid="7.1", tags={**tags, "StudyInstanceUID": "7"})
    write_nifti(archive / "a" / "ax_seg.nii.gz", affine, array=np.ones((8, 8, 4)), dtype=np.uint8)
    # Another patient's study also numbered "1": study ids fall back to the unique UID.
    write_dicom_series(archive / "b" / "ax", image, affine, series_uid="8.1", tags={**tags, "PatientID": "PY", "StudyInstanceUID": "8"})
    frame = scan_archive(archive, tmp_path / "m.csv").manifest
    fixture_rows = frame[frame["path"].str.endswith("mese")]
    assert len(fixture_rows) == 8 and set(fixture_rows["plane"]) == {"sagittal"}
    assert fixture_rows["echo_time"].is_monotonic_increasing
    assert fixture_rows["series_id"].str.endswith("/sagittal/echo1").sum() == 1
    assert (fixture_rows["field_strength"] == 3.0).all()
    axial = frame[frame["plane"] == "axial"].set_index("patient_id")
    assert axial.loc["PX", "study_id"] == "7" and axial.loc["PY", "study_id"] == "8"
    assert axial.loc["PX", "seg_path"].endswith("ax_seg.nii.gz") and axial.loc["PY", "seg_path"] == ""
    assert (axial.loc["PX", "sex"], axial.loc["PX", "age"], axial.loc["PX", "field_strength"]) == ("F", 44.0, 1.5)
    row = frame[frame["path"].str.endswith("mese")].iloc[2]
    assert load_series(row).meta["echo_time"] == pytest.approx(18.936)


def write_mrnet(root: Path) -> None:
    rng = np.random.default_rng(1)
    for split, exams in (("train", ["0000", "0001"]), ("valid", ["1130"])):
        for plane in PLANES:
            for exam in exams:
                path = root / split / plane / f"{exam}.npy"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, rng.integers(0, 255, size=(4 + len(plane) % 3, 16, 16)).astype(np.uint8))
    (root / "train-acl.csv").write_text("0000,1\n0001,0\n")
    (root / "train-meniscus.csv").write_text("0,0\n1,1\n")
    (root / "train-abnormal.csv").write_text("0000,1\n0001,1\n0002,1\n")
    (root / "valid-acl.csv").write_text("1130,0\n")


def test_mrnet_layout_planes_from_folders_and_labels_from_csvs(tmp_path):
    write_mrnet(tmp_path / "MRNet-v1.0")
    result = scan_archive(tmp_path, tmp_path / "m.csv")
    frame = read_manifest(tmp_path / "m.csv")
    assert len(frame) == 9 and set(frame["format"]) == {"mrnet"}
    assert set(frame["study_id"]) == {"mrnet-train-0000", "mrnet-train-0001", "mrnet-valid-1130"}
    assert (frame["patient_id"] == frame["study_id"]).all()
    assert [c for c in frame.columns if c.startswith("label_")] == ["label_acl", "label_meniscus", "label_abnormal"]
    by_id = frame.set_index("series_id")
    assert by_id.loc["mrnet-train-0001/coronal", ["label_acl", "label_meniscus", "label_abnormal"]].tolist() == [0, 1, 1]
    assert np.isnan(by_id.loc["mrnet-valid-1130/axial", "label_meniscus"])
    assert by_id.loc["mrnet-train-0000/axial", "n_slices"] == 4 + len("axial") % 3
    for plane in PLANES:
        volume = load_series(frame[frame["series_id"] == f"mrnet-train-0000/{plane}"].iloc[0])
        assert plane_from_affine(volume.affine) == plane
        assert volume.array.shape[:2] == (16, 16)
    # Exam 0002 is labelled but has no .npy: reported, the rest attached.
    assert [Path(e.path).name for e in result.errors] == ["train-abnormal.csv"]
    assert "0002" in result.errors[0].reason


def test_every_bad_input_is_one_errors_row_and_good_series_survive(tmp_path, knee_dicom_dir):
    archive = tmp_path / "archive"
    good = write_nifti(archive / "P1" / "s1" / "good.nii.gz", oblique_affine("sagittal"))
    affine = oblique_affine("axial")
    truncated_gz = write_nifti(archive / "P2" / "s2" / "cut.nii.gz", affine, shape=(40, 40, 10))
    truncated_gz.write_bytes(truncated_gz.read_bytes()[:3000])
    truncated_raw = write_nifti(archive / "P2" / "s2" / "cut_raw.nii", affine)
    truncated_raw.write_bytes(truncated_raw.read_bytes()[:1000])
    garbage = archive / "P2" / "s2" / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"\x00" * 50))
    flat = write_nifti(archive / "P2" / "s2" / "flat.nii.gz", affine, array=np.ones((12, 10, 1)))
    nan_image = np.ones((12, 10, 5), np.float32) * np.arange(5)
    nan_image[3, 3, 3] = np.nan
    nan_path = write_nifti(archive / "P2" / "s2" / "nan.nii.gz", affine, array=nan_image)
    constant = write_nifti(archive / "P2" / "s2" / "constant.nii.gz", affine, array=np.full((12, 10, 5), 7.0))
    lonely_seg = write_nifti(archive / "P2" / "s2" / "missing_seg.nii.gz", affine)
    bad_seg = write_nifti(archive / "P1" / "s1" / "good_mask.nii.gz", oblique_affine("sagittal"), shape=(6, 10, 5))
    localizer = archive / "P3" / "s3" / "loc"
    write_dicom_series(localizer, np.ones((8, 8, 3)) * np.arange(3), affine, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    dicom = archive / "P3" / "s3" / "mese"
    dicom.mkdir(parents=True)
    files = sorted(knee_dicom_dir.iterdir())[:48]  # instance order: echoes 1-8 at 6 positions
    for path in files:
        shutil.copyfile(path, dicom / path.name)
    cut_dicom = dicom / files[9].name  # slice 2 of echo 2
    cut_dicom.write_bytes(cut_dicom.read_bytes()[:2500])
    stray = archive / "P3" / "s3" / "notes.docx"
    stray.write_bytes(b"PK\x03\x04 not a scan")
    (archive / "archive.json").write_text(json.dumps({"joint": "knee", "labels": ["acl_tear"]}))
    (archive / "labels.csv").write_text("study_id,acl_tear,acl_tera\ns1,1,0\nnope,0,0\n")
    (archive / "metadata.csv").write_text("patient_id,study_id,sex\nP1,s1,F\nP1,s9,M\n")

    result = scan_archive(archive, tmp_path / "manifest.csv")
    errors = pd.read_csv(tmp_path / "manifest.errors.csv")
    assert list(errors.columns) == ["path", "reason"]
    assert len(errors) == len(result.errors)

    def reasons(path: Path) -> str:
        return " | ".join(errors.loc[errors["path"] == str(path), "reason"])

    assert "truncated" in reasons(truncated_gz) and "cut.nii.gz" in reasons(truncated_gz)
    assert "truncated" in reasons(truncated_raw)
    assert "corrupt" in reasons(garbage)
    assert "2D image" in reasons(flat)
    assert "NaN/Inf" in reasons(nan_path)
    assert "constant" in reasons(constant)
    assert "without a series" in reasons(lonely_seg)
    assert "shape" in reasons(bad_seg)
    assert "localizer" in reasons(localizer)
    assert "truncated" in reasons(cut_dicom) and cut_dicom.name in reasons(cut_dicom)
    assert "echo 2" in reasons(dicom)
    assert "not a recognised scan" in reasons(stray)
    labels_text = reasons(archive / "labels.csv")
    assert "unknown label 'acl_tera'" in labels_text and "'nope' has no series" in labels_text
    metadata_text = reasons(archive / "metadata.csv")
    assert "conflicting sex" in metadata_text and "P1" in metadata_text
    for reason in errors["reason"]:
        assert "\n" not in reason and ";" in reason  # one line: what is wrong; what to do

    frame = result.manifest
    assert str(good) in set(frame["path"])
    assert frame.loc[frame["path"] == str(good), "seg_path"].item() == ""
    assert frame.loc[frame["path"] == str(good), "sex"].item() == ""  # conflicting: unknown
    assert frame.loc[frame["path"] == str(good), "label_acl_tear"].item() == 1.0
    assert "label_acl_tera" not in frame.columns
    echoes = frame[frame["path"] == str(dicom)]
    assert len(echoes) == 7 and 1 not in set(echoes["echo_index"])  # only echo 2 dropped
    assert set(frame["joint"]) == {"knee"}


def test_header_only_scan_still_catches_truncation(tmp_path):
    affine = oblique_affine("coronal")
    write_nifti(tmp_path / "a" / "ok.nii.gz", affine)
    cut = write_nifti(tmp_path / "a" / "cut.nii.gz", affine, shape=(40, 40, 10))
    cut.write_bytes(cut.read_bytes()[:3000])
    result = scan_archive(tmp_path, tmp_path / "m.csv", check_voxels=False)
    assert result.manifest["path"].tolist() == [str(tmp_path / "a" / "ok.nii.gz")]
    assert [e.path for e in result.errors] == [str(cut)]


def test_same_folder_names_in_different_patients_stay_separate_studies(tmp_path):
    for patient in ("P1", "P2"):
        write_nifti(tmp_path / patient / "visit1" / "t1.nii.gz", oblique_affine("axial"))
    frame = scan_archive(tmp_path, tmp_path / "m.csv").manifest
    assert frame["study_id"].tolist() == ["P1/visit1", "P2/visit1"]
    assert frame["series_id"].is_unique


def test_empty_archive_and_missing_tables_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OrthodiffError, match="no readable series"):
        scan_archive(tmp_path / "empty", tmp_path / "m.csv")
    with pytest.raises(OrthodiffError, match="--labels"):
        scan_archive(tmp_path / "empty", tmp_path / "m.csv", labels=tmp_path / "nope.csv")
    with pytest.raises(OrthodiffError, match="not found"):
        scan_archive(tmp_path / "nowhere", tmp_path / "m.csv")


def test_scan_command_writes_manifest_and_errors(tmp_path):
    from typer.testing import CliRunner

    from orthodiff.cli import app

    write_nifti(tmp_path / "arch" / "P1" / "s1" / "a.nii.gz", oblique_affine("sagittal"))
    write_nifti(tmp_path / "arch" / "P1" / "s1" / "flat.nii.gz", oblique_affine("sagittal"), shape=(8, 8, 1))
    result = CliRunner().invoke(app, ["scan", str(tmp_path / "arch"), "--out", str(tmp_path / "out" / "m.parquet")])
    assert result.exit_code == 0, result.output
    assert "1 series" in result.output and "1 problem" in result.output
    assert read_manifest(tmp_path / "out" / "m.parquet")["plane"].tolist() == ["sagittal"]
    assert len(pd.read_csv(tmp_path / "out" / "m.errors.csv")) == 1


def test_synthetic_archive_planes_equal_the_planes_it_was_generated_in(tmp_path):
    from orthodiff.synth import synthesize_archive

    manifests = {}
    for fmt in ("nifti", "dicom"):
        archive = tmp_path / fmt
        synthesize_archive(archive, joint="knee", studies=3, seed=3, fmt=fmt, workers=1, matrix=32, progress=False)
        result = scan_archive(archive, tmp_path / f"{fmt}.parquet")
        frame = result.manifest
        assert result.errors == []
        assert len(frame) >= 7 and set(frame["format"]) == {fmt}
        # The generator names each series after its plane: <plane>.nii.gz or <plane>/IM0001.dcm.
        generated = [Path(path).name.split(".")[0] for path in frame["path"]]
        assert frame["plane"].tolist() == generated
        assert (frame["seg_path"] == frame["path"].str.replace(r"(\.nii\.gz)?$", "_seg.nii.gz", regex=True)).all()
        metadata = pd.read_csv(archive / "metadata.csv", dtype={"patient_id": str, "study_id": str})
        merged = frame.merge(metadata, on="study_id", suffixes=("", "_truth"))
        assert (merged["patient_id"] == merged["patient_id_truth"]).all()
        assert (merged["sex"] == merged["sex_truth"]).all() and np.allclose(merged["age"], merged["age_truth"])
        labels = pd.read_csv(archive / "labels.csv", dtype={"study_id": str})
        merged = frame.merge(labels, on="study_id")
        assert all((merged[f"label_{name}"] == merged[name]).all() for name in labels.columns[1:])
        manifests[fmt] = frame.set_index("series_id")
    # The same seed gives the same geometry: DICOM tags and NIfTI affines must agree.
    geometry = ["n_slices", "rows", "cols", "spacing_slice", "spacing_row", "spacing_col", "normal_x", "normal_y", "normal_z"]
    np.testing.assert_allclose(manifests["dicom"][geometry].to_numpy(float), manifests["nifti"].loc[manifests["dicom"].index, geometry].to_numpy(float), atol=1e-3)
