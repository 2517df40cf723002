"""The denoisers shipped with the package: what made them is recorded, they load into the demo's
configuration, and they denoise a real knee far better than the same network untrained."""

from __future__ import annotations

import shutil
from dataclasses import asdict

import pytest
import torch

from orthodiff.bench.data.pretraining import _IGNORED_PRETRAIN_KEYS
from orthodiff.bench.presets import resolve_preset
from orthodiff.config import load_config
from orthodiff.errors import OrthodiffError
from orthodiff.planes import PLANES
from orthodiff.pretrained import PROVENANCE, check_shipped, provenance, shipped_folder


def test_demo_config_is_the_small_bench_pretraining():
    """What makes the shipped weights fit the demo, and `demo --pretrain` redo them: the same network,
    diffusion, plane tensors and pretraining settings as the small bench preset."""
    demo = load_config(["demo"])
    bench = load_config([], resolve_preset("small")[0].config)
    assert asdict(demo.model) == asdict(bench.model)
    assert asdict(demo.diffusion) == asdict(bench.diffusion)
    assert demo.data.plane_size == bench.data.plane_size and demo.data.slab == bench.data.slab
    pretrain = {k: v for k, v in asdict(demo.pretrain).items() if k not in _IGNORED_PRETRAIN_KEYS}
    assert pretrain == {k: v for k, v in asdict(bench.pretrain).items() if k not in _IGNORED_PRETRAIN_KEYS}
    assert demo.seed == bench.seed


def test_provenance_records_the_commands_pool_and_flattened_loss():
    shipped = provenance()
    assert shipped["commands"][0].startswith("orthodiff bench label-fraction --preset small")
    assert shipped["pool_patients"] >= 2000 and shipped["heldout_patients"] > 0
    assert shipped["steps"] == load_config(["demo"]).pretrain.max_steps
    for plane in PLANES:
        curve = shipped["heldout_loss"][plane]
        assert curve[-1][0] == shipped["steps"] and curve[-1][1] < 0.5 * curve[0][1]


def test_shipped_denoisers_denoise_a_real_knee_better_than_untrained_ones(knee_dicom_dir):
    from orthodiff.data.prepare import to_plane_tensor
    from orthodiff.io.dicom import read_dicom_series
    from orthodiff.models.denoiser import Denoiser, load_denoisers
    from orthodiff.models.diffusion import denoising_loss, make_noise_scheduler

    cfg = load_config(["demo"])
    denoisers = load_denoisers(shipped_folder() / "denoisers", config=cfg.model)
    assert set(denoisers) == set(PLANES)
    volume = read_dicom_series(knee_dicom_dir, echo_index=0)
    tensor, _ = to_plane_tensor(volume, "sagittal", cfg.data.plane_size["sagittal"], slab=cfg.data.slab)
    samples = torch.from_numpy(tensor)[None].float().repeat(4, 1, 1, 1, 1)
    timesteps = torch.tensor([25, 100, 250, 500])
    noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(0))
    scheduler = make_noise_scheduler(cfg.diffusion)
    torch.manual_seed(0)
    untrained = Denoiser(cfg.model, "sagittal", cfg.data.plane_size["sagittal"], cfg.diffusion).eval()
    with torch.no_grad():
        pretrained_loss = float(denoising_loss(denoisers["sagittal"], scheduler, samples, timesteps, noise))
        untrained_loss = float(denoising_loss(untrained, scheduler, samples, timesteps, noise))
    assert pretrained_loss < 0.5 * untrained_loss, (pretrained_loss, untrained_loss)


def test_a_changed_shipped_file_is_refused(tmp_path):
    copy = tmp_path / "knee-small"
    shutil.copytree(shipped_folder(), copy)
    assert check_shipped(copy) == copy
    weights = copy / "denoisers" / "axial" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(OrthodiffError, match="model.safetensors: missing or changed since it was shipped"):
        check_shipped(copy)
    (copy / PROVENANCE).unlink()
    with pytest.raises(OrthodiffError, match="no shipped denoisers"):
        check_shipped(copy)
