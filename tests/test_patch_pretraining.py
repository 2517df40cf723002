"""Patch-based pretraining: seeded crops inside the plane, exact resume, whole-plane scoring and features.

Every run is the tiny denoiser of tests/pretrain_fixtures.py (base 8, multipliers 1,2) on 8 x 16 x 16
volumes, trained on 4 x 8 x 8 crops.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from orthodiff.config import load_config
from orthodiff.data.datasets import PlaneVolumeDataset
from orthodiff.errors import OrthodiffError
from orthodiff.features.extractor import FeatureExtractor
from orthodiff.models.denoiser import Denoiser
from orthodiff.training.checkpoints import list_checkpoints
from orthodiff.training.patches import DrawKeyedBatches, crop_seed, plane_patch_size
from orthodiff.training.pretrain import run_pretraining
from orthodiff.training.sampling import StepSeededBatchSampler
from orthodiff.training.tracking import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_fixtures import (  # noqa: E402
    TINY_SIZE,
    one_thread,
    preempt_after_checkpoint,
    tiny_config,
    write_fixture_cache,
    write_splits,
)

PATCH = (4, 8, 8)
PATCH_OVERRIDE = "pretrain.patch_size=[4,8,8]"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_fixture_cache(tmp_path_factory.mktemp("cache"), patients=6)


def _offset(volume: np.ndarray, crop: np.ndarray) -> tuple[int, int, int]:
    """Where ``crop`` (1, d, h, w) lies in ``volume`` (1, D, H, W); fails when it is nowhere inside."""
    windows = np.lib.stride_tricks.sliding_window_view(volume[0], crop.shape[1:])
    found = np.argwhere((windows == crop[0]).all(axis=(3, 4, 5)))
    assert len(found) >= 1, "the crop is not a part of the volume"
    return tuple(int(v) for v in found[0])


def test_crops_lie_inside_the_plane_at_the_requested_size(cache):
    whole = PlaneVolumeDataset(cache, "sagittal")
    patches = PlaneVolumeDataset(cache, "sagittal", patch_size=PATCH, seed=crop_seed(0, "sagittal"))
    offsets = []
    for micro_batch in range(40):
        index = micro_batch % len(patches)
        crop = patches[(index, (micro_batch, 0, 0))]
        assert crop.shape == (1, *PATCH) and crop.dtype == torch.float32
        offsets.append(_offset(whole[index].numpy(), crop.numpy()))
    # drawn over every position of each axis, from the first to the last that fits
    for axis, (size, patch) in enumerate(zip(TINY_SIZE, PATCH)):
        assert {o[axis] for o in offsets} <= set(range(size - patch + 1))
        assert min(o[axis] for o in offsets) == 0 and max(o[axis] for o in offsets) == size - patch
    with pytest.raises(OrthodiffError, match=r"address items as \(index, draw\)"):
        patches[0]
    with pytest.raises(OrthodiffError, match=r"patch_size \[4, 32, 8\]: does not fit inside the sagittal volumes"):
        PlaneVolumeDataset(cache, "sagittal", patch_size=(4, 32, 8))


def test_same_seed_draws_same_crops_another_seed_or_rank_others(cache):
    def crops(seed: int, keys) -> list[torch.Tensor]:
        dataset = PlaneVolumeDataset(cache, "sagittal", patch_size=PATCH, seed=seed)
        return [dataset[key] for key in keys]

    keys = [(i % 6, (i, 0, 0)) for i in range(12)]
    first, again = crops(crop_seed(0, "sagittal"), keys), crops(crop_seed(0, "sagittal"), keys)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_seed = crops(crop_seed(1, "sagittal"), keys)
    assert sum(not torch.equal(a, b) for a, b in zip(first, other_seed)) >= 6
    other_rank = crops(crop_seed(0, "sagittal"), [(index, (m, 1, slot)) for index, (m, _, slot) in keys])
    assert sum(not torch.equal(a, b) for a, b in zip(first, other_rank)) >= 6

    # The draw keys follow the micro-batch, so a sampler started at a checkpoint continues the stream.
    def stream(start: int, rank: int, count: int) -> list:
        sampler = StepSeededBatchSampler(6, 2, seed=5, rank=rank, world_size=2, start_micro_batch=start)
        return list(itertools.islice(DrawKeyedBatches(sampler), count))

    assert stream(3, 0, 4) == stream(0, 0, 7)[3:]
    assert [draw for _, draw in stream(0, 0, 1)[0]] == [(0, 0, 0), (0, 0, 1)]
    assert all(key[1][1] == 1 for batch in stream(0, 1, 3) for key in batch)


def test_patch_size_is_read_per_plane_and_checked(cache, tmp_path):
    one = tiny_config(cache, tmp_path, PATCH_OVERRIDE)
    assert [plane_patch_size(one, p) for p in ("sagittal", "axial")] == [PATCH, PATCH]
    per_plane = tiny_config(cache, tmp_path, "pretrain.patch_size.coronal=[8,8,16]")
    assert plane_patch_size(per_plane, "coronal") == (8, 8, 16)
    assert plane_patch_size(per_plane, "sagittal") is None  # a plane left out trains on whole planes
    assert plane_patch_size(tiny_config(cache, tmp_path), "sagittal") is None
    assert plane_patch_size(tiny_config(cache, tmp_path, "pretrain.patch_size={}"), "sagittal") is None
    assert load_config(["tiny"]).pretrain.patch_size is None

    bad = {
        "pretrain.patch_size.sagittal=[4,32,8]": r"pretrain.patch_size.sagittal=\[4, 32, 8\]: larger than the plane \[8, 16, 16\]",
        "pretrain.patch_size.sagittal=[3,8,8]": r"pretrain.patch_size.sagittal=\[3, 8, 8\]: each size must be a multiple of 2",
        "pretrain.patch_size.sagittal=[8,8]": r"pretrain.patch_size.sagittal=\[8, 8\]: give three positive integers",
        "pretrain.patch_size=[4,8,0]": r"pretrain.patch_size \(for sagittal\)=\[4, 8, 0\]: give three positive integers",
        "pretrain.patch_size.oblique=[4,8,8]": r"pretrain.patch_size.oblique: not a plane",
    }
    for override, message in bad.items():
        with pytest.raises(OrthodiffError, match=message) as error:
            run_pretraining(tiny_config(cache, tmp_path, override))
        assert "\n" not in str(error.value)
    assert not (tmp_path / "sagittal").exists() and not (tmp_path / "config.yaml").exists()


def test_resume_continues_a_patch_run_exactly(cache, tmp_path, monkeypatch):
    overrides = (PATCH_OVERRIDE, "pretrain.max_steps=3", "pretrain.checkpoint_every=2",
                 "pretrain.gradient_accumulation_steps=2")
    run_pretraining(tiny_config(cache, tmp_path / "straight", *overrides))

    resumed_cfg = tiny_config(cache, tmp_path / "resumed", *overrides)
    preempt_after_checkpoint(monkeypatch, resumed_cfg, step=2)
    run_pretraining(resumed_cfg)

    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / "sagittal" / "checkpoints")] == [2, 3]
    losses = {run: [m["loss"] for m in read_metrics(tmp_path / run / "sagittal" / "metrics.jsonl")]
              for run in ("straight", "resumed")}
    assert len(losses["resumed"]) == 3 and losses["resumed"] == losses["straight"]
    for relative in ("sagittal/checkpoints/step-000003/model.safetensors", "denoisers/sagittal/model.safetensors"):
        straight, resumed = load_file(str(tmp_path / "straight" / relative)), load_file(str(tmp_path / "resumed" / relative))
        for name in straight:
            torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-7, msg=name)

    # The finished run resumed with whole planes (or another crop) is another run: refused in one line.
    longer = tiny_config(cache, tmp_path / "resumed", "pretrain.max_steps=4", "pretrain.checkpoint_every=2",
                         "pretrain.gradient_accumulation_steps=2")
    with pytest.raises(OrthodiffError, match=r"another patch_size \(\[.*\] in the checkpoint vs None now\)"):
        run_pretraining(longer)


def test_patch_training_scores_and_reads_whole_planes(cache, tmp_path, monkeypatch):
    splits = write_splits(tmp_path / "splits.json", ["P0001", "P0002", "P0003", "P0004"], ["P0005"], ["P0006"])
    cfg = tiny_config(cache, tmp_path / "run", PATCH_OVERRIDE, f"data.splits={splits}", "pretrain.eval_every=2",
                      "pretrain.max_steps=2", "pretrain.batch_size=3")
    seen: list[tuple] = []
    forward = Denoiser.forward

    def recording_forward(self, x, timesteps):
        seen.append((self.training, tuple(x.shape)))
        return forward(self, x, timesteps)

    monkeypatch.setattr(Denoiser, "forward", recording_forward)
    outputs = run_pretraining(cfg)
    monkeypatch.setattr(Denoiser, "forward", forward)

    assert {shape for training, shape in seen if training} == {(3, 1, *PATCH)}
    # the held-out loss (EMA weights, eval mode) scores the val patient's whole plane
    assert {shape for training, shape in seen if not training} == {(1, 1, *TINY_SIZE)}
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "sagittal" / "metrics.jsonl") if "heldout_loss" in r] == [2]

    denoiser = Denoiser.from_pretrained(outputs["sagittal"], plane="sagittal")
    assert denoiser.plane_size == TINY_SIZE
    images = PlaneVolumeDataset(cache, "sagittal")[0][None]
    blocks = denoiser.block_names()
    with torch.no_grad():
        features = FeatureExtractor(denoiser, [100], blocks, seed=0)(images, ["knee-0001"])
    for block in blocks:
        channels, depth, height, width = denoiser.feature_shape(block)
        assert features[(block, "100")].shape == (1, channels, depth, height, width)
    # the bottleneck follows the whole plane, not the crops the denoiser trained on
    assert features[("mid", "100")].shape[2:] == tuple(s // 2 for s in TINY_SIZE) != tuple(s // 2 for s in PATCH)
    assert all(torch.isfinite(value).all() for value in features.values())


def test_bench_pretraining_key_changes_only_with_crops(cache, tmp_path):
    """A bench's cached whole-plane pretraining keeps its key; a crop size is a pretraining of its own."""
    from dataclasses import asdict

    from orthodiff.bench.data.pretraining import _IGNORED_PRETRAIN_KEYS, _digest, pretrain_key

    whole = tiny_config(cache, tmp_path)
    settings = {k: v for k, v in asdict(whole.pretrain).items() if k not in (*_IGNORED_PRETRAIN_KEYS, "patch_size")}
    without_the_field = _digest({"model": asdict(whole.model), "pretrain": settings, "seed": 0,
                                 "patients": ["P1"], "cache": "c"})
    assert pretrain_key(whole, ["P1"], "c") == without_the_field
    assert pretrain_key(tiny_config(cache, tmp_path, "pretrain.patch_size={}"), ["P1"], "c") == without_the_field
    assert pretrain_key(tiny_config(cache, tmp_path, PATCH_OVERRIDE), ["P1"], "c") != without_the_field
