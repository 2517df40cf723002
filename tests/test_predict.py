"""``orthodiff predict``: DICOM exam folders, NIfTI files and manifests in; JSON, segmentations,
heat maps and a report out; bad input reported, never half written."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from pipeline_fixtures import dicom_exams, tiny_pipeline

from orthodiff.cli import main
from orthodiff.errors import OrthodiffError
from orthodiff.fileio import safe_filename
from orthodiff.pipeline.predict import run_prediction

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOCK = ".predict.lock"  # OUT's lock: one run writes it at a time


def study_folder(out: Path, readable: str) -> Path:
    """The folder of the one study in ``out`` whose id is ``<readable>-<8 hex>``."""
    folders = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(f"{readable}-") and len(p.name) == len(readable) + 9]
    assert len(folders) == 1, f"{readable}: {folders}"
    return folders[0]


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory)


@pytest.fixture(scope="session")
def exams(tmp_path_factory):
    """Study folders of two DICOM exams; the second one without its axial series."""
    archive = dicom_exams(tmp_path_factory)
    folders = sorted(archive.glob("P*/knee-*"))
    assert len(folders) == 2
    shutil.rmtree(folders[1] / "axial")
    (folders[1] / "axial_seg.nii.gz").unlink()
    return folders


@pytest.fixture(scope="session")
def predicted(built, exams, tmp_path_factory):
    out = tmp_path_factory.mktemp("predicted") / "out"
    notes = exams[0].parent.parent / "notes.txt"
    notes.write_text("not an image\n")
    result = run_prediction(built["pipeline"], [exams[0], exams[1], notes], out)
    return {"result": result, "out": out, "notes": notes}


def test_dicom_exam_folder_gives_every_output(predicted, exams, built):
    out, result = predicted["out"], predicted["result"]
    folder = study_folder(out, exams[0].name)
    assert result.studies == sorted(study_folder(out, f.name).name for f in exams)
    summary = json.loads((folder / "prediction.json").read_text())
    assert summary["study_id"] == folder.name
    assert set(summary["labels"]) == {"blob", "rim"}
    for entry in summary["labels"].values():
        assert 0 <= entry["probability"] <= 1
        assert entry["decision"] == (entry["probability"] >= entry["threshold"])
    assert summary["planes_used"] == ["sagittal", "coronal", "axial"] and summary["planes_missing"] == {}
    for plane in summary["planes_used"]:
        # Segmentation on the series' own grid: same shape and affine as the synthetic reference.
        reference = nib.load(exams[0] / f"{plane}_seg.nii.gz")
        segmentation = nib.load(folder / f"segmentation_{plane}.nii.gz")
        assert segmentation.shape == reference.shape
        np.testing.assert_allclose(segmentation.affine, reference.affine, atol=1e-3)
        assert segmentation.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(segmentation.dataobj))) <= {0, 1, 2}
        maps = []
        for label in ("blob", "rim"):
            heat = nib.load(folder / f"heatmap_{label}_{plane}.nii.gz")
            assert heat.shape == reference.shape
            np.testing.assert_allclose(heat.affine, reference.affine, atol=1e-3)
            values = np.asarray(heat.dataobj)
            assert values.min() >= 0 and values.max() <= 1 + 1e-6
            maps.append(values)
            assert (folder / f"heatmap_{label}_{plane}.png").read_bytes()[:8] == PNG_MAGIC
            assert summary["series"][plane]["heatmaps"][label]["empty"] == (values.max() == 0)
        assert any(m.max() > m.min() for m in maps), f"every {plane} heat map is constant"
        assert (folder / f"segmentation_{plane}.png").read_bytes()[:8] == PNG_MAGIC
    report = (folder / "report.html").read_text()
    assert "heatmap_blob_sagittal.png" in report and "segmentation_axial.png" in report
    table = pd.read_csv(out / "predictions.csv")
    assert list(table["study_id"]) == result.studies


def test_study_without_axial_still_predicts_and_says_so(predicted, exams):
    folder = study_folder(predicted["out"], exams[1].name)
    summary = json.loads((folder / "prediction.json").read_text())
    assert summary["planes_used"] == ["sagittal", "coronal"]
    assert "axial" in summary["planes_missing"]
    assert any("without axial" in note for note in summary["notes"])
    assert not (folder / "segmentation_axial.nii.gz").exists()
    assert "axial" in (folder / "report.html").read_text()


def test_a_non_image_file_is_reported_and_the_rest_go_on(predicted):
    errors = pd.read_csv(predicted["out"] / "errors.csv")
    assert len(errors) == 1
    assert errors.loc[0, "input"] == str(predicted["notes"])
    assert "not an image" in errors.loc[0, "reason"]
    # Nothing half written: no staging folders or temporary files left behind.
    assert not [p for p in predicted["out"].rglob("*") if p.name.startswith(".") and p.name != LOCK]


def test_nifti_files_and_a_manifest_are_accepted(built, tmp_path):
    study = built["archive"] / "P0001" / "knee-0001"
    out = run_prediction(built["pipeline"], sorted(study.glob("*al.nii.gz")), tmp_path / "nifti", explain=False)
    assert [s[:-9] for s in out.studies] == ["knee-0001"]
    assert not out.errors
    manifest = pd.read_parquet(built["manifest"])
    manifest[manifest["study_id"] == "knee-0002"].to_csv(tmp_path / "one-study.csv", index=False)
    out = run_prediction(built["pipeline"], [tmp_path / "one-study.csv"], tmp_path / "manifest", explain=False)
    assert out.studies == ["knee-0002"]
    summary = json.loads((tmp_path / "manifest" / "knee-0002" / "prediction.json").read_text())
    assert not list((tmp_path / "manifest" / "knee-0002").glob("heatmap_*"))
    assert summary["series"]["sagittal"]["segmentation"]["nifti"] == "segmentation_sagittal.nii.gz"


def test_a_folder_without_usable_series_is_one_clear_line(built, tmp_path):
    empty = tmp_path / "exam"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here\n")
    with pytest.raises(OrthodiffError, match="no usable image series") as info:
        run_prediction(built["pipeline"], [empty], tmp_path / "out")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK, "errors.csv"]


def test_command_refuses_another_pipeline_version(built, exams, tmp_path, capsys):
    future = tmp_path / "future"
    shutil.copytree(built["pipeline"], future)
    config = json.loads((future / "pipeline.json").read_text())
    config["version"] = 99
    (future / "pipeline.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(future), str(exams[0]), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("orthodiff: error:") and "version 99" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_command_without_heatmaps_writes_the_rest(built, exams, tmp_path):
    out = tmp_path / "out"
    main(["predict", str(built["pipeline"]), str(exams[0]), "--out", str(out), "--no-heatmaps"])
    folder = study_folder(out, exams[0].name)
    summary = json.loads((folder / "prediction.json").read_text())
    assert set(summary["labels"]) == {"blob", "rim"}
    assert list(folder.glob("heatmap_*")) == []
    assert sorted(p.name for p in folder.glob("segmentation_*.nii.gz")) == [
        f"segmentation_{plane}.nii.gz" for plane in ("axial", "coronal", "sagittal")]


# ------------------------------------------------------------- identity, names, leftovers
def test_dicom_exams_sharing_a_study_id_stay_apart(built, exams, tmp_path):
    """StudyID is a per-scanner counter: two exams both "1", given as separate inputs, are two
    studies ("1-" and 8 hex digits of their StudyInstanceUIDs), each predicted from its own series only."""
    import hashlib

    import pydicom

    copies = []
    for number, exam in enumerate(exams):
        copy = tmp_path / f"site{number}" / "exam"
        shutil.copytree(exam, copy)
        for path in copy.rglob("*.dcm"):
            dataset = pydicom.dcmread(path)
            dataset.StudyID = "1"
            dataset.save_as(path)
        copies.append(copy)
    uids = [str(pydicom.dcmread(next(c.rglob("*.dcm"))).StudyInstanceUID) for c in copies]
    ids = ["1-" + hashlib.sha256(f"dicom:{uid}".encode()).hexdigest()[:8] for uid in uids]
    result = run_prediction(built["pipeline"], copies, tmp_path / "out", explain=False)
    assert sorted(result.studies) == sorted(ids)
    table = pd.read_csv(tmp_path / "out" / "predictions.csv", dtype={"study_id": str})
    assert sorted(table["study_id"]) == sorted(ids)
    for copy, study in zip(copies, ids):
        summary = json.loads((tmp_path / "out" / study / "prediction.json").read_text())
        sources = {Path(entry["source"]) for entry in summary["series"].values()}
        assert all(copy in source.parents for source in sources), f"{study} mixes exams: {sources}"
        assert not any("several series" in note for note in summary["notes"])
    # one exam's plane folders given separately share their StudyInstanceUID: still one study
    parts = run_prediction(built["pipeline"], [copies[0] / "sagittal", copies[0] / "coronal"], tmp_path / "parts",
                           explain=False)
    assert parts.studies == ids[:1]
    summary = json.loads((tmp_path / "parts" / ids[0] / "prediction.json").read_text())
    assert summary["planes_used"] == ["sagittal", "coronal"]


def test_nifti_exams_in_folders_of_one_name_stay_apart(built, tmp_path):
    sources = [built["archive"] / "P0001" / "knee-0001", built["archive"] / "P0001" / "knee-0002"]
    inputs = []
    for parent, source in zip(("left", "right"), sources):
        exam = tmp_path / parent / "exam1"
        exam.mkdir(parents=True)
        for plane in ("sagittal", "coronal"):
            shutil.copy(source / f"{plane}.nii.gz", exam / f"{plane}.nii.gz")
        inputs.append(exam)
    result = run_prediction(built["pipeline"], inputs, tmp_path / "out", explain=False)
    assert len(result.studies) == 2 and len(set(result.studies)) == 2
    for study in result.studies:
        folder = tmp_path / "out" / safe_filename(study)
        summary = json.loads((folder / "prediction.json").read_text())
        parents = {Path(entry["source"]).parent for entry in summary["series"].values()}
        assert len(parents) == 1 and summary["planes_used"] == ["sagittal", "coronal"]
    # files of one exam given one by one are still one study
    one = run_prediction(built["pipeline"], sorted(inputs[0].glob("*.nii.gz")), tmp_path / "files", explain=False)
    assert len(one.studies) == 1 and one.studies[0] in result.studies and one.studies[0].startswith("exam1-")


def test_study_ids_that_clean_to_one_name_get_their_own_folders(built, tmp_path):
    source = built["archive"] / "P0001" / "knee-0001" / "sagittal.nii.gz"
    inputs = []
    for study in ("a b", "a?b", "a_b"):
        (tmp_path / "in" / study).mkdir(parents=True)
        shutil.copy(source, tmp_path / "in" / study / "sagittal.nii.gz")
        inputs.append(tmp_path / "in" / study / "sagittal.nii.gz")
    result = run_prediction(built["pipeline"], inputs, tmp_path / "out", explain=False)
    assert sorted(study[:-9] for study in result.studies) == ["a b", "a?b", "a_b"]
    folders = sorted(p for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert len(folders) == 3
    assert sorted(json.loads((f / "prediction.json").read_text())["study_id"] for f in folders) == sorted(result.studies)
    plain = next(study for study in result.studies if study.startswith("a_b-"))
    assert (tmp_path / "out" / plain).is_dir()  # a plain id keeps its own name


def test_one_naming_function_is_injective_for_predict_and_fine_tuning(built):
    names = [safe_filename(s) for s in ("a b/sagittal", "a?b/sagittal", "a_b/sagittal", "a_b_sagittal")]
    assert len(set(names)) == 4
    assert len(safe_filename("é" * 300).encode()) <= 200
    index = pd.read_csv(built["segment"] / "segmentations" / "index.csv")
    for row in index.itertuples():
        assert row.pred == f"segmentations/{row.split}/{safe_filename(row.series_id)}_pred.npy"


def test_a_rerun_removes_what_a_killed_run_left_in_out(built, exams, tmp_path):
    import os
    import time

    out = tmp_path / "out"
    stale = out / ".knee-0001.k3j_x9q2.tmp"
    aside = out / ".knee-0002.old-4242"
    fresh = out / ".knee-0003.abcd1234.tmp"  # a moment old: OUT's lock says no run is writing it
    foreign = out / ".mine"  # not ours
    for folder in (stale, aside, fresh, foreign):
        folder.mkdir(parents=True)
        (folder / "prediction.json").write_text("{}")
    hour_ago = time.time() - 3600
    for path in (stale, stale / "prediction.json", aside, aside / "prediction.json", foreign, foreign / "prediction.json"):
        os.utime(path, (hour_ago, hour_ago))
    run_prediction(built["pipeline"], [exams[1]], out, explain=False)
    assert not stale.exists() and not aside.exists() and not fresh.exists()
    assert foreign.exists()
