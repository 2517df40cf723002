"""The bench protocol: a separate unlabeled pool, headline labels with enough test positives, seed
and patient intervals, the floors, recorded training curves and the shared pretraining cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orthodiff.bench import run_bench
from orthodiff.bench.presets import resolve_preset
from orthodiff.bench.report.protocol import label_counts, low_label_shortfalls, protocol_lines, short_test_set
from orthodiff.bench.report.results import Pooler
from orthodiff.data.splits import load_splits, make_splits
from orthodiff.errors import OrthodiffError

# two processes run the two methods' cells side by side
GRID = ["seeds=[0]", "fractions=[1.0,0.5]", "methods=[orthodiff-probe,raw-voxels]", "segment_methods=[]", "workers=2"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol") / "label-fraction"
    # the session's shared cache (see tests/test_bench.py): a pretraining another module paid is reused
    cache = tmp_path_factory.getbasetemp() / "bench-pretrain-cache"
    result = run_bench("label-fraction", "test", out, [*GRID, f"pretrain_cache={cache}"])
    return out, result


def test_unlabeled_pool_is_disjoint_from_labeled_patients_and_at_least_five_times_training(bench):
    out, _ = bench
    stored = json.loads((out / "results.json").read_text())
    pool = stored["unlabeled_pool"]
    labeled = pd.read_parquet(out / "knee" / "manifest.parquet")
    unlabeled = pd.read_parquet(Path(pool["pool"]) / "manifest.parquet")
    assert not set(labeled["patient_id"]) & set(unlabeled["patient_id"])
    assert unlabeled[[c for c in unlabeled.columns if c.startswith("label_")]].isna().all().all()
    train = load_splits(out / "knee" / "splits.json").train
    assert unlabeled["patient_id"].nunique() >= 5 * len(train) == 5 * pool["labeled_train_patients"]
    # pretraining read the pool, and only the pool
    import yaml

    config = yaml.safe_load((Path(pool["pretraining"]) / "config.yaml").read_text())
    assert config["data"]["cache"] == str(Path(pool["pool"]) / "cache")
    pool_splits = load_splits(config["data"]["splits"])
    assert set(pool_splits.train) | set(pool_splits.val) == set(unlabeled["patient_id"])
    # a few pool patients are held out of pretraining and score its denoising loss
    assert len(pool_splits.val) == config["pretrain"]["eval_volumes"] == 2
    assert not set(pool_splits.train) & set(pool_splits.val)


def test_report_shows_the_held_out_pretraining_loss(bench):
    from orthodiff.bench.report.pretraining_report import heldout_curves

    out, _ = bench
    pool = json.loads((out / "results.json").read_text())["unlabeled_pool"]
    curves = heldout_curves(Path(pool["pretraining"]))
    assert set(curves) == {"sagittal", "coronal", "axial"}
    assert [step for step, _ in curves["sagittal"]] == [1, 2]  # eval_every=1, max_steps=2
    report = (out / "report.md").read_text()
    assert "## Pretraining: held-out denoising loss" in report
    assert f"| 2 | {curves['sagittal'][-1][1]:.4f} |" in report
    assert (out / "pretraining_heldout_loss.png").stat().st_size > 1000


def test_ablation_table_reads_the_grid_probes_records(bench):
    from orthodiff.bench.cells.ablation import grid_scores

    out, _ = bench
    rows = json.loads((out / "results.json").read_text())["rows"]
    scores = grid_scores(rows, out)
    probe_100 = scores[("orthodiff-probe", 1.0)]
    assert {plane for plane, _ in probe_100} == {"sagittal", "coronal", "axial"}
    report = (out / "report.md").read_text()
    assert "## Ablation: block and timestep per plane" in report
    (plane, key), values = sorted(probe_100.items())[0]
    assert f"| {plane} | {key} | {sum(values) / len(values):.3f} (n=1) |" in report


def test_flat_verdict_reads_the_last_quarter_of_the_curve():
    from orthodiff.bench.report.pretraining_report import last_quarter_change

    falling = [(100, 1.0), (200, 0.5), (300, 0.3), (400, 0.2)]
    assert last_quarter_change(falling) == pytest.approx(1 / 3)
    assert last_quarter_change([(100, 0.10), (200, 0.05), (300, 0.050), (400, 0.049)]) == pytest.approx(0.02)
    assert last_quarter_change([(100, 0.1), (200, 0.09)]) is None


def test_pool_checks_refuse_overlap_and_a_small_pool(tmp_path):
    from orthodiff.bench.data.pretraining import check_pool

    manifest = tmp_path / "m.parquet"
    pd.DataFrame({"patient_id": ["P1", "P2"], "study_id": ["s1", "s2"], "series_id": ["s1/a", "s2/a"],
                  "plane": "sagittal", "path": "/x", "format": "nifti"}).to_parquet(manifest)
    with pytest.raises(OrthodiffError, match="also labeled patients"):
        check_pool(["P1"] + [f"U-{i}" for i in range(20)], manifest, ["P1", "P2"], "pool")
    with pytest.raises(OrthodiffError, match="at least 5x"):
        check_pool([f"U-{i}" for i in range(9)], manifest, ["P1", "P2"], "pool")
    assert check_pool([f"U-{i}" for i in range(10)], manifest, ["P1", "P2"], "pool")["ratio"] == 5.0
    # patients held out to score the denoising loss are not learned from: they do not count
    with pytest.raises(OrthodiffError, match="learns from 9 unlabeled patients"):
        check_pool([f"U-{i}" for i in range(10)], manifest, ["P1", "P2"], "pool", held_out=1)
    counts = check_pool([f"U-{i}" for i in range(12)], manifest, ["P1", "P2"], "pool", held_out=1)
    assert (counts["trained_patients"], counts["held_out_patients"], counts["ratio"]) == (11, 1, 5.5)


def test_floors_and_training_records_appear_in_results_and_report(bench):
    out, result = bench
    stored = json.loads((out / "results.json").read_text())
    by_key = {row["key"]: row for row in stored["rows"]}
    assert result.computed == 4 and set(by_key) == {
        f"knee/in-domain/classify/{m}/{f}/seed0" for m in ("orthodiff-probe", "raw-voxels") for f in ("1", "0.5")}
    raw = by_key["knee/in-domain/classify/raw-voxels/0.5/seed0"]
    info = json.loads((out / raw["run_dir"] / "run.json").read_text())
    assert info["baseline"] == "raw-voxels" and info["mode"] == "supervised"
    for row in stored["rows"]:
        assert row["loss_curve"] and all(np.isfinite(loss) for _, loss in row["loss_curve"])
        assert row["patients"]["train"] == len(load_splits(out / "knee" / "splits.json").subset(row["fraction"]))
    report = (out / "report.md").read_text()
    assert "| raw-voxels |" in report and "## Convergence" in report
    assert (out / "loss_curves.png").stat().st_size > 1000
    # the real counts per fraction, from the splits the cells trained on
    counts = stored["label_counts"]
    splits = load_splits(out / "knee" / "splits.json")
    assert counts["train"]["0.5"]["patients"] == len(splits.subset(0.5))
    assert counts["val"]["0.5"]["patients"] == len(splits.val_subset(0.5)) < len(splits.val)
    assert "## Protocol: patients and positives per label" in report


def test_random_init_probe_is_a_floor_on_its_own_feature_store(bench, tmp_path):
    from orthodiff.bench.cells.cell import Cell, CellInputs, cell_config

    out, _ = bench
    preset, _ = resolve_preset("test")
    from orthodiff.bench.data.workspace import prepare_joint

    data = prepare_joint(preset, out, "knee")
    inputs = CellInputs(config=data.config, splits=data.splits, pretrained=out, features=tmp_path / "features" / "seed0",
                        runs=tmp_path / "runs")
    probe = cell_config(Cell("knee", "in-domain", "classify", "orthodiff-probe", 1.0, 0), inputs, preset)
    floor = cell_config(Cell("knee", "in-domain", "classify", "orthodiff-probe-random-init", 1.0, 0), inputs, preset)
    # the same probe (the preset's per-plane grid search), on pretrained and on untrained denoisers
    assert (probe.finetune.mode, probe.finetune.init) == ("grid", "pretrained")
    assert (floor.finetune.mode, floor.finetune.init) == ("grid", "scratch")
    assert floor.finetune.pooling == probe.finetune.pooling
    assert floor.features.output_dir != probe.features.output_dir
    assert floor.features.blocks == probe.features.blocks and floor.features.timesteps == probe.features.timesteps


def _labelled_manifest(n_patients: int = 120) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_patients):
        labels = {"label_common": float(rng.random() < 0.5), "label_rare": float(p % 40 == 0)}
        rows.append(dict(patient_id=f"P{p:03d}", study_id=f"s{p:03d}", series_id=f"s{p:03d}/sagittal",
                         plane="sagittal", path="/x", format="nifti", **labels))
    return pd.DataFrame(rows)


def test_labels_under_ten_test_positives_leave_the_headline_macro_and_are_named(tmp_path):
    frame = _labelled_manifest()
    manifest = tmp_path / "manifest.parquet"
    frame.to_parquet(manifest)
    make_splits(frame, tmp_path / "splits.json", val_fraction=0.15, test_fraction=0.3, fractions=[1.0, 0.1])
    counts = label_counts(tmp_path / "splits.json", manifest)
    assert counts.test_positives["common"] >= 10 > counts.test_positives["rare"]
    assert counts.headline == ["common"] and counts.excluded == ["rare"]
    lines = "\n".join(protocol_lines(counts, low_label_shortfalls(counts)))
    assert f"rare ({counts.test_positives['rare']})" in lines and "Left out of the headline macro" in lines
    # the 10% subset of ~66 training patients holds fewer than 10 positives of 'common': reported
    shortfalls = low_label_shortfalls(counts)
    assert len(shortfalls) == 1 and shortfalls[0].startswith("common:")
    # a test set under the protocol's size is named beside them, with its real count
    assert counts.test_patients < 150 and short_test_set(counts, counts.test_patients) == []
    short = short_test_set(counts)
    assert short == [f"test set: {counts.test_patients} patients (protocol: at least 150, to resolve a 0.05 macro "
                     "AUROC difference)"]
    lines = protocol_lines(counts, short + shortfalls)
    named = lines.index("**Where the splits fall short of the protocol:**")
    assert lines[named + 2:named + 4] == [f"- {short[0]}", f"- {shortfalls[0]}"]

    # the pooled headline macro averages the headline labels only
    rows = [{"key": "k", "joint": "knee", "scenario": "x", "task": "classify", "run_dir": "/missing", "seed": 0,
             "auroc": {"common": {"value": 0.8}, "rare": {"value": 0.2}},
             "macro_auroc": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}}]
    assert Pooler(rows, 20).pooled(rows).value == pytest.approx(0.5)
    assert Pooler(rows, 20, headline_labels=counts.headline).pooled(rows).value == pytest.approx(0.8)


def _prediction_run(root: Path, name: str, probs: np.ndarray, targets: np.ndarray) -> str:
    run = root / name
    run.mkdir(parents=True)
    pd.DataFrame({"study_id": [f"s{i}" for i in range(len(probs))], "patient_id": [f"P{i}" for i in range(len(probs))],
                  "split": "test", "prob_a": probs, "label_a": targets}).to_csv(run / "predictions.csv", index=False)
    return name


def test_seed_and_patient_interval_is_wider_than_patient_only_when_seeds_disagree(tmp_path):
    from orthodiff.evaluation.bootstrap import seed_and_patient_replicates

    rng = np.random.default_rng(1)
    targets = (np.arange(60) % 2).astype(float)
    good = np.clip(targets * 0.6 + rng.random(60) * 0.5, 0, 1)  # AUROC near 0.9
    poor = rng.random(60)  # near chance
    rows = []
    for seed, probs in enumerate((good, poor, good, poor)):
        name = _prediction_run(tmp_path, f"run{seed}", probs, targets)
        rows.append({"key": f"k{seed}", "joint": "knee", "scenario": "x", "task": "classify", "run_dir": name,
                     "seed": seed, "auroc": {"a": {"value": 0.5}}, "macro_auroc": {"value": 0.5}})
    both = Pooler(rows, 400, root=tmp_path).pooled(rows)
    patients = Pooler(rows, 400, root=tmp_path, resample_seeds=False).pooled(rows)
    assert both.interval == "seed and patient bootstrap of the seed mean"
    assert patients.interval == "patient bootstrap of the seed mean"
    assert (both.ci_high - both.ci_low) > 1.3 * (patients.ci_high - patients.ci_low)
    # one seed drawn in every replicate: the replicate is that seed's value; NaN seeds are left out
    per_seed = np.array([[0.9, 0.8], [0.1, np.nan]])
    counts = np.array([[2.0, 0.0], [1.0, 1.0]])
    assert np.allclose(seed_and_patient_replicates(per_seed, counts), [0.9, 0.8])


def test_pretraining_cache_is_not_reused_when_the_config_changes(bench):
    from orthodiff.bench.data.pretraining import pool_pretraining
    from orthodiff.bench.data.workspace import prepare_joint

    out, _ = bench
    stored = json.loads((out / "results.json").read_text())
    first = Path(stored["unlabeled_pool"]["pretraining"])
    stamp = (first / "denoisers" / "axial" / "config.json").stat().st_mtime_ns
    cache = f"pretrain_cache={first.parent}"
    preset, _ = resolve_preset("test", ["pretrain.max_steps=3", cache])
    data = prepare_joint(preset, out, "knee")
    same_data = [(data.config.data.manifest, data.splits)]
    changed, _ = pool_pretraining(preset, out, "knee", data.config, same_data)
    assert changed != first and changed.parent == first.parent
    assert (changed / "denoisers" / "axial" / "config.json").exists()
    assert (first / "denoisers" / "axial" / "config.json").stat().st_mtime_ns == stamp
    # the same config again: the same entry, nothing pretrained
    preset, _ = resolve_preset("test", [cache])
    again, _ = pool_pretraining(preset, out, "knee", prepare_joint(preset, out, "knee").config, same_data)
    assert again == first and (first / "denoisers" / "axial" / "config.json").stat().st_mtime_ns == stamp
