"""Feature extraction (seeded, early exit) and the feature store (reuse, refusal)."""

import json

import numpy as np
import pytest
import torch
from tiny_archive import (  # noqa: F401 (autouse fixture)
    TINY_OVERRIDES,
    one_torch_thread,
    shared_tiny_project,
    tiny_config,
)

from orthodiff.config import load_config
from orthodiff.errors import OrthodiffError
from orthodiff.features.extractor import FeatureExtractor, noise_seed, seeded_noise
from orthodiff.models.denoiser import Denoiser

SIZE = (8, 16, 16)


@pytest.fixture(scope="module")
def denoiser():
    cfg = load_config([], TINY_OVERRIDES)
    torch.manual_seed(0)
    return Denoiser(cfg.model, "sagittal", SIZE, cfg.diffusion).eval()


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    return shared_tiny_project(tmp_path_factory)


def _images(batch=2):
    return torch.rand(batch, 1, *SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_noise_seed_is_stable_and_keyed():
    assert noise_seed(0, "knee-0001", "sagittal") == noise_seed(0, "knee-0001", "sagittal")
    keys = {noise_seed(0, "knee-0001", "sagittal"), noise_seed(1, "knee-0001", "sagittal"),
            noise_seed(0, "knee-0002", "sagittal"), noise_seed(0, "knee-0001", "coronal"),
            noise_seed(0, "knee-0001", "sagittal", draw=1)}
    assert len(keys) == 5
    # A known value: the seed must not change between processes, machines or Python versions.
    assert noise_seed(0, "knee-0001", "sagittal") == 8221253435269917254


def test_noise_does_not_depend_on_batch_composition():
    together = seeded_noise((1, 2, 2, 2), 0, ["a", "b"], "axial")
    alone = seeded_noise((1, 2, 2, 2), 0, ["b"], "axial")
    assert torch.equal(together[1], alone[0])


def test_features_equal_with_same_seed_and_differ_with_another(denoiser):
    images = _images()
    with torch.no_grad():
        first = FeatureExtractor(denoiser, [100], ["mid"], seed=0)(images, ["s1", "s2"])
        again = FeatureExtractor(denoiser, [100], ["mid"], seed=0)(images, ["s1", "s2"])
        other = FeatureExtractor(denoiser, [100], ["mid"], seed=1)(images, ["s1", "s2"])
    key = ("mid", "100")
    assert first[key].shape == (2, *denoiser.feature_shape("mid"))
    assert torch.equal(first[key], again[key])
    assert not torch.allclose(first[key], other[key])


def test_early_exit_mid_features_equal_a_full_forward(denoiser):
    images = _images()
    extractor = FeatureExtractor(denoiser, [100], ["mid"], seed=0)
    captured = {}
    hook = denoiser.unet.middle_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    decoder = denoiser.unet.up_blocks[0].register_forward_hook(lambda m, i, o: captured.setdefault("decoder", o))
    try:
        with torch.no_grad():
            early = extractor(images, ["s1", "s2"])[("mid", "100")]
            assert "mid" in captured and "decoder" not in captured  # stopped after the middle block
            captured.clear()
            noise = seeded_noise(images.shape[1:], 0, ["s1", "s2"], "sagittal")
            t = torch.full((2,), 100)
            denoiser(extractor.scheduler.add_noise(images, noise, t), t)  # ... and a full forward too
    finally:
        hook.remove()
        decoder.remove()
    assert "decoder" in captured
    assert torch.allclose(early, captured["mid"], atol=1e-6)


def test_timestep_and_noise_averaging(denoiser):
    images = _images()
    with torch.no_grad():
        separate = FeatureExtractor(denoiser, [50, 200], ["mid"], seed=0)(images, ["a", "b"])
        averaged = FeatureExtractor(denoiser, [50, 200], ["mid"], seed=0, average_timesteps=True)(images, ["a", "b"])
        draws = FeatureExtractor(denoiser, [50], ["mid"], seed=0, noise_draws=2)(images, ["a", "b"])
    assert list(averaged) == [("mid", "50+200")]
    expected = (separate[("mid", "50")] + separate[("mid", "200")]) / 2
    assert torch.allclose(averaged[("mid", "50+200")], expected, atol=1e-6)
    assert not torch.allclose(draws[("mid", "50")], separate[("mid", "50")])


def test_extractor_rejects_unknown_block_and_timestep(denoiser):
    with pytest.raises(OrthodiffError, match="features.blocks"):
        FeatureExtractor(denoiser, [100], ["middle"])
    with pytest.raises(OrthodiffError, match="features.timesteps"):
        FeatureExtractor(denoiser, [5000], ["mid"])


def test_store_caches_every_study_reuses_and_refuses_other_settings(project, tmp_path):
    from orthodiff.data.cache import PlaneCache
    from orthodiff.features.backbones import build_denoisers
    from orthodiff.features.store import FeatureStore, run_extraction

    cfg = tiny_config(project, tmp_path)
    path = run_extraction(cfg)
    store = FeatureStore(path)
    cache = PlaneCache(project["cache"])
    assert set(store.index["study_id"]) == set(cache.index["study_id"])  # every split
    rows = store.rows("coronal")
    array = store.array("coronal", "mid", "100")
    assert array.shape[0] == len(rows) and array.dtype == np.float16

    # Row i holds exactly what the extractor gives for that study.
    denoiser = build_denoisers(cfg, ["coronal"], cache.plane_size)["coronal"]
    row = rows.iloc[3]
    image = torch.from_numpy(np.asarray(cache.image(row["series_id"]), dtype=np.float32))[None]
    with torch.no_grad():
        direct = FeatureExtractor(denoiser, [100], ["mid"], seed=cfg.seed)(image, [row["study_id"]])[("mid", "100")]
    assert np.allclose(array[int(row["row"])], direct[0].numpy(), atol=2e-3)

    # The store says what computed it, with TF32 off (the float32 numbers predict computes too).
    device = json.loads((path / "features.json").read_text())["device"]
    assert device["type"] == "cpu" and device["tf32"] is False and device["torch"] == torch.__version__

    stamp = (path / "features.json").stat().st_mtime_ns
    assert run_extraction(cfg) == path and (path / "features.json").stat().st_mtime_ns == stamp  # reused

    other = tiny_config(project, tmp_path, "features.timesteps=[200]")
    with pytest.raises(OrthodiffError, match=r"built with timesteps \[100\] \(this run: \[200\]\)"):
        run_extraction(other)
    with pytest.raises(OrthodiffError, match="holds no block 'down0' at t=100"):
        store.require([("down0", "100")])
    scratch = tiny_config(project, tmp_path, "finetune.init=scratch")
    with pytest.raises(OrthodiffError, match=r"init pretrained \(this run: scratch\)"):
        run_extraction(scratch)


def test_checkpoint_of_another_plane_is_refused(project, tmp_path):
    import shutil

    from orthodiff.features.backbones import build_denoisers

    denoisers = tmp_path / "pretrain" / "denoisers"
    shutil.copytree(project["pretrained"] / "denoisers" / "coronal", denoisers / "sagittal")
    cfg = tiny_config(project, tmp_path, f"finetune.pretrained={tmp_path / 'pretrain'}")
    with pytest.raises(OrthodiffError, match="coronal denoiser, not sagittal"):
        build_denoisers(cfg, ["sagittal"], project["plane_size"])


def test_feature_selection_composes_maps_on_the_first_ones_grid():
    from orthodiff.features.selection import compose, composed_shape, parse_key, plane_sampling

    fine, coarse = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 6, 2, 4, 4)
    assert compose([coarse, fine]).shape == (2, 10, 2, 4, 4)  # the fine map is area-averaged down
    assert torch.allclose(compose([coarse, fine])[:, 6:], torch.nn.functional.avg_pool3d(fine, 2), atol=1e-6)
    assert compose([fine, coarse]).shape == (2, 10, 4, 8, 8)  # the coarse map is interpolated up
    assert composed_shape([(6, 2, 4, 4), (4, 4, 8, 8)]) == (10, 2, 4, 4)
    assert plane_sampling(["up0@25", "mid@100", "up0@100"]) == ([25, 100], ["up0", "mid"], False)
    assert plane_sampling(["mid@50+100"]) == ([50, 100], ["mid"], True)
    assert parse_key("up1@50+100") == ("up1", "50+100")
    with pytest.raises(OrthodiffError, match="'mid' is not 'block@timestep'"):
        parse_key("mid")
    with pytest.raises(OrthodiffError, match="averaged timesteps cannot be mixed"):
        plane_sampling(["mid@50+100", "mid@25"])


def test_exact_float32_turns_tf32_off_and_restores_the_settings():
    from orthodiff.models.numerics import exact_float32

    backends = torch.backends
    saved = (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.deterministic,
             backends.cudnn.benchmark)
    backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark = True, True, True
    try:
        with exact_float32():
            assert not backends.cuda.matmul.allow_tf32 and not backends.cudnn.allow_tf32
            assert backends.cudnn.deterministic and not backends.cudnn.benchmark
        assert backends.cuda.matmul.allow_tf32 and backends.cudnn.allow_tf32 and backends.cudnn.benchmark
    finally:
        (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.deterministic,
         backends.cudnn.benchmark) = saved
