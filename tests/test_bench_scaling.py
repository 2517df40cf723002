"""The scaling study's staged runner on the `test` preset with two tiny points: stages in order,
resume without rewriting, refusals naming the stage to run first, compute from the settings, the report."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from orthodiff.bench.scaling import FLOORS, ScalingPoint, Study, point_compute, run_stage
from orthodiff.errors import OrthodiffError

TINY_POINTS = (ScalingPoint("t1-whole", width=8, steps=1), ScalingPoint("t2-crops", width=8, steps=2, crop_divisor=2))


def tiny_study(root, tmp_path_factory, **changes) -> Study:
    cache = tmp_path_factory.getbasetemp() / "bench-pretrain-cache"  # the bench tests' shared pool
    settings = {"results": root / "results", "work": root / "work", "preset": "test",
                "overrides": ["probe_epochs=1", "probe_mode=probe", "finetune.max_steps=2", "n_bootstrap=20",
                              f"pretrain_cache={cache}"],
                "points": TINY_POINTS, "low_fraction": 0.5, "subset_seeds": [0, 1]}
    return Study(**{**settings, **changes})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    study = tiny_study(root, tmp_path_factory)
    assert run_stage(study, "pool")
    for name in ("t1-whole", "t2-crops"):
        for stage in ("pretrain", "extract", "probe"):
            assert run_stage(study, stage, name)
    assert run_stage(study, "extract", FLOORS)
    assert run_stage(study, "probe", FLOORS)
    run_stage(study, "report")
    return study


def test_stages_write_rows_and_a_report_with_table_plot_floors_and_trend(finished):
    results = finished.results
    for name in ("t1-whole", "t2-crops"):
        rows = sorted(p.parent.name for p in (results / "points" / name / "rows").glob("*/row.json"))
        # 100% once, the low fraction once per subset seed
        assert rows == ["orthodiff-probe-0.5-seed0", "orthodiff-probe-0.5-seed1", "orthodiff-probe-1-seed0"]
        assert (results / "points" / name / "denoisers" / "sagittal" / "model.safetensors").exists()
    floors = {p.parent.name for p in (results / "points" / FLOORS / "rows").glob("*/row.json")}
    assert {"orthodiff-probe-random-init-1-seed0", "raw-voxels-0.5-seed1"} <= floors
    report = (results / "report.md").read_text()
    assert "| t1-whole | 8 | 1 |" in report and "| t2-crops | 8 | 2 | 4x8x8 |" in report
    assert "| orthodiff-probe-random-init |" in report and "| raw-voxels |" in report
    assert "per tenfold pretraining compute (2 points" in report
    assert "![scaling](scaling.png)" in report and (results / "scaling.png").stat().st_size > 1000
    assert "## Power checks" in report and "Next point:" in report
    assert "probe floors" in (results / "COMMAND.txt").read_text()


def test_a_finished_stage_is_skipped_and_its_outputs_stay_unchanged(finished):
    outputs = [finished.results / "data.json", finished.results / "points" / "t2-crops" / "pretraining.json",
               finished.results / "points" / "t2-crops" / "extraction.json",
               finished.results / "points" / "t2-crops" / "rows" / "orthodiff-probe-1-seed0" / "row.json"]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs}
    command = (finished.results / "COMMAND.txt").read_text()
    assert not run_stage(finished, "pool")
    for stage in ("pretrain", "extract", "probe"):
        assert not run_stage(finished, stage, "t2-crops")
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs} == before
    assert (finished.results / "COMMAND.txt").read_text() == command


def test_compute_of_each_point_is_computed_from_its_settings(finished):
    first, second = (point_compute(finished, p) for p in TINY_POINTS)
    # the test preset: 4x16x16 planes, batch 4; the crop halves the height and width
    assert next(iter(first["planes"].values()))["crop"] == [4, 16, 16]
    assert next(iter(second["planes"].values()))["crop"] == [4, 8, 8]
    parameters = first["parameters"]
    assert first["compute"] == 3 * parameters * 4 * math.prod([4, 16, 16]) * 1
    assert second["compute"] == 3 * parameters * 4 * math.prod([4, 8, 8]) * 2
    wider = point_compute(finished, ScalingPoint("wide", width=16, steps=1))
    assert wider["parameters"] > 3 * parameters


def test_a_stage_before_its_inputs_is_refused_naming_the_stage_to_run_first(finished, tmp_path, tmp_path_factory):
    fresh = tiny_study(tmp_path, tmp_path_factory)
    with pytest.raises(OrthodiffError, match="run the `pool` stage first") as error:
        run_stage(fresh, "pretrain", "t1-whole")
    assert "\n" not in str(error.value)
    # on the finished study's data: a point not pretrained cannot be extracted or probed
    other = tiny_study(tmp_path, tmp_path_factory, work=finished.work, results=tmp_path / "other")
    run_stage(other, "pool")
    with pytest.raises(OrthodiffError, match="run the `pretrain t2-crops` stage first"):
        run_stage(other, "extract", "t2-crops")
    with pytest.raises(OrthodiffError, match="run the `extract floors` stage first"):
        run_stage(other, "probe", FLOORS)
    with pytest.raises(OrthodiffError, match="run the `probe t1-whole` stage first"):
        run_stage(other, "report")
    changed = tiny_study(tmp_path, tmp_path_factory, work=finished.work, results=tmp_path / "other",
                         subset_seeds=[0, 1, 2])
    with pytest.raises(OrthodiffError, match="subset_seeds"):
        run_stage(changed, "pretrain", "t1-whole")




def test_a_point_or_floor_with_probe_cells_missing_stays_out_of_the_report(finished, tmp_path):
    """Pooling a point over fewer subsets than the study draws would report another protocol: until
    every cell has run, the point (or the floors) is named with its count and left out."""
    import shutil

    from orthodiff.bench.scaling import write_report

    results = tmp_path / "results"
    shutil.copytree(finished.results, results)
    shutil.rmtree(results / "points" / "t2-crops" / "rows" / "orthodiff-probe-0.5-seed1")
    shutil.rmtree(results / "points" / FLOORS / "rows" / "raw-voxels-0.5-seed0")
    partial = Study(**{**finished.__dict__, "results": results})
    report = write_report(partial).read_text()
    assert "| t1-whole | 8 | 1 |" in report and "| t2-crops |" not in report
    assert "t2-crops (2 of 3 probe cells)" in report and "floors: raw-voxels (2 of 3 probe cells)" in report
    assert "| raw-voxels | a logistic probe on the raw plane tensors | - | - |" in report
    # the other floor has all its cells: it is in
    assert "| orthodiff-probe-random-init | the probe on untrained denoisers of t1-whole's architecture | 0." in report


def test_supervised_baselines_run_at_one_fraction_only_are_reported_as_such(finished, tmp_path):
    """A baseline bench that ran the supervised method at 100% only (a ceiling run) gives its band at
    100% and says the low fraction was not run."""
    import json
    import shutil

    from orthodiff.bench.scaling import write_report

    results = tmp_path / "results"
    shutil.copytree(finished.results, results)
    row = json.loads((results / "points" / "t1-whole" / "rows" / "orthodiff-probe-1-seed0" / "row.json").read_text())
    baseline = {**row, "method": "resnet3d", "key": "knee/label-fraction/classify/resnet3d/1/seed0"}
    (results / "ceiling.json").write_text(json.dumps({"rows": [baseline]}))
    report = write_report(Study(**{**finished.__dict__, "results": results}), results / "ceiling.json").read_text()
    assert "## Supervised baselines" in report
    assert f"| resnet3d | {row['macro_auroc']['value']:.3f}" in report and "| not run |" in report

def test_a_point_may_be_added_to_a_recorded_study_but_not_changed_or_dropped(tmp_path):
    """A recorded point's results were made with it: the study may grow by a point (the record then
    lists it), never change or lose one."""
    import json

    from orthodiff.bench.scaling import check_settings

    study = Study(results=tmp_path, work=tmp_path / "work", preset="test", points=TINY_POINTS)
    (tmp_path / "study.json").write_text(json.dumps({**study.settings(), "work": "elsewhere"}))
    grown = Study(results=tmp_path, work=tmp_path / "work", preset="test",
                  points=(ScalingPoint("t0-crops", width=8, steps=1, crop_divisor=2), *TINY_POINTS))
    check_settings(grown)
    record = json.loads((tmp_path / "study.json").read_text())
    assert [p["name"] for p in record["points"]] == ["t0-crops", "t1-whole", "t2-crops"]
    assert record["work"] == "elsewhere"  # the rest of the record stays
    changed = Study(results=tmp_path, work=tmp_path / "work", preset="test",
                    points=(grown.points[0], ScalingPoint("t1-whole", width=16, steps=1), TINY_POINTS[1]))
    with pytest.raises(OrthodiffError, match="'t1-whole' was recorded"):
        check_settings(changed)
    dropped = Study(results=tmp_path, work=tmp_path / "work", preset="test", points=grown.points[1:])
    with pytest.raises(OrthodiffError, match="'t0-crops' was recorded") as error:
        check_settings(dropped)
    assert "\n" not in str(error.value)
    assert json.loads((tmp_path / "study.json").read_text()) == record  # a refusal writes nothing

def test_the_command_takes_options_between_the_stage_and_its_overrides(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling_study.py"
    sizes = [f"data.plane_size.{plane}=[16,64,64]" for plane in ("sagittal", "coronal", "axial")]
    command = [sys.executable, str(script), "pool", "--work", str(tmp_path / "work"), "--results",
               str(tmp_path / "results"), "--list", *sizes]
    listed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "8 x 16x32x32" in listed.stdout  # half-size crops of the overridden 16 x 64 x 64 planes
    assert not (tmp_path / "work").exists()  # --list only prints
