"""orthodiff split: patient-level, stratified, nested, written once and reused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from orthodiff.data.splits import load_splits, make_splits
from orthodiff.errors import OrthodiffError

FRACTIONS = (1.0, 0.5, 0.25, 0.1, 0.05)
LABELS = ("acl", "meniscus", "rare")
# 'rare' has three positives; that some split lacks one is the subject of one test, noise elsewhere
pytestmark = pytest.mark.filterwarnings("ignore:.* has no positive patient for label")


def _manifest(n_patients: int = 80, seed: int = 0) -> pd.DataFrame:
    """Series rows of ``n_patients`` patients; every fourth patient has two studies; 'rare' has 3 positives."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for s in range(2 if p % 4 == 0 else 1):
            study = f"knee-{p:03d}-{s}"
            labels = {
                "label_acl": float(rng.random() < 0.3),
                "label_meniscus": float(rng.random() < 0.4),
                "label_rare": float(p in (5, 40, 77) and s == 0),
            }
            for plane in ("sagittal", "coronal"):
                rows.append(
                    dict(
                        patient_id=f"P{p:03d}",
                        study_id=study,
                        series_id=f"{study}/{plane}",
                        plane=plane,
                        path=f"/x/{study}/{plane}.nii.gz",
                        format="nifti",
                        **labels,
                    )
                )
    return pd.DataFrame(rows)


def _split(tmp_path, name="splits.json", frame=None, seed=0, **kwargs):
    frame = _manifest() if frame is None else frame
    return make_splits(
        frame, tmp_path / name, seed=seed, val_fraction=0.15, test_fraction=0.2, fractions=FRACTIONS, **kwargs
    )


def test_patient_disjoint_stratified_and_nested(tmp_path):
    frame = _manifest()
    splits = _split(tmp_path, frame=frame)
    train, val, test = set(splits.train), set(splits.val), set(splits.test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(frame["patient_id"])
    assert (len(test), len(val)) == (16, 12)
    assert splits.labels == list(LABELS)

    per_patient = frame.drop_duplicates("study_id").groupby("patient_id")[[f"label_{n}" for n in LABELS]].max()
    sizes = []
    larger = train
    for fraction in FRACTIONS:
        subset = set(splits.subset(fraction))
        assert subset <= larger, fraction  # nested: each subset inside the next larger one
        for label in LABELS:
            if per_patient.loc[sorted(train), f"label_{label}"].sum() > 0:
                assert per_patient.loc[sorted(subset), f"label_{label}"].sum() > 0, (fraction, label)
        sizes.append(len(subset))
        larger = subset
    assert sizes[0] == len(train) and sizes == sorted(sizes, reverse=True)
    assert sizes[1] == pytest.approx(len(train) / 2, abs=3)
    # stratified: the half subset keeps the training set's ACL prevalence roughly
    half = sorted(splits.subset(0.5))
    assert abs(per_patient.loc[half, "label_acl"].mean() - per_patient.loc[sorted(train), "label_acl"].mean()) < 0.1
    assert "train 52" in splits.describe() and "50%" in splits.describe()
    with pytest.raises(OrthodiffError, match="0.3 is not in"):
        splits.subset(0.3)


def test_deterministic_and_seed_dependent(tmp_path):
    a = _split(tmp_path, "a.json")
    b = _split(tmp_path, "b.json")
    c = _split(tmp_path, "c.json", seed=1)
    assert (a.train, a.val, a.test, a.subsets) == (b.train, b.val, b.test, b.subsets)
    assert (a.train, a.val, a.test) != (c.train, c.val, c.test)


def test_written_once_and_reused(tmp_path):
    first = _split(tmp_path)
    path = tmp_path / "splits.json"
    mtime = path.stat().st_mtime_ns
    again = _split(tmp_path)
    assert path.stat().st_mtime_ns == mtime
    assert (again.train, again.subset(0.1)) == (first.train, first.subset(0.1))
    with pytest.raises(OrthodiffError, match="other seed"):
        _split(tmp_path, seed=3)
    with pytest.raises(OrthodiffError, match="other patients"):
        _split(tmp_path, frame=_manifest(n_patients=70))


def test_load_asserts_patient_disjointness(tmp_path):
    _split(tmp_path)
    path = tmp_path / "splits.json"
    data = json.loads(path.read_text())
    data["test"].append(data["train"][0])
    path.write_text(json.dumps(data))
    with pytest.raises(OrthodiffError, match="is in both train and test"):
        load_splits(path)


def test_label_without_positives_in_test_is_warned_and_recorded(tmp_path):
    frame = _manifest(n_patients=30)
    with pytest.warns(UserWarning, match="no positive patient for label"):
        splits = make_splits(
            frame, tmp_path / "s.json", seed=0, val_fraction=0.15, test_fraction=0.2, fractions=FRACTIONS
        )
    stored = json.loads((tmp_path / "s.json").read_text())
    # 'rare' has one positive patient among these 30: val and test cannot both have it
    assert any("'rare'" in note for note in stored["warnings"])
    assert stored["warnings"] == splits.warnings
    assert sum(stored["label_positives"]["rare"].values()) == 1


def test_unknown_label_and_cli(tmp_path):
    frame = _manifest(n_patients=20)
    with pytest.raises(OrthodiffError, match="not in the manifest"):
        _split(tmp_path, frame=frame, labels=["nope"])
    from orthodiff.cli import main

    manifest = tmp_path / "manifest.csv"
    frame.to_csv(manifest, index=False)
    main(["split", str(manifest), "--out", str(tmp_path / "cli.json"), "seed=2", "data.labels=[acl]"])
    splits = load_splits(tmp_path / "cli.json")
    assert splits.seed == 2 and splits.labels == ["acl"]


def test_reuse_with_another_manifest_of_the_same_patients_is_refused(tmp_path):
    frame = _manifest()
    first = _split(tmp_path, frame=frame)
    assert first.fingerprint and json.loads((tmp_path / "splits.json").read_text())["manifest_fingerprint"] == first.fingerprint
    assert load_splits(tmp_path / "splits.json").fingerprint == first.fingerprint
    fewer_series = frame[frame["plane"] == "sagittal"]  # same patients and labels, other series
    with pytest.raises(OrthodiffError, match=r"splits.json: splits file exists but was made from another manifest"):
        _split(tmp_path, frame=fewer_series)


def test_cache_refuses_splits_of_another_manifest(tmp_path):
    from orthodiff.data.cache import PlaneCache
    from orthodiff.data.fingerprint import data_fingerprint
    from orthodiff.fileio import write_json, write_table

    frame = _manifest(20)
    cache = tmp_path / "cache"
    write_table(cache / "index.parquet", frame.assign(image="", seg=""))
    write_json(cache / "cache.json", {"format_version": 1, "plane_size": {}, "manifest": "m.parquet",
                                      "manifest_fingerprint": data_fingerprint(frame)})
    same = _split(tmp_path, "same.json", frame=frame)
    PlaneCache(cache).check_splits(same)
    PlaneCache(cache).check_splits(tmp_path / "absent.json")  # no splits file: nothing to compare
    other = _split(tmp_path, "other.json", frame=_manifest(12))
    with pytest.raises(OrthodiffError, match=r"other.json \(manifest manifest\) and .*cache.json \(manifest m.parquet\) "
                       r"come from different manifests"):
        PlaneCache(cache).check_splits(tmp_path / "other.json")
    assert other.fingerprint != same.fingerprint
