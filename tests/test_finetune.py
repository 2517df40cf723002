"""Fine-tuning runs on a tiny prepared project: probes, grid, partial fine-tuning, segmentation,
the run directory contract, reproducibility and the bad-input messages."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_archive import one_torch_thread, shared_tiny_project, tiny_config  # noqa: F401 (autouse fixture)

from orthodiff.errors import OrthodiffError
from orthodiff.finetune.run import run_finetune
from orthodiff.finetune.scoring import auroc_scores

PROBE = ["finetune.pooling=mean", "finetune.epochs=8", "finetune.learning_rate=3e-3"]


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    return shared_tiny_project(tmp_path_factory)


@pytest.fixture(scope="module")
def probe_run(project, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    return out, run_finetune(tiny_config(project, out, *PROBE))


def _split_patients(project):
    splits = json.loads(project["splits"].read_text())
    return splits


def test_probe_learns_a_visible_signal_on_held_out_patients(probe_run):
    _, result = probe_run
    predictions = pd.read_csv(result.run_dir / "predictions.csv")
    test = predictions[predictions["split"] == "test"]
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(test["label_blob"], test["prob_blob"]) > 0.8
    assert result.metrics["test"]["auroc"]["blob"] > 0.8
    assert "test macro auroc" in result.describe()


def test_run_directory_follows_the_contract(probe_run, project):
    _, result = probe_run
    run = result.run_dir
    info = json.loads((run / "run.json").read_text())
    for key in ("task", "labels", "classes", "cache", "splits", "labels_fraction", "init", "mode"):
        assert key in info
    assert info["task"] == "classify" and info["labels"] == ["blob", "rim"] and info["mode"] == "probe"
    assert (run / "config.yaml").exists()
    predictions = pd.read_csv(run / "predictions.csv", dtype={"study_id": str, "patient_id": str})
    assert list(predictions.columns) == [
        "study_id", "patient_id", "split", "site", "field_strength",
        "prob_blob", "prob_rim", "label_blob", "label_rim",
    ]
    splits = _split_patients(project)
    assert set(predictions["split"]) == {"val", "test"}
    for split in ("val", "test"):
        assert set(predictions.loc[predictions["split"] == split, "patient_id"]) == set(splits[split])
    assert predictions[["prob_blob", "prob_rim"]].apply(lambda c: c.between(0, 1)).all().all()
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 8 and {"epoch", "train_loss", "val_macro_auroc"} <= set(log[0])
    per_patient = pd.read_csv(run / "predictions_patient.csv")
    assert len(per_patient) == len(splits["val"]) + len(splits["test"])
    # The evaluation stage's reader accepts it.
    from orthodiff.evaluation.rundir import read_run

    assert read_run(run).labels == ["blob", "rim"]


def test_same_seed_gives_the_same_predictions(probe_run, project, tmp_path):
    out, result = probe_run
    again = run_finetune(tiny_config(project, out, *PROBE, f"finetune.output_dir={tmp_path / 'again'}"))
    first = pd.read_csv(result.run_dir / "predictions.csv")
    second = pd.read_csv(again.run_dir / "predictions.csv")
    pd.testing.assert_frame_equal(first, second)


def test_features_read_per_batch_give_the_same_predictions(probe_run, project, tmp_path, monkeypatch):
    """A store too large for memory is read batch by batch: the run's predictions are the same."""
    from orthodiff.finetune import probe

    out, result = probe_run
    monkeypatch.setattr(probe, "MEMORY_SHARE", 0.0)
    streamed = run_finetune(tiny_config(project, out, *PROBE, f"finetune.output_dir={tmp_path / 'streamed'}"))
    pd.testing.assert_frame_equal(pd.read_csv(result.run_dir / "predictions.csv"),
                                  pd.read_csv(streamed.run_dir / "predictions.csv"))


def test_grid_picks_the_best_validation_cell_and_records_it(project, tmp_path):
    cfg = tiny_config(project, tmp_path, *PROBE, "finetune.mode=grid", "finetune.epochs=3",
                      "finetune.grid_learning_rates=[3e-3,1e-7]", "features.blocks=[mid,down1]")
    result = run_finetune(cfg)
    grid = json.loads((result.run_dir / "run.json").read_text())["grid"]
    planes = grid["planes"]
    assert set(planes) == {"sagittal", "coronal", "axial"}
    for plane, record in planes.items():
        # Every (block, lr) of the plane search is recorded with its validation score.
        assert {(c["block"], c["learning_rate"]) for c in record["cells"]} == {
            ("mid", 3e-3), ("mid", 1e-7), ("down1", 3e-3), ("down1", 1e-7)}
        assert all(c["plane"] == plane and c["stage"] == "plane" for c in record["cells"])
        best_key = max(record["scores"], key=lambda k: record["scores"][k])
        assert record["chosen"] == [best_key] == grid["chosen"][plane]
        assert record["scores"][best_key] == max(c["val_macro_auroc"] for c in record["cells"])
    fused = grid["fused"]
    assert {c["learning_rate"] for c in fused} == {3e-3, 1e-7}
    assert all(c["selection"] == grid["chosen"] for c in fused)
    best = max(fused, key=lambda c: c["val_macro_auroc"])
    assert grid["best"]["val_macro_auroc"] == best["val_macro_auroc"] == result.choice["val_macro_auroc"]
    assert "Grid chose per plane" in result.describe()
    log = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == (12 + 2) * 3  # every cell logged every epoch
    head = json.loads((result.run_dir / "head.json").read_text())
    assert head["features"]["selection"] == grid["chosen"]


def _plant_signals(store_dir, cache, signal_block: dict, noise_block: dict):
    """Rewrite a feature store so that each plane's labels show only in ``signal_block[plane]``."""
    from orthodiff.data.cache import PlaneCache
    from orthodiff.features.store import FeatureStore

    store = FeatureStore(store_dir)
    labels = PlaneCache(cache).index.drop_duplicates("study_id").set_index("study_id")
    rng = np.random.default_rng(0)
    for plane in store.planes:
        rows = store.rows(plane)
        blob = labels.loc[rows["study_id"], "label_blob"].to_numpy(dtype=float)
        rim = labels.loc[rows["study_id"], "label_rim"].to_numpy(dtype=float)
        for block in (signal_block[plane], noise_block[plane]):
            path = store.root / store.entries[plane][f"{block}@100"]["file"]
            array = np.load(path)
            fresh = rng.normal(size=array.shape)
            if block == signal_block[plane]:
                fresh[:, 0] += 4 * np.nan_to_num(blob)[:, None, None, None]
                fresh[:, 1] += 4 * np.nan_to_num(rim)[:, None, None, None]
            np.save(path, fresh.astype(array.dtype))


def test_grid_chooses_features_per_plane_where_each_plane_carries_its_signal(project, tmp_path):
    overrides = [*PROBE, "finetune.mode=grid", "finetune.epochs=8", "finetune.grid_learning_rates=[5e-2]",
                 "features.blocks=[mid,down1]"]
    from orthodiff.features.store import run_extraction

    store_dir = run_extraction(tiny_config(project, tmp_path, *overrides))
    signal = {"sagittal": "mid", "coronal": "down1", "axial": "down1"}
    noise = {"sagittal": "down1", "coronal": "mid", "axial": "mid"}
    _plant_signals(store_dir, project["cache"], signal, noise)
    result = run_finetune(tiny_config(project, tmp_path, *overrides))
    grid = json.loads((result.run_dir / "run.json").read_text())["grid"]
    assert grid["chosen"] == {plane: [f"{signal[plane]}@100"] for plane in signal}
    for plane, record in grid["planes"].items():
        assert record["scores"][f"{signal[plane]}@100"] > record["scores"][f"{noise[plane]}@100"]
    assert result.metrics["test"]["macro_auroc"] > 0.9

    # concat_features=2 of 2 pairs: nothing to search; every plane reads both, concatenated.
    both = run_finetune(tiny_config(project, tmp_path, *overrides, "finetune.concat_features=2",
                                    f"finetune.output_dir={tmp_path / 'both'}"))
    grid = json.loads((both.run_dir / "run.json").read_text())["grid"]
    assert grid["chosen"] == {plane: ["mid@100", "down1@100"] for plane in signal} and grid["planes"] == {}
    assert both.metrics["test"]["macro_auroc"] > 0.9


@pytest.mark.parametrize("pooling", ["attention_max", "grid"])
def test_probe_runs_with_local_evidence_pooling(project, tmp_path, pooling):
    result = run_finetune(tiny_config(project, tmp_path, f"finetune.pooling={pooling}", "finetune.epochs=3",
                                      "finetune.readout_grid=[1,2,2]"))
    info = json.loads((result.run_dir / "run.json").read_text())
    head = json.loads((result.run_dir / "head.json").read_text())
    assert info["pooling"] == head["pooling"] == pooling and head["readout_grid"] == [1, 2, 2]
    assert info["features"]["selection"] == {plane: ["mid@100"] for plane in ("sagittal", "coronal", "axial")}
    assert result.metrics["test"]["macro_auroc"] is not None


def test_probe_trains_by_the_shared_step_budget(project, tmp_path):
    """With finetune.max_steps the probe trains exactly that many optimizer steps (the budget every
    method gets), validating every eval_every steps; patience stops it once it stops improving."""
    budget = run_finetune(tiny_config(project, tmp_path / "budget", *PROBE, "finetune.max_steps=7",
                                      "finetune.eval_every=3"))
    rows = [json.loads(line) for line in (budget.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "step" in row]
    assert steps == [3, 6, 7]
    info = json.loads((budget.run_dir / "run.json").read_text())
    assert info["best_step"] in steps

    patient = run_finetune(tiny_config(project, tmp_path / "patience", *PROBE, "finetune.max_steps=400",
                                       "finetune.eval_every=1", "finetune.patience=2",
                                       "finetune.learning_rate=0"))  # a frozen head never improves
    rows = [json.loads(line) for line in (patient.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "step" in row] == [1, 2, 3]


def test_concat_features_out_of_range_is_refused(project, tmp_path):
    with pytest.raises(OrthodiffError, match="finetune.concat_features=3"):
        run_finetune(tiny_config(project, tmp_path, *PROBE, "finetune.concat_features=3",
                                 "features.blocks=[mid,down1]"))
    with pytest.raises(OrthodiffError, match="finetune.concat_features=2: concatenated features are for probe"):
        run_finetune(tiny_config(project, tmp_path, "finetune.mode=partial", "finetune.concat_features=2"))


def test_partial_finetuning_trains_and_predicts_studies_missing_a_plane(project, tmp_path):
    cfg = tiny_config(project, tmp_path, "finetune.mode=partial", "finetune.epochs=1", "finetune.augment=true",
                      "finetune.fusion=gated", "finetune.use_ehr=true", "finetune.labels_fraction=0.5")
    result = run_finetune(cfg)
    run = result.run_dir
    info = json.loads((run / "run.json").read_text())
    predictions = pd.read_csv(run / "predictions.csv", dtype={"study_id": str})
    from orthodiff.data.cache import PlaneCache

    index = PlaneCache(project["cache"]).index
    lacking = set(index["study_id"]) - set(index.loc[index["plane"] == "axial", "study_id"])
    assert lacking & set(predictions["study_id"])  # studies without an axial plane are predicted
    assert np.isfinite(predictions[["prob_blob", "prob_rim"]].to_numpy()).all()
    assert info["patients"]["train"] == len(json.loads(project["splits"].read_text())["subsets"]["0.5"])
    assert info["augment"] is True
    weights = info["explain"]["plane_weights"]["blob"]
    assert abs(sum(weights.values()) - 1) < 1e-5
    assert 0 < info["explain"]["ehr_image_weight"]["blob"] < 1
    assert (run / "denoisers" / "sagittal" / "model.safetensors").exists()


def test_segmentation_run_writes_the_contract(project, tmp_path):
    cfg = tiny_config(project, tmp_path, "finetune.task=segment", "finetune.mode=probe", "finetune.epochs=1",
                      "finetune.learning_rate=1e-2", "finetune.source_geometry=true")
    result = run_finetune(cfg)
    run = result.run_dir
    info = json.loads((run / "run.json").read_text())
    assert info["task"] == "segment" and info["classes"] == ["background", "blob", "rim"]
    index = pd.read_csv(run / "segmentations" / "index.csv")
    assert list(index.columns) == ["series_id", "study_id", "patient_id", "split", "site", "field_strength",
                                   "plane", "pred", "target", "spacing", "pred_source"]
    assert set(index["split"]) == {"val", "test"}
    row = index.iloc[0]
    pred, target = np.load(run / row["pred"]), np.load(run / row["target"])
    assert pred.dtype == target.dtype == np.uint8 and pred.shape == target.shape == (8, 16, 16)
    assert len(json.loads(row["spacing"])) == 3
    from tiny_archive import SHAPE

    assert np.load(run / row["pred_source"]).shape == SHAPE  # back on the series' own voxel grid
    assert result.metrics["test"]["mean_dice"] is not None
    from orthodiff.evaluation.rundir import read_run

    assert read_run(run).task == "segment"


def test_unknown_labels_and_modes_are_refused(project, tmp_path):
    with pytest.raises(OrthodiffError, match=r"labels \['acl'\] are not in the manifest"):
        run_finetune(tiny_config(project, tmp_path, "data.labels=[acl]"))
    with pytest.raises(OrthodiffError, match="finetune.mode"):
        run_finetune(tiny_config(project, tmp_path, "finetune.mode=linear"))
    with pytest.raises(OrthodiffError, match="labels fraction 0.3"):
        run_finetune(tiny_config(project, tmp_path, "finetune.labels_fraction=0.3"))


def test_undefined_auroc_is_a_named_warning_not_a_nan():
    frame = pd.DataFrame({
        "split": ["val"] * 4, "patient_id": list("abcd"),
        "prob_x": [0.1, 0.2, 0.8, 0.9], "label_x": [0, 0, 1, 1],
        "prob_y": [0.5, 0.4, 0.3, 0.2], "label_y": [0, 0, 0, 0],
    })
    scores, macro, warnings = auroc_scores(frame, ["x", "y"], "val")
    assert scores == {"x": 1.0, "y": None} and macro == 1.0
    assert warnings == ["label 'y' has no positive patient in val: AUROC undefined, left out of the val macro AUROC"]


SCRIPTS = Path(__file__).parent / "scripts"
TWO_RANK_CASES = ("partial-mid", "full-mid", "partial-down0", "full-down1", "segment-full", "dynunet", "resnet3d")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_finetune_in_step_and_agree(project, tmp_path):
    """partial/full at mid and at a down block, decoder segmentation and DynUNet with the second rank's
    batches lacking segmentations, the ResNet baseline: every case takes the budget's steps on both ranks,
    ends with the same weights on both, and the main process alone writes the run directory, with one
    metrics row per validation. A probe grid trains on the main process alone and chooses what one
    process chooses."""
    import os
    import subprocess
    import sys

    paths = {key: value if isinstance(value, dict) else str(value) for key, value in project.items()}
    (tmp_path / "project.json").write_text(json.dumps(paths))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(SCRIPTS / "finetune_two_ranks.py"), str(tmp_path / "project.json"),
               str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for case in TWO_RANK_CASES:
        ranks = [json.loads((tmp_path / case / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
        assert ranks[0]["steps"] == ranks[1]["steps"] == 3, case
        stripped = case in ("segment-full", "dynunet")
        assert [r["steps_without_loss"] for r in ranks] == ([0, 3] if stripped else [0, 0]), case
        assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6), case
        rows = [json.loads(line) for line in (tmp_path / case / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [2, 3], case
        assert ranks[1]["written"] == [], case
        assert {"config.yaml", "metrics.jsonl", "run.json"} <= set(ranks[0]["written"]), case

    grid_ranks = [json.loads((tmp_path / "grid" / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert grid_ranks[0]["probe_cells"] > 0 and "probe_cells" not in grid_ranks[1]
    assert grid_ranks[1]["written"] == [] and "run.json" in grid_ranks[0]["written"]
    # one process, with the two-process run's config and feature store, chooses the same cell with the
    # same scores and predictions
    from orthodiff.config import load_config

    two = tmp_path / "grid" / "run"
    one = run_finetune(load_config([two / "config.yaml"], [f"finetune.output_dir={tmp_path / 'one'}"])).run_dir
    grids = [json.loads((run / "run.json").read_text())["grid"] for run in (two, one)]
    assert grids[0]["best"] == grids[1]["best"] and grids[0]["chosen"] == grids[1]["chosen"]
    assert grids[0]["planes"] == grids[1]["planes"]
    assert (two / "predictions.csv").read_text() == (one / "predictions.csv").read_text()


class _RecordedStore:
    """A feature store of 7 studies (rows stored in reverse) that records how many rows each read asks for."""

    planes = ("sagittal",)

    def __init__(self):
        self.values = np.random.default_rng(0).normal(size=(7, 2, 1, 2, 2)).astype(np.float32)
        self.reads = []

    def rows(self, plane):
        return pd.DataFrame({"study_id": [f"s{i}" for i in range(7)], "row": list(range(7))[::-1]})

    def keys(self):
        return [("mid", "25")]

    def shape(self, plane, block, spec):
        return self.values.shape[1:]  # one study's (C, d, h, w), as FeatureStore.shape

    def array(self, plane, block, spec):
        store = self

        class Recorded:
            shape = store.values.shape

            def __getitem__(self, rows):
                store.reads.append(len(rows))
                return store.values[rows]
        return Recorded()


RUN_STUDIES = ["s3", "missing", "s0", "s6", "s1"]


def test_cached_features_read_a_few_studies_at_a_time_into_the_same_float16_maps(monkeypatch):
    """The probe holds each map as float16 for the run's studies; it reads the feature file in chunks
    so the whole map never sits in memory as float32 too, and the result is the same as one read."""
    from types import SimpleNamespace

    import torch

    from orthodiff.finetune import probe

    store = _RecordedStore()
    monkeypatch.setattr(probe, "LOAD_CHUNK", 2)
    features = probe.CachedFeatures(store, SimpleNamespace(frame=pd.DataFrame({"study_id": RUN_STUDIES})))
    assert features.in_memory  # 7 tiny maps fit
    maps = features.map("sagittal", "mid@25")
    assert store.reads == [2, 2]  # four present studies, two at a time
    expected = torch.from_numpy(store.values[[3, 6, 0, 5]].astype(np.float16))  # rows are stored in reverse
    assert maps.dtype == torch.float16
    assert torch.equal(maps[[0, 2, 3, 4]], expected) and not maps[1].any()


def test_features_larger_than_the_memory_budget_are_read_per_batch_with_the_same_values():
    """A store that does not fit in memory is read batch by batch from its memory-mapped files; the
    batches equal those of the maps held in memory, a missing plane included."""
    from types import SimpleNamespace

    import torch

    from orthodiff.finetune import probe

    studies = SimpleNamespace(frame=pd.DataFrame({"study_id": RUN_STUDIES}))
    held = probe.CachedFeatures(_RecordedStore(), studies)
    store = _RecordedStore()
    streamed = probe.CachedFeatures(store, studies, memory_budget=0)
    assert held.in_memory and not streamed.in_memory
    assert streamed.channels({"sagittal": ["mid@25"]}) == {"sagittal": 2}
    for indices in ([4, 1, 0], [2], [1]):
        mine, present = streamed.batch({"sagittal": ["mid@25"]}, indices, torch.device("cpu"))
        theirs, present_held = held.batch({"sagittal": ["mid@25"]}, indices, torch.device("cpu"))
        assert torch.equal(mine["sagittal"], theirs["sagittal"]) and torch.equal(present, present_held)
    assert store.reads == [2, 1]  # only the batch's present studies, never the whole map (none for "missing")
