"""The raw-voxel floor: a logistic probe on average-pooled plane tensors."""

from __future__ import annotations

import pytest
import torch

from orthodiff.baselines import BASELINES, build_baseline
from orthodiff.errors import OrthodiffError

PLANES = ("sagittal", "coronal", "axial")
SIZE = (4, 16, 16)


def _batch(n: int = 4) -> dict:
    torch.manual_seed(0)
    return {"images": {p: torch.randn(n, 1, *SIZE) for p in PLANES}, "present": torch.ones(n, 3, dtype=torch.bool)}


def test_raw_voxels_is_a_linear_probe_on_pooled_planes():
    assert "raw-voxels" in BASELINES
    model = build_baseline("raw-voxels", ["a", "b"], SIZE, grid=(2, 4, 4))
    # one linear layer: 3 planes x 32 pooled voxels + 3 presence flags, per label
    assert [tuple(p.shape) for p in model.parameters()] == [(2, 3 * 32 + 3), (2,)]
    batch = _batch()
    model.train()
    assert model(batch).shape == (4, 2)
    model.eval()
    pooled, _ = model.features(batch)
    expected = torch.nn.functional.adaptive_avg_pool3d(batch["images"]["coronal"], (2, 4, 4)).flatten(1)
    assert torch.allclose(pooled[:, 32:64], expected)


def test_an_absent_plane_contributes_nothing():
    model = build_baseline("raw-voxels", ["a"], SIZE).eval()
    batch = _batch()
    batch["present"][:, 2] = False
    before = model(batch)
    batch["images"]["axial"] = batch["images"]["axial"] * 100 + 7
    assert torch.allclose(model(batch), before)


def test_a_bad_grid_is_refused():
    with pytest.raises(OrthodiffError, match="grid"):
        build_baseline("raw-voxels", ["a"], SIZE, grid=(2, 4))
