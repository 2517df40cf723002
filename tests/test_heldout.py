"""The pretraining held-out loss: logged every N steps on fixed validation volumes, timesteps and
noise, so the same run gives the same curve and the curve measures the exported (EMA) weights."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from orthodiff.errors import OrthodiffError
from orthodiff.training.heldout import PLOT_NAME, HeldoutLoss, heldout_timesteps
from orthodiff.training.pretrain import run_pretraining
from orthodiff.training.tracking import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_fixtures import one_thread, tiny_config, write_fixture_cache, write_splits  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = write_fixture_cache(tmp_path_factory.mktemp("cache"), patients=6)
    write_splits(root / "splits.json", ["P0001", "P0002", "P0003"], ["P0004", "P0005"], ["P0006"])
    return root


def _config(cache: Path, out: Path, *overrides: str):
    return tiny_config(cache, out, f"data.splits={cache / 'splits.json'}", "pretrain.max_steps=3",
                       "pretrain.checkpoint_every=3", "pretrain.eval_every=2", "pretrain.eval_volumes=2", *overrides)


def test_heldout_timesteps_spread_over_the_schedule():
    assert heldout_timesteps(1000) == [62, 187, 312, 437, 562, 687, 812, 937]
    assert heldout_timesteps(4, count=8) == [0, 1, 2, 3]


def test_heldout_loss_is_logged_plotted_and_reproducible(cache, tmp_path):
    from orthodiff.models.denoiser import Denoiser

    first = _config(cache, tmp_path / "first")
    run_pretraining(first)
    records = [r for r in read_metrics(tmp_path / "first" / "sagittal" / "metrics.jsonl") if "heldout_loss" in r]
    assert [r["step"] for r in records] == [2, 3]  # every 2 steps, and the last step (the exported weights)
    assert all(math.isfinite(r["heldout_loss"]) and r["heldout_loss"] > 0 for r in records)
    assert (tmp_path / "first" / "sagittal" / PLOT_NAME).stat().st_size > 0

    # The last record scores the exported EMA weights on the val volumes, recomputed from scratch.
    exported = Denoiser.from_pretrained(tmp_path / "first" / "denoisers" / "sagittal")
    heldout = HeldoutLoss(first, "sagittal", "cpu")
    assert heldout.series == ["knee-0004/sagittal", "knee-0005/sagittal"]  # val patients only
    assert heldout(exported) == pytest.approx(records[-1]["heldout_loss"], rel=1e-5)
    assert heldout(exported) == heldout(exported)  # fixed noise: the same number every call

    # Another run of the same config logs the same curve.
    run_pretraining(_config(cache, tmp_path / "second"))
    again = [r for r in read_metrics(tmp_path / "second" / "sagittal" / "metrics.jsonl") if "heldout_loss" in r]
    assert [r["heldout_loss"] for r in again] == [r["heldout_loss"] for r in records]


def test_heldout_patients_are_left_out_of_pretraining(cache, tmp_path):
    """A held-out loss on volumes the model trained on would hide overfitting: with it on, pretraining
    learns from the train patients only; without it, from train and val."""
    from orthodiff.training.pretrain import open_plane_dataset

    scored = open_plane_dataset(_config(cache, tmp_path / "scored"), "sagittal")
    assert scored.series_ids == ["knee-0001/sagittal", "knee-0002/sagittal", "knee-0003/sagittal"]
    unscored = open_plane_dataset(_config(cache, tmp_path / "unscored", "pretrain.eval_every=0"), "sagittal")
    assert unscored.series_ids == [f"knee-000{i}/sagittal" for i in range(1, 6)]


def test_heldout_loss_needs_val_patients(cache, tmp_path):
    cfg = tiny_config(cache, tmp_path / "none", "pretrain.eval_every=2")  # splits file missing
    with pytest.raises(OrthodiffError, match="pretrain.eval_every=2: held-out volumes come from the val patients"):
        run_pretraining(cfg)
    with pytest.raises(OrthodiffError, match="pretrain.eval_every=-1"):
        run_pretraining(_config(cache, tmp_path / "negative", "pretrain.eval_every=-1"))
