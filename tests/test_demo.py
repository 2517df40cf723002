"""The demo is the first thing a new user runs: the whole pipeline, end to end, on built-in data."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import yaml


def _quick_demo(out):
    """``orthodiff demo --quick`` in its own process, as a user runs it."""
    command = [sys.executable, "-m", "orthodiff", "demo", "--quick", "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_writes_its_report(tmp_path):
    out = tmp_path / "demo"
    result = _quick_demo(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "macro AUROC" in result.stdout and "mean Dice" in result.stdout

    results = json.loads((out / "results.json").read_text())
    runs = {row["run"]: row for row in results["runs"]}
    assert set(runs) == {"classify-probe-100", "classify-probe-10", "classify-scratch-10", "classify-raw-voxels-10",
                         "segment-100"}
    for row in runs.values():
        if row["task"] == "classify":
            assert 0.0 <= row["macro_auroc"] <= 1.0
        else:
            assert 0.0 <= row["mean_dice"] <= 1.0
    for stage in ("synth", "scan", "prepare", "split", "denoisers", "extract"):
        assert stage in results["timings_s"]

    report = (out / "report.md").read_text()
    assert "classify-probe-10" in report
    # the pretrained probe at 10% is set against both floors, with what the intervals allow
    assert "untrained denoisers" in report and "raw, pooled voxels" in report
    # segmentation: Dice of every structure and the thin-structure mean, predictions drawn beside the reference
    assert set(runs["segment-100"]["structure_dice"]) == {"femur", "tibia", "patella", "fibula", "femoral_cartilage",
                                                          "tibial_cartilage", "patellar_cartilage", "medial_meniscus",
                                                          "lateral_meniscus", "cruciate_ligaments"}
    assert "| thin-structure mean |" in report
    assert (out / "runs" / "segment-100" / "segmentation_overlay.png").exists()
    pictures = [line for line in report.splitlines() if line.startswith("![")]
    assert pictures, "the report shows the evaluation plots"
    for line in pictures:
        assert (out / line.split("](")[1].rstrip(")")).exists()

    # The features come from the shipped denoisers, and the report says what made them.
    from orthodiff.pretrained import shipped_folder

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["finetune"]["pretrained"] == str(shipped_folder())
    assert "Denoisers: shipped with orthodiff, pretrained by `orthodiff bench label-fraction" in report
    # The probes chose a block and timestep per plane among the configured ones, as the bench does.
    grid = json.loads((out / "runs" / "classify-probe-10" / "run.json").read_text())["grid"]
    assert grid["best"]
    # The 100% runs exported as one pipeline directory for `orthodiff predict`, with the denoisers.
    assert (out / "pipeline" / "pipeline.json").exists()
    for plane in ("sagittal", "coronal", "axial"):
        assert (out / "pipeline" / "denoisers" / plane / "model.safetensors").exists()

    # A second run resumes: every artifact exists, so nothing is retrained.
    again = _quick_demo(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]


def test_a_demo_folder_resumes_only_the_same_size_and_seed(tmp_path):
    from orthodiff.demo import claim_demo_folder
    from orthodiff.errors import OrthodiffError

    claim_demo_folder(tmp_path, quick=True, seed=0)
    claim_demo_folder(tmp_path, quick=True, seed=0)  # the same run resumes
    with pytest.raises(OrthodiffError, match="another --out"):
        claim_demo_folder(tmp_path, quick=True, seed=1)
    with pytest.raises(OrthodiffError, match="another --out"):
        claim_demo_folder(tmp_path, quick=False, seed=0)
    with pytest.raises(OrthodiffError, match="another --out"):
        claim_demo_folder(tmp_path, quick=True, seed=0, pretrain=True)


@pytest.mark.slow
def test_demo_pretrain_redoes_the_bench_pretraining_on_a_separate_archive(tmp_path):
    """`demo --pretrain` runs the bench's pool pretraining (here at the test preset's size): denoisers
    for the three planes, from an unlabeled archive that holds none of the demo's patients."""
    from orthodiff.bench.presets import PRESETS
    from orthodiff.config import load_config
    from orthodiff.data.scan import scan_archive
    from orthodiff.data.splits import load_splits, make_splits
    from orthodiff.demo import bench_pretraining
    from orthodiff.synth import synthesize_archive

    synthesize_archive(tmp_path / "archive", joint="knee", studies=12, seed=3, matrix=32, progress=False)
    scan_archive(tmp_path / "archive", tmp_path / "manifest.parquet")
    make_splits(tmp_path / "manifest.parquet", tmp_path / "splits.json", seed=0, val_fraction=0.2, test_fraction=0.2)
    config = load_config(["demo"], [f"data.manifest={tmp_path / 'manifest.parquet'}",
                                    f"data.splits={tmp_path / 'splits.json'}"])
    folder = bench_pretraining(config, tmp_path, replace(PRESETS["test"], unlabeled_studies={"knee": 48}))
    for plane in ("sagittal", "coronal", "axial"):
        assert (folder / "denoisers" / plane / "model.safetensors").exists()
    assert folder.parent == tmp_path / "pretraining"
    pool = load_splits(folder / "pool-splits.json")
    demo_patients = set(load_splits(tmp_path / "splits.json").train)
    assert pool.train and not set(pool.train) & demo_patients and not set(pool.val) & demo_patients
