"""Benches: a tiny label-fraction grid end to end (results rows, resume, report), and the pieces
that keep benches fair: per-seed subsets with a fixed test set, domain-shift splits, paired summaries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orthodiff.bench import run_bench
from orthodiff.bench.cells.cell import Cell, CellInputs, cell_config, cell_epochs
from orthodiff.bench.data.workspace import (
    prepare_joint,
    write_domain_splits,
    write_reseeded_splits,
)
from orthodiff.bench.presets import resolve_preset
from orthodiff.bench.report.results import Pooler
from orthodiff.data.splits import load_splits
from orthodiff.errors import OrthodiffError

# The grid the end-to-end test runs: 2 fractions x 4 classify methods (one orthodiff, the two floors,
# one baseline) + 2 segmentation cells (scratch, and the frozen pretrained denoisers read per voxel), one seed.
GRID = ["seeds=[0]", "fractions=[1.0,0.5]", "methods=[orthodiff-probe,orthodiff-probe-random-init,raw-voxels,resnet3d]",
        "segment_methods=[scratch-unet,orthodiff-pixel]", "segment_fractions=[1.0]"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "label-fraction"
    # one pretraining cache for the session: the bench test modules share the unlabeled archive
    first = run_bench("label-fraction", "test", out, [*GRID, f"pretrain_cache={shared_cache(tmp_path_factory)}"])
    return out, first


def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "bench-pretrain-cache"


def test_label_fraction_grid_writes_rows_report_and_plots(bench):
    out, first = bench
    stored = json.loads((out / "results.json").read_text())
    keys = {row["key"] for row in stored["rows"]}
    assert keys == {
        f"knee/in-domain/classify/{method}/{fraction}/seed0"
        for method in ("orthodiff-probe", "orthodiff-probe-random-init", "raw-voxels", "resnet3d")
        for fraction in ("1", "0.5")
    } | {"knee/in-domain/segment/scratch-unet/1/seed0", "knee/in-domain/segment/orthodiff-pixel/1/seed0"}
    assert first.computed == 10
    assert stored["command"].startswith("orthodiff bench label-fraction --preset test")
    for row in stored["rows"]:
        metric = row["macro_auroc"] if row["task"] == "classify" else row["mean_dice"]
        assert 0.0 <= metric["value"] <= 1.0
        assert metric["ci_low"] <= metric["ci_high"]
        assert row["n_test_patients"] > 0 and row["by_site"]
    # the baseline's run directory follows the fine-tuning contract that evaluation reads
    baseline = next(r for r in stored["rows"] if r["method"] == "resnet3d")
    assert not Path(baseline["run_dir"]).is_absolute()  # relative to results.json
    info = json.loads((out / baseline["run_dir"] / "run.json").read_text())
    assert info["task"] == "classify" and info["baseline"] == "resnet3d" and info["init"] == "scratch"
    report = (out / "report.md").read_text()
    assert "| orthodiff-probe |" in report and "| resnet3d |" in report and "Segmentation" in report
    # per-label AUROC carries its pooled interval too: "| resnet3d | 100% | 0.71 [0.52, 0.88] | ..."
    per_label = [line for line in report.splitlines() if line.startswith("| resnet3d | 100% |")]
    assert len(per_label) == 1 and per_label[0].count("[") >= 1
    assert (out / "auroc_vs_fraction.png").stat().st_size > 1000
    assert (out / "dice_vs_fraction.png").exists()
    # segmentation per structure: Dice and HD95 of every structure, the mean and the thin-structure mean
    from orthodiff.bench.report.segmentation_report import structure_metrics

    segment = next(r for r in stored["rows"] if r["method"] == "scratch-unet")
    found = structure_metrics(segment, out)
    assert {"femur", "medial_meniscus", "mean", "thin mean"} <= set(found)
    assert "## Segmentation per structure: Dice" in report and "## Segmentation per structure: HD95 (mm)" in report
    dice_row = next(line for line in report.splitlines() if line.startswith("| scratch-unet | 100% |"))
    assert f"{found['femur']['dice']:.3f}" in dice_row and f"{found['thin mean']['dice']:.3f}" in dice_row


def test_segmentation_aims_are_judged_in_words_and_a_segmentation_only_report_has_no_diagnosis_table(bench, tmp_path):
    from orthodiff.bench.label_fraction import write_label_fraction_report
    from orthodiff.bench.report.results import ResultsFile
    from orthodiff.bench.report.segmentation_report import REFERENCE_AIMS, segmentation_section, structure_metrics

    out, _ = bench
    stored = json.loads((out / "results.json").read_text())
    rows = stored["rows"]
    pooler = Pooler(rows, n_bootstrap=50, root=out)
    # the test grid has no DynUNet: say so rather than judge against nothing
    lines, _ = segmentation_section(rows, pooler, ["scratch-unet", "orthodiff-pixel"], out)
    assert any(line.startswith("Aims: not judged; they need dynunet") for line in lines)
    # nor is a run without 100% judged: the aims are set there
    partial = [{**r, "fraction": 0.02, "key": r["key"] + "-low"} for r in rows if r["task"] == "segment"]
    lines, _ = segmentation_section(partial, pooler, ["scratch-unet", "orthodiff-pixel"], out, reference="scratch-unet")
    assert any(line.startswith("Aims: not judged") for line in lines)
    # with the scratch UNet as the reference, every aim gets its verdict from the measured values
    lines, series = segmentation_section(rows, pooler, ["scratch-unet", "orthodiff-pixel"], out, reference="scratch-unet")
    reference = next(r for r in rows if r["method"] == "scratch-unet")
    femur = structure_metrics(reference, out)["femur"]["dice"]
    verdict = next(line for line in lines if line.startswith("- scratch-unet at 100%: "))
    assert f"femur {femur:.3f} ({'met' if femur >= REFERENCE_AIMS['femur'] else 'NOT met'})" in verdict
    pixel = next(line for line in lines if line.startswith("- orthodiff-pixel: "))
    gap = series["orthodiff-pixel"][0][1].value - series["scratch-unet"][0][1].value
    assert pixel.startswith(f"- orthodiff-pixel: {'within' if gap >= -0.02 else 'NOT within'} 0.02 of scratch-unet")
    # a run of segmentation cells only: no empty diagnosis table and no empty AUROC plot
    preset, _ = resolve_preset("test", [*GRID, "methods=[]"])
    header = {k: v for k, v in stored.items() if k != "rows"}
    copy = tmp_path / "results.json"
    copy.write_text(json.dumps({**header, "rows": [r for r in rows if r["task"] == "segment"]}))
    (tmp_path / "knee").symlink_to(out / "knee", target_is_directory=True)
    report, files, _ = write_label_fraction_report(ResultsFile.open(copy, header), preset, tmp_path)
    text = report.read_text()
    assert "Macro AUROC" not in text and "## Segmentation: mean Dice" in text
    assert not (tmp_path / "auroc_vs_fraction.png").exists() and tmp_path / "dice_vs_fraction.png" in files


def test_segmentation_aims_say_whether_the_judged_cells_had_converged(bench):
    from orthodiff.bench.report.segmentation_report import segmentation_section
    from orthodiff.bench.report.training_report import last_quarter_gain

    out, _ = bench
    rows = [r for r in json.loads((out / "results.json").read_text())["rows"] if r["task"] == "segment"]
    pooler = Pooler(rows, n_bootstrap=20, root=out)
    rising = [[50, 0.30], [100, 0.40], [150, 0.50], [200, 0.58]]
    flat = [[50, 0.30], [100, 0.55], [150, 0.580], [200, 0.582]]
    assert last_quarter_gain(rising) == pytest.approx(0.08) and last_quarter_gain(flat) == pytest.approx(0.002)
    assert last_quarter_gain(rising[:3]) is None  # too short to tell

    def verdict(curve_of):
        marked = [{**r, "val_curve": curve_of(r)} for r in rows]
        lines, _ = segmentation_section(marked, pooler, ["scratch-unet", "orthodiff-pixel"], out, reference="scratch-unet")
        return next(line for line in lines if line.startswith("- Convergence"))

    line = verdict(lambda r: rising if r["method"] == "scratch-unet" else flat)
    assert "scratch-unet at 100% +0.080" in line and "orthodiff-pixel at 100% +0.002" in line
    assert "still rising, so not converged: scratch-unet at 100%;" in line and "holds at this step budget only" in line
    assert "every judged cell had flattened" in verdict(lambda r: flat)


def test_pixel_segmentation_reads_frozen_pretrained_denoisers_and_records_its_choice(bench):
    out, _ = bench
    stored = json.loads((out / "results.json").read_text())
    row = next(r for r in stored["rows"] if r["method"] == "orthodiff-pixel")
    info = json.loads((out / row["run_dir"] / "run.json").read_text())
    assert info["task"] == "segment" and info["mode"] == "probe" and info["init"] == "pretrained"
    assert info["features"]["segmenter"] == "pixel"
    # the blocks x timesteps grid was tried on validation and its choice is one of the cells tried
    tried = [(cell["blocks"], cell["timesteps"]) for cell in info["pixel"]["cells"]]
    assert len(tried) > 1 and (info["features"]["blocks"], info["features"]["timesteps"]) in tried
    assert "orthodiff-pixel - scratch-unet" in (out / "report.md").read_text()


def test_segmentation_methods_train_what_their_names_say(bench):
    out, _ = bench
    preset, _ = resolve_preset("test", ["segment_learning_rate=0.005", "segment_finetune={max_steps: 7}"])
    data = prepare_joint(preset, out, "knee")
    inputs = CellInputs(config=data.config, splits=data.splits, pretrained=None, features=out / "f", runs=out / "r")

    def finetune(method, task="segment"):
        ft = cell_config(Cell("knee", "in-domain", task, method, 1.0, 0), inputs, preset).finetune
        return ft.mode, ft.init, ft.segmenter, ft.learning_rate

    # the segmentation step budget reaches every segmentation cell, DynUNet's too, and no other
    assert {cell_config(Cell("knee", "in-domain", "segment", m, 1.0, 0), inputs, preset).finetune.max_steps
            for m in ("orthodiff-finetune", "orthodiff-pixel", "scratch-unet", "dynunet")} == {7}
    assert cell_config(Cell("knee", "in-domain", "classify", "raw-voxels", 1.0, 0), inputs,
                       preset).finetune.max_steps == data.config.finetune.max_steps != 7
    with pytest.raises(OrthodiffError, match="segment_finetune"):
        resolve_preset("test", ["segment_finetune={max_step: 7}"])

    assert finetune("orthodiff-finetune") == ("partial", "pretrained", "decoder", 0.005)
    assert finetune("orthodiff-pixel") == ("probe", "pretrained", "pixel", 0.005)
    assert finetune("scratch-unet") == ("partial", "scratch", "decoder", 0.005)
    # the segmentation learning rate is the segmentation cells' only
    assert finetune("orthodiff-finetune", "classify")[3] == data.config.finetune.learning_rate != 0.005


def test_rerun_skips_finished_cells(bench):
    out, _ = bench
    before = json.loads((out / "results.json").read_text())["rows"]
    stamps = {r["key"]: (out / r["run_dir"] / "run.json").stat().st_mtime_ns for r in before}
    again = run_bench("label-fraction", "test", out, [*GRID, f"pretrain_cache={out.parent.parent / 'bench-pretrain-cache'}"])
    assert again.computed == 0
    assert json.loads((out / "results.json").read_text())["rows"] == before
    assert {r["key"]: (out / r["run_dir"] / "run.json").stat().st_mtime_ns for r in before} == stamps
    # a report-only rerun keeps the rows and the command that computed them, and records its own
    run_bench("label-fraction", "test", out, [*GRID, f"pretrain_cache={out.parent.parent / 'bench-pretrain-cache'}",
                                              "run_cells=false"])
    stored = json.loads((out / "results.json").read_text())
    assert stored["rows"] == before and "run_cells" not in stored["command"]
    assert stored["report_command"].endswith("run_cells=false")


def test_seeds_redraw_subsets_but_never_the_test_set(bench):
    out, _ = bench
    preset, _ = resolve_preset("test")
    data = prepare_joint(preset, out, "knee")
    base = load_splits(data.splits)
    other = load_splits(write_reseeded_splits(data.splits, Path(data.config.data.manifest), 3, out / "s3.json"))
    assert (other.train, other.val, other.test) == (base.train, base.val, base.test)
    assert set(other.subset(0.5)) <= set(other.train)
    assert other.subset(0.5) != base.subset(0.5)


def test_domain_splits_move_the_held_out_domain_to_test(bench):
    out, _ = bench
    preset, _ = resolve_preset("test")
    data = prepare_joint(preset, out, "knee")
    splits = load_splits(write_domain_splits(data, "field_strength", 1.5, out / "domain.json"))
    import pandas as pd

    manifest = pd.read_parquet(data.config.data.manifest).drop_duplicates("patient_id").set_index("patient_id")
    strength = manifest["field_strength"].astype(float)
    assert all(strength[p] != 1.5 for p in splits.train + splits.val)
    assert {p for p in strength.index if strength[p] == 1.5} <= set(splits.test)
    assert set(load_splits(data.splits).test) <= set(splits.test)


def test_overrides_and_bad_presets():
    preset, passed = resolve_preset("small", ["seeds=[4,5,6]", "pretrain.max_steps=7"])
    assert preset.seeds == [4, 5, 6] and passed == ["pretrain.max_steps=7"]
    assert preset.config[-1] == "pretrain.max_steps=7"
    with pytest.raises(OrthodiffError, match="preset 'huge' is unknown"):
        resolve_preset("huge")
    with pytest.raises(OrthodiffError, match="fractions"):
        resolve_preset("test", ["fractions=[0]"])
    with pytest.raises(OrthodiffError, match="methods"):
        resolve_preset("test", ["methods=[resnet50]"])
    with pytest.raises(OrthodiffError, match="unknown"):
        run_bench("speed", "test", "/nonexistent")


def test_min_steps_raise_epochs_for_small_subsets(bench):
    out, _ = bench
    preset, _ = resolve_preset("test", ["min_steps=6"])
    splits = out / "knee" / "splits.json"
    patients = len(load_splits(splits).subset(0.5))
    assert patients <= 8  # one batch of 8
    assert cell_epochs(preset, splits, 0.5, epochs=2, batch_size=8) == 6
    assert cell_epochs(preset, splits, 0.5, epochs=9, batch_size=8) == 9


def test_probe_epochs_apply_to_the_probe_only(bench):
    out, _ = bench
    preset, _ = resolve_preset("test", ["probe_epochs=7", "segment_epochs=2"])
    data = prepare_joint(preset, out, "knee")
    inputs = CellInputs(config=data.config, splits=data.splits, pretrained=None, features=out / "f", runs=out / "r")

    def epochs(task, method):
        return cell_config(Cell("knee", "in-domain", task, method, 1.0, 0), inputs, preset).finetune.epochs

    assert epochs("classify", "orthodiff-probe") == 7
    assert epochs("classify", "orthodiff-finetune") == data.config.finetune.epochs == 1
    assert epochs("segment", "orthodiff-finetune") == 2


def test_only_cells_sharing_a_feature_store_run_one_after_another():
    from orthodiff.bench.cells.grid import cell_groups

    cells = [Cell("knee", "in-domain", task, method, fraction, seed) for seed in (0, 1) for fraction in (1.0, 0.1)
             for task, method in (("classify", "orthodiff-probe"), ("classify", "orthodiff-probe-random-init"),
                                  ("classify", "resnet3d"), ("segment", "dynunet"))]
    groups = list(cell_groups(cells).values())
    probes = [g for g in groups if g[0].method.startswith("orthodiff-probe")]
    # one group per probe method and seed, holding both fractions
    assert len(probes) == 4 and all(len(g) == 2 and len({c.seed for c in g}) == 1 for g in probes)
    # every other cell runs on its own, so two segmentation cells of one method run side by side
    assert sorted(len(g) for g in groups if g not in probes) == [1] * 8
    assert sum(len(g) for g in groups) == len(cells)


def test_pooled_summary_without_run_directories_uses_seed_intervals():
    rows = [{"key": f"k{s}", "joint": "knee", "scenario": "x", "task": "classify", "run_dir": "/missing",
             "auroc": {"a": {"value": v}}, "macro_auroc": {"value": v, "ci_low": v - 0.1, "ci_high": v + 0.1}}
            for s, v in enumerate((0.6, 0.8))]
    pooled = Pooler(rows, n_bootstrap=20).pooled(rows)
    assert pooled.value == pytest.approx(0.7)
    assert (pooled.ci_low, pooled.ci_high) == (pytest.approx(0.6), pytest.approx(0.8))
    assert pooled.interval == "mean of the seeds' intervals" and pooled.n_seeds == 2


def test_cross_joint_reuses_knee_denoisers_and_pretrains_the_target_on_request(bench, tmp_path):
    out, _ = bench
    knee = Path(json.loads((out / "results.json").read_text())["unlabeled_pool"]["pretraining"])
    cache = knee.parent
    stamp = (knee / "denoisers" / "sagittal" / "config.json").stat().st_mtime_ns
    grid = ["seeds=[0]", "cross_joint_fractions=[1.0]", "methods=[orthodiff-probe,resnet3d]",
            "segment_methods=[orthodiff-finetune]", f"pretrain_cache={cache}", "target_pretraining=true"]
    result = run_bench("cross-joint", "test", tmp_path / "cross-joint", grid)
    stored = json.loads((tmp_path / "cross-joint" / "results.json").read_text())
    assert {row["key"] for row in stored["rows"]} == {
        "ankle/knee-pretrained/classify/orthodiff-probe/1/seed0", "ankle/knee-pretrained/classify/resnet3d/1/seed0",
        "ankle/knee-pretrained/segment/orthodiff-finetune/1/seed0",
        "ankle/target-pretrained/classify/orthodiff-probe/1/seed0",
        "ankle/target-pretrained/segment/orthodiff-finetune/1/seed0",
    }
    assert result.computed == 5
    # the label-fraction bench's knee pretraining came from the shared cache, not pretrained again;
    # the ankle denoisers were pretrained on the ankle's own unlabeled archive
    assert not (tmp_path / "cross-joint" / "knee").exists()
    assert stored["knee_denoisers"] == str(knee.resolve())
    assert (knee / "denoisers" / "sagittal" / "config.json").stat().st_mtime_ns == stamp
    ankle = Path(stored["unlabeled_pools"]["ankle"]["pretraining"])
    assert ankle.parent == cache and ankle != knee
    assert (ankle / "denoisers" / "sagittal" / "config.json").exists()
    by_key = {row["key"]: row for row in stored["rows"]}
    own_probe = json.loads((tmp_path / "cross-joint" / by_key[
        "ankle/target-pretrained/classify/orthodiff-probe/1/seed0"]["run_dir"] / "run.json").read_text())
    knee_probe = json.loads((tmp_path / "cross-joint" / by_key[
        "ankle/knee-pretrained/classify/orthodiff-probe/1/seed0"]["run_dir"] / "run.json").read_text())
    assert own_probe["features"]["store"] != knee_probe["features"]["store"]
    report = (tmp_path / "cross-joint" / "report.md").read_text()
    assert "| orthodiff-probe (ankle-pretrained) |" in report and "| orthodiff-probe |" in report
    assert "orthodiff-probe (ankle-pretrained) at 100%: resnet3d" in report
    assert (tmp_path / "cross-joint" / "ankle_classify.png").stat().st_size > 1000
    # how every cell trained, and both pretrainings' held-out curves, as in the label-fraction report
    assert "## Convergence (training loss, mean over seeds): ankle" in report
    assert "## Protocol: patients and positives per label: ankle" in report and "| train | 100% |" in report
    assert "| segment | orthodiff-finetune (ankle-pretrained) | 100% |" in report
    assert "## Pretraining (knee): held-out denoising loss" in report and "## Pretraining (ankle):" in report
    assert (tmp_path / "cross-joint" / "pretraining_heldout_loss_ankle.png").exists()
    assert (tmp_path / "cross-joint" / "ankle_loss_curves.png").exists() and "Training time over all cells" in report


def test_robustness_holds_the_domain_out_of_training_and_pretraining(bench, tmp_path):
    out, _ = bench
    grid = ["seeds=[0]", "methods=[orthodiff-probe,resnet3d]",
            f"pretrain_cache={out.parent.parent / 'bench-pretrain-cache'}"]  # the unlabeled archive is reused
    result = run_bench("robustness", "test", tmp_path / "robustness", grid)
    stored = json.loads((tmp_path / "robustness" / "results.json").read_text())
    assert {row["key"] for row in stored["rows"]} == {
        "knee/unseen-field-strength/classify/orthodiff-probe/1/seed0",
        "knee/unseen-field-strength/classify/resnet3d/1/seed0",
    }
    assert result.computed == 2
    root = tmp_path / "robustness" / "knee"
    splits = load_splits(root / "splits-unseen-field-strength.json")
    pool = stored["unlabeled_pools"]["unseen-field-strength"]
    pretrain_config = Path(pool["pretraining"]) / "config.yaml"
    import yaml

    # pretraining read the unlabeled archive less its 1.5 T patients
    pretrain_splits = yaml.safe_load(pretrain_config.read_text())["data"]["splits"]
    pool_strengths = {str(p): float(s) for p, s in _field_strengths(Path(pool["pool"])).items()}
    pretrained_on = load_splits(pretrain_splits).train
    assert pretrained_on and all(pool_strengths[p] != 1.5 for p in pretrained_on)
    assert any(s == 1.5 for s in pool_strengths.values())
    strengths = {str(p): float(s) for p, s in _field_strengths(root).items()}
    assert all(strengths[p] != 1.5 for p in splits.train + splits.val)
    assert any(strengths[p] == 1.5 for p in splits.test)
    report = (tmp_path / "robustness" / "report.md").read_text()
    assert "1.5T (unseen)" in report and "| orthodiff-probe |" in report and "| resnet3d |" in report
    assert (tmp_path / "robustness" / "unseen-field-strength.png").exists()
    assert "## Convergence (training loss, mean over seeds): unseen-field-strength" in report
    assert "## Protocol: patients and positives per label: unseen-field-strength" in report
    assert "| classify | resnet3d | 100% |" in report
    assert "## Pretraining (unseen-field-strength): held-out denoising loss" in report
    assert (tmp_path / "robustness" / "pretraining_heldout_loss_unseen-field-strength.png").exists()


def _field_strengths(root: Path) -> dict:
    import pandas as pd

    manifest = pd.read_parquet(root / "manifest.parquet").drop_duplicates("patient_id")
    return dict(zip(manifest["patient_id"], manifest["field_strength"]))


@pytest.mark.parametrize("name", ["test", "small", "paper"])
def test_every_preset_gives_a_valid_experiment_config(name, tmp_path):
    from orthodiff.bench.data.workspace import joint_config
    from orthodiff.bench.presets import PRESETS

    preset, _ = resolve_preset(name)
    config = joint_config(preset, tmp_path / "knee", "knee")  # unknown keys or wrong types raise here
    assert config.data.joint == "knee" and config.data.splits == str(tmp_path / "knee" / "splits.json")
    assert set(preset.studies) >= {"knee", *preset.cross_joint_targets}
    assert preset.methods == list(PRESETS[name].methods)
    if name == "paper":  # the reference sizes
        assert config.data.plane_size["sagittal"] == [16, 256, 256] and config.model.base_channels == 64


def test_per_label_and_macro_pools_keep_their_patient_bootstrap_in_any_order(bench):
    out, _ = bench
    rows = [r for r in json.loads((out / "results.json").read_text())["rows"]
            if r["task"] == "classify" and r["method"] == "resnet3d"]
    label = next(name for name, est in rows[0]["auroc"].items() if est["value"] is not None)
    pooler = Pooler(rows, 50, root=out)
    one_label = pooler.pooled(rows, label)  # first, so a macro pool after it must not reuse its patients
    macro = pooler.pooled(rows)
    for pooled in (one_label, macro):
        assert pooled.replicates is not None and pooled.interval == "seed and patient bootstrap of the seed mean"
        assert pooled.ci_low <= pooled.value <= pooled.ci_high
    assert one_label.value == pytest.approx(sum(r["auroc"][label]["value"] for r in rows) / len(rows))


def test_pooling_ablation_retrains_the_probes_with_other_poolings(bench):
    import runpy

    out, _ = bench
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pooling_ablation.py"
    ablation = runpy.run_path(str(script), run_name="pooling_ablation")
    assert ablation["main"]([str(out), "--seeds", "0", "--fractions", "1", "--poolings", "grid_max",
                             "--n-bootstrap", "50"]) == 0
    retrained = out / "knee" / "ablation-pooling" / "grid_max" / "classify-orthodiff-probe-1-seed0"
    info = json.loads((retrained / "run.json").read_text())
    assert info["pooling"] == "grid_max" and info["mode"] == "grid"
    # the bench's own cell is untouched: still its preset's pooling
    stored = json.loads((out / "results.json").read_text())
    bench_row = next(r for r in stored["rows"] if r["key"] == "knee/in-domain/classify/orthodiff-probe/1/seed0")
    assert json.loads((out / bench_row["run_dir"] / "run.json").read_text())["pooling"] != "grid_max"
    table = (out / "ablation_pooling.md").read_text().splitlines()
    lines = [line for line in table if line.startswith("| orthodiff-probe | 100% | grid_max |")]
    assert len(lines) == 1 and "[" in lines[0]
    # the retrained probe is scored from its own predictions, not the bench cell's
    metrics = json.loads((retrained / "eval" / "metrics.json").read_text())["classification"]["overall"]
    headline = stored["label_counts"]["headline_labels"]
    values = [metrics["labels"][label]["auroc"]["value"] for label in headline
              if metrics["labels"][label]["auroc"]["value"] is not None]
    assert f"{sum(values) / len(values):.3f}" in lines[0].split("|")[4]


def test_probe_ablation_retrains_the_probes_with_a_fixed_recipe(bench, capsys):
    import runpy

    from orthodiff.errors import OrthodiffError

    out, _ = bench
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_ablation.py"
    ablation = runpy.run_path(str(script), run_name="probe_ablation")
    # the test preset's store holds mid and up1 at t=100: the fixed recipe reads both on every plane
    assert ablation["main"]([str(out), "--seeds", "0", "--fractions", "1", "--variant", "fixed-all", "mode=probe",
                             "concat_features=2", "learning_rate=1e-3", "--n-bootstrap", "50"]) == 0
    retrained = out / "knee" / "ablation-probe" / "fixed-all" / "classify-orthodiff-probe-1-seed0"
    info = json.loads((retrained / "run.json").read_text())
    assert info["mode"] == "probe" and "grid" not in info
    assert all(len(keys) == 2 for keys in info["features"]["selection"].values())
    stored = json.loads((out / "results.json").read_text())
    bench_row = next(r for r in stored["rows"] if r["key"] == "knee/in-domain/classify/orthodiff-probe/1/seed0")
    assert json.loads((out / bench_row["run_dir"] / "run.json").read_text())["mode"] == "grid"
    table = (out / "ablation_probe.md").read_text().splitlines()
    assert any("--variant fixed-all mode=probe concat_features=2 learning_rate=1e-3" in line for line in table)
    line = next(line for line in table if line.startswith("| orthodiff-probe | 100% | fixed-all |"))
    cells = [cell.strip() for cell in line.split("|")]
    metrics = json.loads((retrained / "eval" / "metrics.json").read_text())["classification"]["overall"]
    values = [metrics["labels"][label]["auroc"]["value"] for label in stored["label_counts"]["headline_labels"]
              if metrics["labels"][label]["auroc"]["value"] is not None]
    assert cells[4].startswith(f"{sum(values) / len(values):.3f}")
    assert cells[5].startswith(("+", "-")) and "[" in cells[5]  # paired with the bench's own probe
    # a single probe is chosen by its early-stopping point: that validation score is in run.json and the table
    assert cells[6] == f"{info['best_val_macro_auroc']:.3f}"
    # the finished run is reused by a rerun with the same settings, refused under the same name with others
    assert ablation["main"]([str(out), "--seeds", "0", "--fractions", "1", "--variant", "fixed-all", "mode=probe",
                             "concat_features=2", "learning_rate=1e-3", "--n-bootstrap", "50"]) == 0
    with pytest.raises(OrthodiffError, match="trained with other finetune settings than variant 'fixed-all'"):
        ablation["main"]([str(out), "--seeds", "0", "--fractions", "1", "--variant", "fixed-all", "mode=probe",
                          "concat_features=2", "learning_rate=1e-2", "--n-bootstrap", "50"])
    with pytest.raises(SystemExit):
        ablation["main"]([str(out), "--seeds", "0", "--fractions", "1", "--variant", "odd", "colour=red"])
    assert "variant setting 'colour=red': give finetune key=value" in capsys.readouterr().err


def test_pretraining_ablation_probes_denoisers_pretrained_otherwise(bench):
    import runpy

    out, _ = bench
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pretraining_ablation.py"
    ablation = runpy.run_path(str(script), run_name="pretraining_ablation")
    assert ablation["main"]([str(out), "--steps", "1", "--pool-patients", "20", "--seeds", "0", "--fractions", "1",
                             "--n-bootstrap", "50"]) == 0
    stored = json.loads((out / "results.json").read_text())
    bench_pretraining = Path(stored["unlabeled_pool"]["pretraining"])
    used = {}
    for name in ("steps=1", "pool=20"):
        run = out / "knee" / f"runs-ablation-{name}" / "classify-orthodiff-probe-1-seed0"
        used[name] = _pretrained_of(run)
        # each variant reads its own pretraining and extracts its own features
        assert used[name] != bench_pretraining and (out / "knee" / f"features-ablation-{name}" / "seed0").is_dir()
    assert used["steps=1"] != used["pool=20"]
    steps = [json.loads(line)["step"] for line in (used["steps=1"] / "sagittal" / "metrics.jsonl").read_text().splitlines()
             if "step" in json.loads(line)]
    assert max(steps) == 1
    pool_splits = json.loads((used["pool=20"] / "pool-splits.json").read_text())
    assert len(pool_splits["train"]) + len(pool_splits["val"]) == 20
    table = (out / "ablation_pretraining.md").read_text().splitlines()
    for label in ("1 steps", "20 patients"):
        line = next(line for line in table if line.startswith("| ") and label in line.split("|")[1])
        assert "[" in line.split("|")[3] and "[" in line.split("|")[4]


def _pretrained_of(run: Path) -> Path:
    import yaml

    return Path(yaml.safe_load((run / "config.yaml").read_text())["finetune"]["pretrained"])


def test_a_report_at_one_fraction_has_one_per_label_row_per_method(bench, tmp_path):
    out, _ = bench
    copy = tmp_path / "label-fraction"
    shutil.copytree(out, copy)
    one_fraction = [item if not item.startswith("fractions=") else "fractions=[1.0]" for item in GRID]
    run_bench("label-fraction", "test", copy, [*one_fraction, f"pretrain_cache={out.parent.parent / 'bench-pretrain-cache'}",
                                               "run_cells=false"])
    section = (copy / "report.md").read_text().split("## Per-label AUROC")[1].split("\n## ")[0]
    rows = [line.split(" | ")[:2] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    methods = [row[0].lstrip("| ") for row in rows[1:]]
    assert len(methods) == len(set(methods)) and {row[1] for row in rows[1:]} == {"100%"}
