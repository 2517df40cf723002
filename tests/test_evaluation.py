"""`orthodiff evaluate` on run directories built here with known predictions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_calibration_error

from orthodiff.errors import OrthodiffError
from orthodiff.evaluation import bootstrap
from orthodiff.evaluation.report import run_evaluation

LABELS = ["acl", "effusion"]
SITES = ["siteA", "siteB", "siteC"]


def _strict_json(path):
    """Load JSON refusing NaN / Infinity, so a silent NaN fails the test."""
    def refuse(token):
        raise AssertionError(f"{path}: non-finite value {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def make_classify_run(root, n_patients=60, kind="perfect", seed=0, studies_per_patient=1, val_fraction=0.4,
                      labels=LABELS):
    """A run dir whose predictions are perfect (separable) or random, per the run-directory contract."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        split = "val" if p < int(n_patients * val_fraction) else "test"
        site, strength = SITES[p % 3], (1.5, 3.0)[p % 2]
        targets = {label: int(rng.random() < 0.4) for label in labels}
        # Every patient set has both classes for each label: force the first patients of each split.
        if p in (0, int(n_patients * val_fraction)):
            targets = dict.fromkeys(labels, 1)
        if p in (1, int(n_patients * val_fraction) + 1):
            targets = dict.fromkeys(labels, 0)
        probs = {}
        for label, y in targets.items():
            if kind == "perfect":
                probs[label] = (0.7 + 0.2 * rng.random()) if y else (0.1 + 0.2 * rng.random())
            else:
                probs[label] = rng.random()
        for s in range(studies_per_patient):
            row = {"study_id": f"knee-{p:04d}-{s}", "patient_id": f"P{p:04d}", "split": split, "site": site,
                   "field_strength": strength}
            row.update({f"prob_{k}": v for k, v in probs.items()})
            row.update({f"label_{k}": v for k, v in targets.items()})
            rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.json").write_text(json.dumps({"task": "classify", "labels": list(labels), "classes": [], "seed": 0}))
    pd.DataFrame(rows).to_csv(root / "predictions.csv", index=False)
    return root


def _overall(result):
    return result.metrics["classification"]["overall"]


def test_perfect_predictions_give_auroc_one_and_files(tmp_path):
    run = make_classify_run(tmp_path / "run", kind="perfect")
    result = run_evaluation(run, n_bootstrap=200)
    overall = _overall(result)
    for label in LABELS:
        assert overall["labels"][label]["auroc"]["value"] == pytest.approx(1.0)
        assert overall["labels"][label]["auroc"]["ci_low"] == pytest.approx(1.0)
        assert overall["labels"][label]["sensitivity"]["value"] == 1.0
        assert overall["labels"][label]["specificity"]["value"] == 1.0
    assert overall["macro"]["auroc"]["value"] == pytest.approx(1.0)
    out = run / "eval"
    for name in ("metrics.json", "metrics.md", "roc.png", "reliability.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = _strict_json(out / "metrics.json")
    assert saved["split"] == "test" and saved["classification"]["overall"]["macro"]["auroc"]["value"] == 1.0
    assert "macro AUROC 1.000" in result.describe()


def test_random_predictions_near_half_within_interval(tmp_path):
    run = make_classify_run(tmp_path / "run", n_patients=500, kind="random", seed=3)
    macro = _overall(run_evaluation(run, n_bootstrap=300))["macro"]["auroc"]
    assert abs(macro["value"] - 0.5) < 0.08
    assert macro["ci_low"] < 0.5 < macro["ci_high"]


def test_intervals_contain_point_and_narrow_with_more_patients(tmp_path):
    widths = []
    for n in (40, 400):
        run = make_classify_run(tmp_path / f"run{n}", n_patients=n, kind="random", seed=1)
        overall = _overall(run_evaluation(run, n_bootstrap=300))
        for label in LABELS:
            for metric in ("auroc", "ap", "ece", "sensitivity", "specificity"):
                entry = overall["labels"][label][metric]
                assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], (n, label, metric, entry)
        macro = overall["macro"]["auroc"]
        widths.append(macro["ci_high"] - macro["ci_low"])
    assert widths[1] < 0.6 * widths[0]


def test_bootstrap_resamples_patients_not_studies(tmp_path):
    """Every patient given two identical studies: the same patients, so the same numbers and intervals."""
    once = _overall(run_evaluation(make_classify_run(tmp_path / "a", kind="random", seed=2), n_bootstrap=200))
    twice = _overall(run_evaluation(make_classify_run(tmp_path / "b", kind="random", seed=2, studies_per_patient=2),
                                    n_bootstrap=200))
    assert twice["n_studies"] == 2 * once["n_studies"] and twice["n_patients"] == once["n_patients"]
    assert twice["labels"] == once["labels"]
    assert twice["macro"] == once["macro"]


def test_weighted_bootstrap_equals_torchmetrics_on_expanded_resamples():
    rng = np.random.default_rng(0)
    scores, targets = np.round(rng.random(25), 2), rng.integers(0, 2, 25)
    counts = bootstrap.resample_counts(25, 20, seed=4)
    auroc = bootstrap.weighted_auroc(scores, targets, counts)
    ap = bootstrap.weighted_average_precision(scores, targets, counts)
    ece = bootstrap.weighted_calibration_error(scores + 1e-4, targets, counts, 10)
    for b in range(20):
        idx = np.repeat(np.arange(25), counts[b].astype(int))
        preds, target = torch.from_numpy(scores[idx]), torch.from_numpy(targets[idx])
        assert auroc[b] == pytest.approx(float(binary_auroc(preds, target)), abs=1e-6)
        assert ap[b] == pytest.approx(float(binary_average_precision(preds, target)), abs=1e-6)
        assert ece[b] == pytest.approx(float(binary_calibration_error(preds + 1e-4, target, n_bins=10)), abs=1e-6)


def test_thresholds_chosen_on_val_are_applied_to_test(tmp_path):
    run = make_classify_run(tmp_path / "run", kind="perfect", labels=["acl"])
    frame = pd.read_csv(run / "predictions.csv")
    val_pos = (frame.split == "val") & (frame.label_acl == 1)
    test_pos = (frame.split == "test") & (frame.label_acl == 1)
    frame.loc[val_pos, "prob_acl"] = 0.6 + 0.3 * np.linspace(0, 1, val_pos.sum())  # Youden threshold = 0.6
    frame.loc[test_pos, "prob_acl"] = 0.55  # still separable on test, but under the val threshold
    frame.to_csv(run / "predictions.csv", index=False)
    result = run_evaluation(run, n_bootstrap=100)
    threshold = result.metrics["thresholds"]["acl"]
    assert threshold["source"] == "val Youden J" and threshold["value"] == pytest.approx(0.6)
    acl = _overall(result)["labels"]["acl"]
    assert acl["auroc"]["value"] == pytest.approx(1.0)
    assert acl["sensitivity"]["value"] == 0.0 and acl["specificity"]["value"] == 1.0


def test_label_without_positives_is_null_with_reason_and_left_out_of_macro(tmp_path):
    run = make_classify_run(tmp_path / "run", kind="perfect")
    frame = pd.read_csv(run / "predictions.csv")
    frame.loc[frame.split == "test", "label_effusion"] = 0
    frame.to_csv(run / "predictions.csv", index=False)
    result = run_evaluation(run, tmp_path / "out", n_bootstrap=100)
    saved = _strict_json(tmp_path / "out" / "metrics.json")
    effusion = saved["classification"]["overall"]["labels"]["effusion"]
    assert effusion["auroc"] == {"value": None, "reason": "no positives"}
    assert effusion["sensitivity"] == {"value": None, "reason": "no positives"}
    assert effusion["specificity"]["value"] is not None and effusion["ece"]["value"] is not None
    macro = saved["classification"]["overall"]["macro"]["auroc"]
    assert macro["labels_included"] == ["acl"] and macro["labels_excluded"] == {"effusion": "no positives"}
    table = (tmp_path / "out" / "metrics.md").read_text()
    assert "n/a (no positives)" in table and "Left out of the macro AUROC and AP: effusion" in table
    assert "nan" not in table.lower()
    assert "effusion (no positives)" in result.describe()


def test_metrics_by_site_and_field_strength(tmp_path):
    run = make_classify_run(tmp_path / "run", kind="perfect", n_patients=90)
    metrics = run_evaluation(run, n_bootstrap=100).metrics["classification"]
    assert set(metrics["by_site"]) == set(SITES)
    assert set(metrics["by_field_strength"]) == {"1.5T", "3T"}
    assert sum(g["n_patients"] for g in metrics["by_site"].values()) == metrics["overall"]["n_patients"]
    assert metrics["by_site"]["siteA"]["labels"]["acl"]["auroc"]["value"] == pytest.approx(1.0)
    table = (run / "eval" / "metrics.md").read_text()
    assert "### By site" in table and "### By field strength" in table and "| 3T |" in table


def test_same_seed_same_numbers(tmp_path):
    run = make_classify_run(tmp_path / "run", kind="random", seed=5)
    first = run_evaluation(run, tmp_path / "a", n_bootstrap=100).metrics
    second = run_evaluation(run, tmp_path / "b", n_bootstrap=100).metrics
    other = run_evaluation(run, tmp_path / "c", n_bootstrap=100, seed=9).metrics
    first, second, other = (json.dumps(m["classification"], sort_keys=True) for m in (first, second, other))
    assert first == second and first != other


def test_bad_run_directories_give_one_line_errors(tmp_path):
    with pytest.raises(OrthodiffError, match="run directory not found") as missing:
        run_evaluation(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(missing.value) and "\n" not in str(missing.value)
    run = tmp_path / "empty"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"task": "classify", "labels": ["acl"]}))
    with pytest.raises(OrthodiffError, match="predictions.csv: predictions file not found"):
        run_evaluation(run)
    broken = make_classify_run(tmp_path / "broken")
    pd.read_csv(broken / "predictions.csv").drop(columns=["label_acl"]).to_csv(broken / "predictions.csv", index=False)
    with pytest.raises(OrthodiffError, match="label_acl missing"):
        run_evaluation(broken)


def test_command_line_evaluate(tmp_path, capsys):
    from orthodiff.cli import main

    run = make_classify_run(tmp_path / "run", kind="perfect")
    main(["evaluate", str(run), "--out", str(tmp_path / "cli")])
    assert "macro AUROC 1.000" in capsys.readouterr().out
    assert (tmp_path / "cli" / "metrics.json").exists()


def make_segment_run(root, shift=0, n_patients=6):
    """Masks with two structures on a (4, 16, 16) grid; predictions equal the targets, shifted along w."""
    seg_dir = root / "segmentations"
    seg_dir.mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        target = np.zeros((4, 16, 16), np.uint8)
        target[1:3, 3:9, 2:8] = 1
        target[0:4, 10:14, 9 + p % 3:14] = 2
        pred = np.roll(target, shift, axis=2)
        for name, array in (("pred", pred), ("target", target)):
            np.save(seg_dir / f"P{p}_{name}.npy", array)
        rows.append({"series_id": f"knee-{p}/sagittal", "study_id": f"knee-{p}", "patient_id": f"P{p}",
                     "split": "test", "site": SITES[p % 3], "field_strength": 3.0, "plane": "sagittal",
                     "pred": f"segmentations/P{p}_pred.npy", "target": f"segmentations/P{p}_target.npy",
                     "spacing": json.dumps([3.0, 0.5, 0.5])})
    pd.DataFrame(rows).to_csv(seg_dir / "index.csv", index=False)
    classes = ["background", "femur", "tibia", "patella"]
    (root / "run.json").write_text(json.dumps({"task": "segment", "classes": classes}))
    return root


def test_segmentation_identical_masks_dice_one(tmp_path):
    result = run_evaluation(make_segment_run(tmp_path / "run"), n_bootstrap=100)
    structures = result.metrics["segmentation"]["overall"]["structures"]
    for name in ("femur", "tibia"):
        assert structures[name]["dice"]["value"] == pytest.approx(1.0)
        assert structures[name]["hd95_mm"]["value"] == pytest.approx(0.0)
    assert structures["patella"]["dice"] == {"value": None, "reason": "structure absent from every target"}
    assert structures["patella"]["n_absent"] == 6
    assert result.metrics["segmentation"]["overall"]["mean"]["dice"]["value"] == pytest.approx(1.0)
    assert set(result.metrics["segmentation"]["by_site"]) == set(SITES)
    for name in ("metrics.json", "metrics.md", "dice.png"):
        assert (tmp_path / "run" / "eval" / name).stat().st_size > 0
    _strict_json(tmp_path / "run" / "eval" / "metrics.json")


def test_segmentation_shifted_masks_lower_dice_positive_hd95(tmp_path):
    run = make_segment_run(tmp_path / "run", shift=2)
    (run / "segmentations" / "P0_pred.npy").unlink()  # one bad series: reported and skipped
    result = run_evaluation(run, n_bootstrap=100)
    overall = result.metrics["segmentation"]["overall"]
    femur = overall["structures"]["femur"]
    assert femur["dice"]["value"] < 1.0 and femur["hd95_mm"]["value"] > 0.0
    assert femur["dice"]["ci_low"] <= femur["dice"]["value"] <= femur["dice"]["ci_high"]
    assert overall["n_series"] == 5
    assert [s["series_id"] for s in result.metrics["skipped"]] == ["knee-0/sagittal"]
    assert "| femur |" in (run / "eval" / "metrics.md").read_text()


def test_dice_only_scores_equal_the_full_scores_without_distances(tmp_path):
    from orthodiff.evaluation.rundir import read_run
    from orthodiff.evaluation.segmentation import series_scores

    inputs = read_run(make_segment_run(tmp_path / "run", shift=1))
    structures = ["femur", "tibia", "patella"]
    full, _ = series_scores(inputs.segmentations, structures)
    dice_only, _ = series_scores(inputs.segmentations, structures, distances=False)
    dice = [f"dice_{s}" for s in structures]
    pd.testing.assert_frame_equal(dice_only[dice], full[dice])
    assert not any(column.startswith("hd95_") for column in dice_only.columns)
    assert full["hd95_femur"].notna().all()


def test_thin_structure_mean_is_reported_beside_the_whole_mean(tmp_path):
    run = make_segment_run(tmp_path / "run", shift=1)
    (run / "run.json").write_text(json.dumps({"task": "segment",
                                              "classes": ["background", "femur", "medial_meniscus", "patella"]}))
    overall = run_evaluation(run, n_bootstrap=100).metrics["segmentation"]["overall"]
    femur, meniscus = (overall["structures"][s]["dice"]["value"] for s in ("femur", "medial_meniscus"))
    assert overall["thin_structures"] == ["medial_meniscus"]
    assert overall["thin_mean"]["dice"]["value"] == pytest.approx(meniscus)  # patella is absent: no Dice
    assert overall["mean"]["dice"]["value"] == pytest.approx((femur + meniscus) / 2)
    assert meniscus < femur  # the thin structure loses more to a one-voxel shift, so the two means differ
    assert overall["thin_mean"]["dice"]["ci_low"] <= meniscus <= overall["thin_mean"]["dice"]["ci_high"]
    assert "| **thin-structure mean** |" in (run / "eval" / "metrics.md").read_text()


def test_without_thin_structures_the_thin_mean_is_undefined_with_a_reason(tmp_path):
    overall = run_evaluation(make_segment_run(tmp_path / "run"), n_bootstrap=50).metrics["segmentation"]["overall"]
    assert overall["thin_structures"] == []
    assert overall["thin_mean"]["dice"]["value"] is None and "meniscus" in overall["thin_mean"]["dice"]["reason"]
    assert "thin-structure mean" not in (tmp_path / "run" / "eval" / "metrics.md").read_text()
