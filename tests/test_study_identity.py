"""Study identity in ``scan`` and ``predict``: exams never merge, output folders never collide, and
a study's prediction never depends on what else is predicted with it."""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pipeline_fixtures import dicom_exams, tiny_pipeline
from test_io_dicom import oblique_affine, write_dicom_series

from orthodiff.data.scan import scan_archive
from orthodiff.fileio import safe_filename
from orthodiff.pipeline.predict import run_prediction


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory)


def _copy_exam(source: Path, target: Path, study_id: str | None = None, drop_uid: bool = False) -> Path:
    """A copy of a DICOM exam, its StudyID set and its StudyInstanceUID removed when asked."""
    import pydicom

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.nii.gz"))
    if study_id is not None or drop_uid:
        for path in target.rglob("*.dcm"):
            dataset = pydicom.dcmread(path)
            if study_id is not None:
                dataset.StudyID = study_id
            if drop_uid:
                del dataset.StudyInstanceUID
            dataset.save_as(path)
    return target


def _predictions(out: Path) -> dict:
    """{folder name: prediction.json} of every study folder in ``out``."""
    return {p.name: json.loads((p / "prediction.json").read_text()) for p in sorted(out.iterdir()) if p.is_dir()}


def _write_exam_without_uid(folder: Path, series_base: str) -> None:
    image = np.arange(8 * 8 * 4, dtype=float).reshape(8, 8, 4)
    for number, plane in enumerate(("axial", "sagittal")):
        write_dicom_series(folder / plane, image, oblique_affine(plane), series_uid=f"{series_base}.{number}",
                           tags={"PatientID": "ANON", "StudyID": "1", "StudyInstanceUID": ""})


def test_scan_keeps_exams_sharing_a_study_id_without_uid_apart(tmp_path):
    for site, base in (("siteA", "1.1"), ("siteB", "2.1")):
        _write_exam_without_uid(tmp_path / "archive" / site / "exam", base)
    frame = scan_archive(tmp_path / "archive", tmp_path / "m.csv").manifest
    assert frame["study_id"].nunique() == 2
    for _, rows in frame.groupby("study_id"):
        assert sorted(rows["plane"]) == ["axial", "sagittal"]  # each exam whole, from one folder only
        assert rows["path"].map(lambda p: Path(p).parent.parent).nunique() == 1
    assert sorted(frame["study_id"].unique()) == ["siteA/exam/1", "siteB/exam/1"]
    # one exam alone keeps its readable StudyID
    alone = scan_archive(tmp_path / "archive" / "siteA", tmp_path / "a.csv").manifest
    assert set(alone["study_id"]) == {"1"} and len(alone) == 2


def test_predict_keeps_exams_sharing_a_study_id_without_uid_apart(built, tmp_path_factory, tmp_path):
    exams = sorted(dicom_exams(tmp_path_factory).glob("P*/knee-*"))
    for number, exam in enumerate(exams):
        _copy_exam(exam, tmp_path / "in" / f"site{number}" / "exam", study_id="1", drop_uid=True)
    run_prediction(built["pipeline"], [tmp_path / "in"], tmp_path / "out", explain=False, progress=False)
    predictions = _predictions(tmp_path / "out")
    assert len(predictions) == 2
    for summary in predictions.values():
        sources = {Path(entry["source"]).parent.parent.name for entry in summary["series"].values()}
        assert len(sources) == 1, f"{summary['study_id']} mixes exams"
        assert not any("ignored" in note for note in summary["notes"])


def test_a_folder_named_like_another_studys_clean_name_never_overwrites_it(built, tmp_path):
    manifest = pd.read_parquet(built["manifest"])
    one = manifest[manifest["study_id"] == "knee-0001"]
    crafted = safe_filename("a b")  # what "a b" is written as
    rows = pd.concat([one.assign(study_id="a b", series_id="a b/" + one["series_id"]),
                      one.assign(study_id=crafted, series_id=crafted + "/" + one["series_id"])])
    rows.to_csv(tmp_path / "two.csv", index=False)
    result = run_prediction(built["pipeline"], [tmp_path / "two.csv"], tmp_path / "out", explain=False, progress=False)
    assert result.studies == ["a b"]
    assert json.loads((tmp_path / "out" / crafted / "prediction.json").read_text())["study_id"] == "a b"
    refused = [e for e in result.errors if e["study_id"] == crafted]
    assert len(refused) == 1 and "already holds the prediction of study a b" in refused[0]["reason"]
    # a folder in OUT that is not a prediction of the study is not overwritten either
    foreign = tmp_path / "out2" / "knee-0001"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep me\n")
    one.to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(Exception, match="no study could be predicted"):
        run_prediction(built["pipeline"], [tmp_path / "one.csv"], tmp_path / "out2", explain=False, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["mine.txt"]
    # a rerun replaces the study's own earlier prediction
    again = run_prediction(built["pipeline"], [tmp_path / "two.csv"], tmp_path / "out", explain=False, progress=False)
    assert again.studies == ["a b"]


def test_a_dicom_study_predicts_the_same_alone_and_beside_one_with_its_study_id(built, tmp_path_factory, tmp_path):
    exams = sorted(dicom_exams(tmp_path_factory).glob("P*/knee-*"))
    first = _copy_exam(exams[0], tmp_path / "a" / "exam", study_id="1")
    second = _copy_exam(exams[1], tmp_path / "b" / "exam", study_id="1")
    run_prediction(built["pipeline"], [first], tmp_path / "alone", explain=False, progress=False)
    run_prediction(built["pipeline"], [second, first], tmp_path / "both", explain=False, progress=False)
    alone, both = _predictions(tmp_path / "alone"), _predictions(tmp_path / "both")
    assert len(alone) == 1 and len(both) == 2
    name = next(iter(alone))
    assert name in both and name.startswith("1-")
    assert both[name]["labels"] == alone[name]["labels"]  # exactly equal probabilities
    assert {Path(e["source"]).parent for e in both[name]["series"].values()} == {first}


def test_a_nifti_exam_predicts_the_same_as_a_folder_and_as_files(built, tmp_path):
    exam = tmp_path / "exam1"
    shutil.copytree(built["archive"] / "P0001" / "knee-0001", exam)
    as_folder = run_prediction(built["pipeline"], [exam], tmp_path / "folder", explain=False, progress=False)
    files = sorted(p for p in exam.glob("*.nii.gz") if "_seg" not in p.name)
    as_files = run_prediction(built["pipeline"], files, tmp_path / "files", explain=False, progress=False)
    assert as_folder.studies == as_files.studies and as_folder.studies[0].startswith("exam1-")
    folder, from_files = _predictions(tmp_path / "folder"), _predictions(tmp_path / "files")
    assert folder.keys() == from_files.keys()
    name = next(iter(folder))
    assert folder[name]["labels"] == from_files[name]["labels"]
    assert [e["series_id"] for e in folder[name]["series"].values()] == [
        e["series_id"] for e in from_files[name]["series"].values()]


def test_an_exam_given_twice_is_predicted_once_and_named_as_repeated(built, tmp_path_factory, tmp_path, monkeypatch):
    exam = _copy_exam(sorted(dicom_exams(tmp_path_factory).glob("P*/knee-*"))[0], tmp_path / "exam")
    monkeypatch.chdir(tmp_path)
    result = run_prediction(built["pipeline"], ["exam", exam, exam / "sagittal"], tmp_path / "out", explain=False,
                            progress=False)
    assert len(result.studies) == 1
    summary = _predictions(tmp_path / "out")[safe_filename(result.studies[0])]
    assert summary["planes_used"] == ["sagittal", "coronal", "axial"]
    assert not any("ignored" in note for note in summary["notes"])
    reasons = [e["reason"] for e in result.errors]
    assert len(reasons) == 2
    assert reasons[0] == f"{exam}: the same input as exam, given again; read once"
    assert "is also in the input" in reasons[1] and str(exam.resolve()) in reasons[1]


def test_a_staging_folder_of_a_killed_run_is_removed_by_the_next_run(built, tmp_path_factory, tmp_path):
    exam = sorted(dicom_exams(tmp_path_factory).glob("P*/knee-*"))[0]
    out = tmp_path / "out"
    first = run_prediction(built["pipeline"], [exam], out, explain=False, progress=False)
    folder = out / safe_filename(first.studies[0])
    # what kill -9 leaves a moment ago: a half-written staging folder and a folder set aside
    staging = out / f".{folder.name}.k3j_x9q2.tmp"
    aside = out / f".{folder.name}.old-4242"
    for leftover in (staging, aside):
        leftover.mkdir()
        (leftover / "segmentation_sagittal.nii.gz").write_bytes(b"half")
    foreign = out / ".mine"
    foreign.mkdir()
    before = json.loads((folder / "prediction.json").read_text())
    time.sleep(0.01)
    second = run_prediction(built["pipeline"], [exam], out, explain=False, progress=False)
    assert not staging.exists() and not aside.exists() and foreign.exists()
    assert any("removed 2 unfinished staging folder(s)" in note for note in second.notes)
    assert "removed 2 unfinished staging folder(s)" in second.describe()
    assert json.loads((folder / "prediction.json").read_text())["labels"] == before["labels"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".mine", ".predict.lock"]
    assert os.listdir(folder) and not [p for p in folder.rglob("*") if p.name.startswith(".")]
