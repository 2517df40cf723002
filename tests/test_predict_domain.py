"""``orthodiff predict`` says where an input is unlike the pipeline's training series (another
contrast, fat suppression, field strength, spacing, intensities) without changing a probability,
and refuses a pipeline.json whose labels are not the ones its head was saved with."""

import html
import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from pipeline_fixtures import SIDECAR, tiny_pipeline, write_sidecars

from orthodiff.errors import OrthodiffError
from orthodiff.fileio import safe_filename
from orthodiff.pipeline.pipeline import CONFIG_NAME, OrthoDiffusionPipeline
from orthodiff.pipeline.predict import UNKNOWN_DOMAIN, run_prediction
from orthodiff.planes import PLANES

EXAM = "exam"  # every variant keeps this folder name, so its study id (and feature noise) is the base's


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory)


@pytest.fixture(scope="session")
def training_study(built):
    """The first training study with all three planes, as its manifest rows."""
    manifest = pd.read_parquet(built["manifest"])
    train = set(json.loads((built["root"] / "splits.json").read_text())["train"])
    rows = manifest[manifest["patient_id"].isin(train)]
    complete = rows.groupby("study_id")["plane"].nunique()
    return rows[rows["study_id"] == complete[complete == 3].index[0]]


def _exam(root, source_rows, sidecar: dict, change_image=None, change_affine=None):
    """A copy of a study as ``root/exam/<plane>.nii.gz`` with sidecars, its images or affines changed."""
    folder = root / EXAM
    folder.mkdir(parents=True)
    for row in source_rows.itertuples():
        image = nib.load(row.path)
        array, affine = np.asarray(image.dataobj, np.float32), image.affine
        if change_image is not None:
            array = change_image(array)
        if change_affine is not None:
            affine = change_affine(affine)
        nib.save(nib.Nifti1Image(array, affine), folder / f"{row.plane}.nii.gz")
    write_sidecars(folder, sidecar)
    return folder


VARIANTS = {
    "base": {},
    "t2_fat_suppressed": {"sidecar": {"SeriesDescription": "T2 FS", "ScanOptions": ["FS"]}},
    "seven_tesla": {"sidecar": {"MagneticFieldStrength": 7.0}},
    "coarse_pixels": {"change_affine": lambda affine: affine @ np.diag([3.0, 3.0, 1.0, 1.0])},
    "scaled_and_offset": {"change_image": lambda array: array * 10.0 + 500.0},
    "inverted": {"change_image": lambda array: array.max() - array},
}


@pytest.fixture(scope="session")
def variants(built, training_study, tmp_path_factory):
    """Each variant of the training study predicted on its own: {name: (study folder, prediction.json)}."""
    first = training_study.iloc[0]
    # the input's own header: the training study's sequence, site and field strength
    header = {**SIDECAR, "InstitutionName": str(first["site"]), "MagneticFieldStrength": float(first["field_strength"])}
    root = tmp_path_factory.mktemp("domain-variants")
    found = {}
    for name, change in VARIANTS.items():
        exam = _exam(root / name / "in", training_study, {**header, **change.get("sidecar", {})},
                     change.get("change_image"), change.get("change_affine"))
        out = root / name / "out"
        (study,) = run_prediction(built["pipeline"], [exam], out, explain=False).studies
        found[name] = (out / safe_filename(study), json.loads((out / safe_filename(study) / "prediction.json").read_text()))
    return found


def _probabilities(summary):
    return {label: entry["probability"] for label, entry in summary["labels"].items()}


def _notes_everywhere(folder, summary) -> list[str]:
    """The notes of prediction.json, after checking that the CSV and the report hold each of them."""
    notes = [f"{plane}: {note}" for plane, items in summary["out_of_distribution"].items() for note in items]
    row = pd.read_csv(folder.parent / "predictions.csv", keep_default_na=False).iloc[0]
    assert row["out_of_distribution"] == "; ".join(notes)
    report = (folder / "report.html").read_text()
    for note in (note for items in summary["out_of_distribution"].values() for note in items):
        assert html.escape(note) in report
    return notes


def test_export_records_the_training_series_only(built, training_study):
    domain = json.loads((built["pipeline"] / CONFIG_NAME).read_text())["training_domain"]
    manifest = pd.read_parquet(built["manifest"])
    train = set(json.loads((built["root"] / "splits.json").read_text())["train"])
    for plane in PLANES:
        rows = manifest[manifest["patient_id"].isin(train) & (manifest["plane"] == plane)]
        record = domain["planes"][plane]
        assert record["series"] == len(rows) < (manifest["plane"] == plane).sum()
        assert record["contrasts"] == {"pd": len(rows)} and record["fat_suppressed"] == {"no": len(rows)}
        assert set(record["sites"]) == set(rows["site"])
        assert set(record["field_strengths"]) == {f"{v:g}" for v in rows["field_strength"]}
        assert record["manufacturers"] == {"Siemens": len(rows)}
        assert record["pixel_spacing"] == [1.0, 1.0] and record["slice_thickness"] == [3.0, 3.0]
        assert record["intensity"]["series"] == len(rows)
        assert all(lo <= med <= hi for lo, med, hi in zip(record["intensity"]["low"], record["intensity"]["median"],
                                                           record["intensity"]["high"]))


def test_a_training_like_series_gets_no_note(variants):
    out, summary = variants["base"]
    assert summary["out_of_distribution"] == {plane: [] for plane in PLANES}
    assert _notes_everywhere(out, summary) == []
    assert "Unlike the training data" not in (out / "report.html").read_text()


@pytest.mark.parametrize("name, expected", [
    ("t2_fat_suppressed", ["contrast t2, but the training series were pd", "fat-suppressed, but no training series was"]),
    ("seven_tesla", ["field strength 7 T, never seen in training"]),
    ("coarse_pixels", ["pixel spacing 3.00 x 3.00 mm, far outside the training range 1.00-1.00 mm"]),
])
def test_a_header_unlike_training_is_noted_and_changes_no_probability(variants, name, expected):
    out, summary = variants[name]
    notes = _notes_everywhere(out, summary)
    for plane in PLANES:
        for fragment in expected:
            assert any(note.startswith(f"{plane}: {fragment}") for note in notes), (fragment, notes)
    assert len(notes) == len(PLANES) * len(expected), notes
    # the tensor is the base's: the probabilities are identical to the last digit
    assert _probabilities(summary) == _probabilities(variants["base"][1])


def test_intensities_unlike_training_are_noted(variants):
    out, summary = variants["inverted"]
    notes = _notes_everywhere(out, summary)
    assert {note.split(":")[0] for note in notes} == set(PLANES)
    assert all("image intensities unlike the training scans" in note for note in notes)
    # a constant factor and offset are undone by the percentile scaling: the same tensor (up to float32
    # rounding of the rescaled voxels), so no note and the same probabilities
    out, summary = variants["scaled_and_offset"]
    assert _notes_everywhere(out, summary) == []
    assert _probabilities(summary) == pytest.approx(_probabilities(variants["base"][1]), abs=1e-3)


def _copy(built, tmp_path, change) -> object:
    copy = tmp_path / "pipeline"
    shutil.copytree(built["pipeline"], copy)
    config = json.loads((copy / CONFIG_NAME).read_text())
    change(config)
    (copy / CONFIG_NAME).write_text(json.dumps(config))
    return copy


def test_a_pipeline_without_a_domain_record_predicts_and_says_so_once(built, training_study, tmp_path):
    def older(config):
        config.pop("training_domain")
        config.pop("checksums")

    copy = _copy(built, tmp_path, older)
    folders = [training_study.iloc[0]["path"], built["archive"] / "P0001" / "knee-0001" / "sagittal.nii.gz"]
    result = run_prediction(copy, folders, tmp_path / "out", explain=False)
    assert len(result.studies) == 2 and result.notes == [UNKNOWN_DOMAIN]
    assert result.describe().count(UNKNOWN_DOMAIN) == 1
    for study in result.studies:
        summary = json.loads((tmp_path / "out" / safe_filename(study) / "prediction.json").read_text())
        assert summary["out_of_distribution"] is None
    table = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    assert list(table["out_of_distribution"]) == ["", ""]


@pytest.mark.parametrize("keep_checksums", [False, True])
def test_swapped_labels_are_refused_whatever_the_checksums_say(built, tmp_path, keep_checksums):
    def swap(config):
        config["labels"] = config["labels"][::-1]
        if not keep_checksums:
            config.pop("checksums")

    copy = _copy(built, tmp_path, swap)
    with pytest.raises(OrthodiffError) as info:
        OrthoDiffusionPipeline.from_pretrained(copy)
    message = str(info.value)
    assert "\n" not in message
    assert "pipeline.json labels ['rim', 'blob'] do not match the head's labels ['blob', 'rim']" in message
    assert "the pipeline was edited; export it again" in message


def test_a_renamed_label_is_an_edited_pipeline_not_a_missing_threshold(built, tmp_path):
    def rename(config):
        config["labels"] = ["blob", "tear"]

    copy = _copy(built, tmp_path, rename)
    with pytest.raises(OrthodiffError, match=r"labels \['blob', 'tear'\] do not match the head's labels "
                                             r"\['blob', 'rim'\].*the pipeline was edited; export it again") as info:
        run_prediction(copy, [built["archive"] / "P0001" / "knee-0001"], tmp_path / "out")
    assert "threshold" not in str(info.value)


def test_what_counts_as_different():
    """The comparison rules on one plane record: unknown values are not compared, spacing is far
    beyond 1.5 times the training range, names ignore case."""
    from orthodiff.pipeline.domain import compare_series

    record = {"contrasts": {"pd": 3, "other": 1}, "fat_suppressed": {"no": 4}, "field_strengths": {"1.5": 2, "3": 2},
              "sites": {"Mercy": 4}, "manufacturers": {"GE": 4}, "pixel_spacing": [0.4, 0.6], "slice_thickness": [3.0, 3.5]}
    image = np.zeros((4, 8, 8), np.float32)

    def notes(row, pixel=0.5, thickness=3.0):
        return compare_series(record, row, np.diag([pixel, pixel, thickness, 1.0]), image)

    known = {"contrast": "pd", "fat_suppressed": 0.0, "field_strength": 3.0, "site": "mercy ", "manufacturer": "ge"}
    assert notes(known) == []
    assert notes({"contrast": "other", "fat_suppressed": float("nan")}) == []  # neither is known
    assert notes({}, pixel=0.6 * 1.4, thickness=3.0 / 1.4) == []  # within the tolerance
    assert [n.split(" ")[0] for n in notes({}, pixel=0.6 * 1.6, thickness=3.0 / 1.6)] == ["pixel", "slice"]
    assert notes({**known, "field_strength": 1.0}) == ["field strength 1 T, never seen in training (1.5 T, 3 T)"]


def test_an_edited_training_domain_is_refused(built, tmp_path):
    copy = _copy(built, tmp_path, lambda config: config["training_domain"]["planes"]["axial"].update(sites={"Z": 1}))
    with pytest.raises(OrthodiffError, match="training_domain edited since export"):
        OrthoDiffusionPipeline.from_pretrained(copy)
