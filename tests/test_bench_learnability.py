"""The learnability table of the bench reports, computed from hand-made results rows: the best
method per label at the highest fraction, the raw-voxel floor, and the labels with no headroom."""

from __future__ import annotations

import pytest

from orthodiff.bench.report.learnability import learnability, learnability_lines


def _row(method: str, fraction: float, seed: int, auroc: dict, task: str = "classify") -> dict:
    return {"task": task, "method": method, "fraction": fraction, "seed": seed,
            "auroc": {label: {"value": value, "ci_low": None, "ci_high": None} for label, value in auroc.items()}}


ROWS = [
    # at 100%: resnet3d is best for acl (seed mean 0.90), orthodiff-probe for effusion (0.80 against 0.79)
    _row("resnet3d", 1.0, 0, {"acl": 0.92, "effusion": 0.78, "mcl": 0.60}),
    _row("resnet3d", 1.0, 1, {"acl": 0.88, "effusion": 0.80, "mcl": 0.62}),
    _row("orthodiff-probe", 1.0, 0, {"acl": 0.85, "effusion": 0.81, "mcl": 0.64}),
    _row("orthodiff-probe", 1.0, 1, {"acl": 0.87, "effusion": 0.79, "mcl": None}),
    _row("raw-voxels", 1.0, 0, {"acl": 0.70, "effusion": 0.60, "mcl": 0.55}),
    _row("raw-voxels", 1.0, 1, {"acl": 0.72, "effusion": 0.62, "mcl": 0.57}),
    # a lower fraction and a segmentation row never enter the ceiling, however high
    _row("mrnet2d", 0.1, 0, {"acl": 0.99, "effusion": 0.99, "mcl": 0.99}),
    {"task": "segment", "method": "dynunet", "fraction": 1.0, "seed": 0, "mean_dice": {"value": 0.9}},
]


def test_best_method_per_label_is_the_highest_seed_mean_at_the_highest_fraction():
    fraction, table = learnability(ROWS)
    assert fraction == 1.0
    by_label = {entry.label: entry for entry in table}
    assert by_label["acl"].best_method == "resnet3d" and by_label["acl"].best_auroc == pytest.approx(0.90)
    assert by_label["effusion"].best_method == "orthodiff-probe"
    assert by_label["effusion"].best_auroc == pytest.approx(0.80)
    # an undefined seed is left out of the mean, not counted as 0: orthodiff-probe's mcl is 0.64
    assert by_label["mcl"].best_method == "orthodiff-probe" and by_label["mcl"].best_auroc == pytest.approx(0.64)
    assert by_label["acl"].floor_auroc == pytest.approx(0.71)
    assert [entry.label for entry in table if entry.no_headroom()] == ["mcl"]


def test_headline_labels_choose_and_order_the_rows():
    _, table = learnability(ROWS, labels=["effusion", "acl"])
    assert [entry.label for entry in table] == ["effusion", "acl"]


def test_without_the_floor_or_any_diagnosis_row_the_table_says_so():
    _, table = learnability([row for row in ROWS if row["method"] != "raw-voxels"])
    assert all(entry.floor_auroc is None for entry in table)
    assert learnability([ROWS[-1]]) == (None, [])
    assert learnability_lines([ROWS[-1]]) == []


def test_the_report_section_names_the_labels_with_no_headroom():
    lines = learnability_lines(ROWS, name="knee", bar=0.7)
    text = "\n".join(lines)
    assert lines[0] == "## Learnability: the ceiling per label: knee"
    assert "| acl | resnet3d | 0.900 | 0.710 | +0.190 |" in lines
    assert "No headroom (ceiling below 0.70): mcl (orthodiff-probe 0.640)." in lines
    assert "trained on 100% of the training labels" in text
    # a lower bar clears every label
    assert "Every label's ceiling reaches 0.60." in learnability_lines(ROWS, bar=0.6)
