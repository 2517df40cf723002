"""The per-plane denoiser: forward equal to MONAI's, features early-exit, checkpoints, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from orthodiff.config import DenoiserConfig, DiffusionConfig
from orthodiff.errors import OrthodiffError
from orthodiff.models.denoiser import Denoiser, load_denoisers
from orthodiff.models.diffusion import make_noise_scheduler, min_snr_weights, training_target

SIZE = (8, 16, 16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared CPU
    yield
    torch.set_num_threads(before)


def tiny_config(**changes) -> DenoiserConfig:
    base = DenoiserConfig(
        base_channels=8, channel_mult=[1, 2], attention_levels=[False, True], num_head_channels=8, norm_num_groups=8
    )
    return dataclasses.replace(base, **changes)


def randomised(model: Denoiser, seed: int = 0) -> Denoiser:
    """MONAI zero-initialises the output convolution; give every weight a value so outputs mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Denoiser:
    torch.manual_seed(0)
    return randomised(Denoiser(tiny_config(), "sagittal", SIZE))


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, *SIZE, generator=generator), torch.tensor([3, 700])


def test_forward_equals_monai_forward(model, inputs):
    x, t = inputs
    with torch.no_grad():
        ours, theirs = model(x, t), model.unet(x, t)
    assert ours.shape == (2, 1, *SIZE)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_features_equal_forward_hooks_and_stop_early(model, inputs):
    x, t = inputs
    unet = model.unet
    modules = {f"down{i}": b for i, b in enumerate(unet.down_blocks)}
    modules["mid"] = unet.middle_block
    modules.update({f"up{i}": b for i, b in enumerate(unet.up_blocks)})
    assert model.block_names() == list(modules)

    hooked = {}
    handles = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: hooked.__setitem__(name, out[0] if isinstance(out, tuple) else out)
        )
        for name, module in modules.items()
    ]
    with torch.no_grad():
        model(x, t)
    for handle in handles:
        handle.remove()

    with torch.no_grad():
        features = model.features(x, t, model.block_names())
    for name in model.block_names():
        torch.testing.assert_close(features[name], hooked[name], rtol=0, atol=0)
        assert tuple(features[name].shape[1:]) == model.feature_shape(name)
        assert model.feature_channels(name) == features[name].shape[1]

    # Early exit: asking for "mid" never runs a decoder block or the output head.
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in [*unet.up_blocks, unet.out]]
    with torch.no_grad():
        only_mid = model.features(x, t, ["mid", "down0"])
    for handle in handles:
        handle.remove()
    assert calls == []
    assert set(only_mid) == {"mid", "down0"}


def test_runtime_options_keep_the_maths(inputs):
    x, t = inputs
    torch.manual_seed(0)
    plain = randomised(Denoiser(tiny_config(sdpa=False), "sagittal", SIZE))
    options = Denoiser(tiny_config(sdpa=True, channels_last=True, gradient_checkpointing=True), "sagittal", SIZE)
    options.load_state_dict(plain.state_dict())
    options.eval()
    with torch.no_grad():
        torch.testing.assert_close(options(x, t), plain(x, t), rtol=1e-4, atol=1e-5)

    # Gradient checkpointing recomputes blocks in backward: the same gradients.
    plain.train()
    options.train()
    for network in (plain, options):
        network.zero_grad()
        network(x, t).pow(2).mean().backward()
    for (name, a), b in zip(plain.named_parameters(), options.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=name)

    compiled = Denoiser(tiny_config(compile=True), "sagittal", SIZE)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # names unchanged by compile


def test_save_and_load_round_trip(model, inputs, tmp_path):
    x, t = inputs
    model.save_pretrained(tmp_path / "sagittal")
    saved = json.loads((tmp_path / "sagittal" / "config.json").read_text())
    assert saved["format"] == "orthodiff-denoiser" and saved["version"] == 1
    assert saved["plane"] == "sagittal" and saved["plane_size"] == list(SIZE)
    assert saved["model"]["channel_mult"] == [1, 2]
    assert not list(tmp_path.rglob("*.tmp*"))

    asked = tiny_config(gradient_checkpointing=True)
    loaded = Denoiser.from_pretrained(tmp_path / "sagittal", plane="sagittal", config=asked)
    assert loaded.config.gradient_checkpointing is True  # runtime option of the asked config applied
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)
    all_planes = load_denoisers(tmp_path)
    assert list(all_planes) == ["sagittal"]


def test_checkpoint_mismatches_are_one_line_errors(model, tmp_path):
    model.save_pretrained(tmp_path / "sagittal")
    with pytest.raises(OrthodiffError, match="sagittal denoiser, not axial"):
        Denoiser.from_pretrained(tmp_path / "sagittal", plane="axial")
    with pytest.raises(OrthodiffError, match="another model configuration.*base_channels 8 in the checkpoint vs 16"):
        Denoiser.from_pretrained(tmp_path / "sagittal", config=tiny_config(base_channels=16))
    with pytest.raises(OrthodiffError, match="not a denoiser checkpoint"):
        Denoiser.from_pretrained(tmp_path / "nowhere")
    # A config.json that does not describe the weights beside it.
    config = json.loads((tmp_path / "sagittal" / "config.json").read_text())
    config["model"]["num_res_blocks"] = 2
    (tmp_path / "sagittal" / "config.json").write_text(json.dumps(config))
    with pytest.raises(OrthodiffError, match="weights do not match config.json"):
        Denoiser.from_pretrained(tmp_path / "sagittal")


@pytest.mark.parametrize(
    "changes, size, message",
    [
        ({"attention_levels": [True]}, SIZE, "attention_levels has 1 entries"),
        ({"norm_num_groups": 5}, SIZE, "norm_num_groups=5"),
        ({"num_head_channels": 3}, SIZE, "num_head_channels=3"),
        ({}, (7, 16, 16), r"multiple of 2"),
    ],
)
def test_bad_config_is_rejected(changes, size, message):
    with pytest.raises(OrthodiffError, match=message):
        Denoiser(tiny_config(**changes), "sagittal", size)


def test_bad_plane_block_and_timesteps(model, inputs):
    x, _ = inputs
    with pytest.raises(OrthodiffError, match="not a plane"):
        Denoiser(tiny_config(), "oblique", SIZE)
    with pytest.raises(OrthodiffError, match="feature block 'bottleneck' does not exist"):
        model.features(x, torch.tensor([1, 2]), ["bottleneck"])
    with pytest.raises(OrthodiffError, match="timesteps of shape"):
        model(x, torch.tensor([1, 2, 3]))


def test_objective_targets_and_min_snr():
    generator = torch.Generator().manual_seed(0)
    samples, noise = torch.randn(4, 1, 2, 4, 4, generator=generator), torch.randn(4, 1, 2, 4, 4, generator=generator)
    timesteps = torch.tensor([1, 10, 500, 990])
    eps = make_noise_scheduler(DiffusionConfig())
    assert eps.config.beta_schedule == "squaredcos_cap_v2" and eps.config.num_train_timesteps == 1000
    assert torch.equal(training_target(eps, samples, noise, timesteps), noise)
    v = make_noise_scheduler(DiffusionConfig(prediction_type="v_prediction"))
    alpha = v.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1, 1)
    sigma = (1 - v.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(training_target(v, samples, noise, timesteps), alpha * noise - sigma * samples)
    weights = min_snr_weights(eps, timesteps, gamma=5.0)
    assert weights[0] < 1e-2 and weights[-1] == pytest.approx(1.0)  # low t (high SNR) down-weighted
    assert min_snr_weights(eps, timesteps, gamma=None) is None
    with pytest.raises(OrthodiffError, match="prediction_type"):
        make_noise_scheduler(DiffusionConfig(prediction_type="sample"))
