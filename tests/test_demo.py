"""The demo is the first thing a new user runs: the whole pipeline, end to end, on built-in data."""

import json
import subprocess
import sys

import pytest


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
                         "segment-100", "segment-10"}
    for row in runs.values():
        if row["task"] == "classify":
            assert 0.0 <= row["macro_auroc"] <= 1.0
        else:
            assert 0.0 <= row["mean_dice"] <= 1.0
    for stage in ("synth", "scan", "prepare", "split", "pretrain", "extract"):
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

    # Three plane denoisers, each loadable on its own.
    for plane in ("sagittal", "coronal", "axial"):
        assert (out / "pretrain" / "denoisers" / plane / "model.safetensors").exists()
    # The 100% runs exported as one pipeline directory for `orthodiff predict`.
    assert (out / "pipeline" / "pipeline.json").exists()

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
