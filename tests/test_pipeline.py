"""OrthoDiffusionPipeline: assembled from real fine-tuning runs, saved, reloaded, refused when foreign."""

import json
import shutil

import numpy as np
import pytest
import torch
from pipeline_fixtures import tiny_pipeline

from orthodiff.errors import OrthodiffError
from orthodiff.io.volume import read_volume
from orthodiff.pipeline.pipeline import CONFIG_NAME, OrthoDiffusionPipeline
from orthodiff.planes import PLANES


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory)


@pytest.fixture(scope="session")
def study_volumes(built):
    folder = built["archive"] / "P0001" / "knee-0001"
    return {plane: read_volume(folder / f"{plane}.nii.gz") for plane in PLANES}


def test_save_then_load_gives_identical_predictions(built, study_volumes, tmp_path):
    assembled = OrthoDiffusionPipeline.from_runs(built["classify"], built["segment"])
    assembled.save_pretrained(tmp_path / "copy")
    loaded = OrthoDiffusionPipeline.from_pretrained(tmp_path / "copy")
    first = assembled.predict_study(study_volumes, "knee-0001")
    second = loaded.predict_study(study_volumes, "knee-0001")
    assert first.probabilities == second.probabilities
    assert first.decisions == second.decisions
    for plane in PLANES:
        assert np.array_equal(first.series[plane].segmentation, second.series[plane].segmentation)
        for label in loaded.labels:
            assert np.array_equal(first.series[plane].heatmaps[label], second.series[plane].heatmaps[label])
    # Only JSON and safetensors: nothing that would be unpickled.
    suffixes = {path.suffix for path in (tmp_path / "copy").rglob("*") if path.is_file()}
    assert suffixes == {".json", ".safetensors"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_pipeline_carries_labels_classes_thresholds_and_preprocessing(built):
    config = json.loads((built["pipeline"] / CONFIG_NAME).read_text())
    assert config["format"] == "orthodiff-pipeline" and config["version"] == 1
    assert config["labels"] == ["blob", "rim"]
    assert config["classes"] == ["background", "blob", "rim"]
    assert config["preprocessing"]["plane_size"] == {p: [8, 16, 16] for p in PLANES}
    # The segment probe read the same frozen pretrained denoisers: stored once.
    assert config["segmenter"]["denoisers"] == "denoisers"
    assert not (built["pipeline"] / "segment_denoisers").exists()
    # Thresholds are chosen on the classify run's validation predictions (Youden's J).
    import pandas as pd

    from orthodiff.evaluation.classification import choose_thresholds

    frame = pd.read_csv(built["classify"] / "predictions.csv", dtype={"patient_id": str})
    expected = choose_thresholds(frame[frame["split"] == "val"], ["blob", "rim"])
    assert {k: v["value"] for k, v in config["thresholds"].items()} == {k: v["value"] for k, v in expected.items()}


def test_thresholds_come_from_the_evaluation_when_it_exists(built, tmp_path):
    from orthodiff.pipeline.runs import run_thresholds

    run = tmp_path / "run"
    shutil.copytree(built["classify"], run)
    (run / "eval").mkdir()
    saved = {"blob": {"value": 0.3, "source": "val Youden J"}, "rim": {"value": 0.7, "source": "val Youden J"}}
    (run / "eval" / "metrics.json").write_text(json.dumps({"thresholds": saved}))
    chosen = run_thresholds(run, ["blob", "rim"])
    assert chosen["blob"]["value"] == 0.3 and chosen["rim"]["value"] == 0.7


def test_another_format_version_is_refused_in_one_line(built, tmp_path):
    copy = tmp_path / "future"
    shutil.copytree(built["pipeline"], copy)
    config = json.loads((copy / CONFIG_NAME).read_text())
    config["version"] = 2
    (copy / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(OrthodiffError, match="version 2") as info:
        OrthoDiffusionPipeline.from_pretrained(copy)
    assert "\n" not in str(info.value)
    with pytest.raises(OrthodiffError, match="not an orthodiff pipeline"):
        OrthoDiffusionPipeline.from_pretrained(built["root"] / "cache")


def test_a_study_without_its_axial_series_predicts_from_the_others(built, study_volumes):
    pipeline = OrthoDiffusionPipeline.from_pretrained(built["pipeline"])
    partial = {p: v for p, v in study_volumes.items() if p != "axial"}
    result = pipeline.predict_study(partial, "knee-0001")
    assert result.planes_used == ["sagittal", "coronal"]
    assert "axial" in result.planes_missing and "no axial series" in result.planes_missing["axial"]
    assert set(result.series) == {"sagittal", "coronal"}
    assert all(0 < p < 1 for p in result.probabilities.values())
    with pytest.raises(OrthodiffError, match="no usable series"):
        pipeline.predict_study({}, "empty")


def test_predictions_learned_the_visible_label(built):
    """The blob label is plainly visible; even this tiny pipeline ranks blob studies higher."""
    pipeline = OrthoDiffusionPipeline.from_pretrained(built["pipeline"])
    labels = __import__("pandas").read_csv(built["archive"] / "labels.csv").set_index("study_id")["blob"]
    probs = {}
    for folder in sorted(built["archive"].glob("P*/knee-*"))[:8]:
        volumes = {p: read_volume(folder / f"{p}.nii.gz") for p in PLANES if (folder / f"{p}.nii.gz").exists()}
        probs[folder.name] = pipeline.predict_study(volumes, folder.name, explain=False, segment=False).probabilities["blob"]
    positives = [probs[s] for s in probs if labels[s] == 1]
    negatives = [probs[s] for s in probs if labels[s] == 0]
    assert np.mean(positives) > np.mean(negatives)


def test_gradcam_maps_explain_both_decisions():
    """Evidence for and against a label are the two signs of one map: disjoint, and not both empty."""
    from orthodiff.heads import MultiLabelClassifier
    from orthodiff.pipeline.gradcam import gradcam_maps

    torch.manual_seed(0)
    classifier = MultiLabelClassifier(dict.fromkeys(PLANES, 8), ["a", "b"]).eval()
    maps = {p: torch.randn(1, 8, 2, 4, 4) for p in PLANES}
    present = torch.ones(1, 3, dtype=torch.bool)
    positive = gradcam_maps(classifier, maps, present, None, "coronal", (8, 16, 16), [True, True])
    negative = gradcam_maps(classifier, maps, present, None, "coronal", (8, 16, 16), [False, False])
    assert positive.shape == (2, 8, 16, 16)
    for label in range(2):
        both = positive[label] + negative[label]
        assert max(float(positive[label].max()), float(negative[label].max())) == pytest.approx(1.0)
        assert float(both.min()) < float(both.max())  # not constant
        # Where one shows evidence the other does not: the two maps are anti-correlated.
        assert np.corrcoef(positive[label].flatten(), negative[label].flatten())[0, 1] < 0


def test_heat_maps_reach_the_series_grid_as_to_source_geometry_does(built):
    from orthodiff.data.prepare import to_plane_tensor, to_source_geometry
    from orthodiff.pipeline.gradcam import maps_to_source

    volume = read_volume(built["archive"] / "P0001" / "knee-0001" / "coronal.nii.gz")
    _, tensor_affine = to_plane_tensor(volume, "coronal", (8, 16, 16))
    maps = np.random.default_rng(0).random((2, 8, 16, 16)).astype(np.float32)
    batched = maps_to_source(maps, tensor_affine, volume.array.shape, volume.affine)
    for index in range(2):
        one = to_source_geometry(maps[index], tensor_affine, volume.array.shape, volume.affine, is_label=False)
        np.testing.assert_allclose(batched[index], one, atol=1e-5)
    assert batched.shape == (2, *volume.array.shape) and batched.max() > 0


def test_an_ehr_head_predicts_as_it_was_trained(built, tmp_path):
    """A head with late EHR fusion, exported and given each study's metadata, gives the fine-tuning
    run's own probabilities: the pipeline encodes age/sex/height/weight as training did."""
    import pandas as pd
    from pipeline_fixtures import _overrides

    from orthodiff.config import load_config
    from orthodiff.data.datasets import StudyDataset
    from orthodiff.data.splits import load_splits
    from orthodiff.finetune.run import run_finetune

    run = tmp_path / "classify-ehr"
    run_finetune(load_config(["tiny"], _overrides(built["root"]) + [
        f"finetune.output_dir={run}", "finetune.task=classify", "finetune.use_ehr=true", "finetune.epochs=10"]))
    pipeline = OrthoDiffusionPipeline.from_runs(run)
    pipeline.save_pretrained(tmp_path / "pipeline")
    pipeline = OrthoDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    spec = pipeline.config["classifier"]
    assert spec["use_ehr"] and spec["ehr_columns"] == ["age", "sex", "height", "weight"]
    assert set(spec["ehr_stats"]) == {"age", "height", "weight"}

    metadata = pd.read_csv(built["archive"] / "metadata.csv").set_index("study_id")
    trained = pd.read_csv(run / "predictions.csv").set_index("study_id")
    # the encoding training used: the training patients' statistics, then each study's own values
    training = StudyDataset(built["cache"], load_splits(built["root"] / "splits.json").train)
    everyone = StudyDataset(built["cache"], ehr_stats=training.ehr_stats)
    checked, moved = 0, 0.0
    for study_id in trained.index[:6]:
        folder = built["archive"] / metadata.loc[study_id, "patient_id"] / study_id
        volumes = {p: read_volume(folder / f"{p}.nii.gz") for p in PLANES if (folder / f"{p}.nii.gz").exists()}
        # the scanned metadata (the tiny archive gives one patient conflicting sex: unknown after the scan)
        meta = everyone.study_row(study_id)[["age", "sex", "height", "weight"]].to_dict()
        encoded = pipeline.encode_ehr(meta).cpu()[0]
        assert torch.allclose(encoded, everyone.encode_ehr(everyone.study_row(study_id)), atol=1e-5)
        with_ehr = pipeline.predict_study(volumes, study_id, metadata=meta, explain=False, segment=False)
        # the cache and feature store hold float16; the pipeline computes in float32
        for label in pipeline.labels:
            assert with_ehr.probabilities[label] == pytest.approx(trained.loc[study_id, f"prob_{label}"], abs=0.01)
        without = pipeline.predict_study(volumes, study_id, metadata=None, explain=False, segment=False)
        moved = max(moved, max(abs(with_ehr.probabilities[n] - without.probabilities[n]) for n in pipeline.labels))
        checked += 1
    assert checked == 6
    assert moved > 1e-4, "the EHR values never changed a probability: the head ignores them"


# ------------------------------------------------------------------ damaged or edited pipelines
def _copy(built, tmp_path, name="copy"):
    copy = tmp_path / name
    shutil.copytree(built["pipeline"], copy)
    return copy


def _edit_config(folder, change):
    config = json.loads((folder / CONFIG_NAME).read_text())
    change(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _refused(folder, *fragments):
    with pytest.raises(OrthodiffError) as info:
        OrthoDiffusionPipeline.from_pretrained(folder)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_export_records_checksums_of_every_weight_file_and_the_spec(built):
    config = json.loads((built["pipeline"] / CONFIG_NAME).read_text())
    files = {p.relative_to(built["pipeline"]).as_posix() for p in built["pipeline"].rglob("*")
             if p.is_file() and p.name != CONFIG_NAME}
    assert set(config["checksums"]["files"]) == files
    assert "classifier.safetensors" in files and "denoisers/sagittal/model.safetensors" in files
    assert set(config["checksums"]["spec"]) >= {"classifier", "segmenter", "preprocessing", "labels"}


def test_a_truncated_weight_file_is_one_line_naming_it(built, tmp_path):
    copy = _copy(built, tmp_path)
    weights = copy / "classifier.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _refused(copy, str(weights), "export the pipeline again")
    # a pipeline saved before checksums were recorded: the reader still names the file
    _edit_config(copy, lambda c: c.pop("checksums"))
    _refused(copy, str(weights), "truncated or damaged")
    denoiser = copy / "denoisers" / "coronal" / "model.safetensors"
    shutil.copy(built["pipeline"] / "classifier.safetensors", weights)
    denoiser.write_bytes(denoiser.read_bytes()[:100])
    _refused(copy, str(copy / "denoisers"))


def test_a_missing_threshold_is_one_line(built, tmp_path):
    copy = _copy(built, tmp_path)
    _edit_config(copy, lambda c: c["thresholds"].pop("rim"))
    _refused(copy, "threshold of label 'rim' is missing")


def test_an_edited_head_spec_is_refused_instead_of_changing_probabilities(built, tmp_path):
    copy = _copy(built, tmp_path)

    def more_heads(config):
        config["classifier"]["attention_heads"] = int(config["classifier"].get("attention_heads", 4)) * 2

    _edit_config(copy, more_heads)
    _refused(copy, "classifier edited since export", "export the pipeline again")
    # thresholds are the operating point, not the model: editing them is allowed
    other = _copy(built, tmp_path, "thresholds")
    _edit_config(other, lambda c: c["thresholds"]["blob"].update(value=0.9))
    assert OrthoDiffusionPipeline.from_pretrained(other).thresholds["blob"] == 0.9
