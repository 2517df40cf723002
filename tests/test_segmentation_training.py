"""Segmentation trained by optimizer steps: the step budget and early stopping recorded in run.json
and metrics.jsonl, the per-voxel (pixel) segmenter and its validated block x timestep choice, and
class-balanced loss weights."""

import json

import numpy as np
import pytest
import torch
from tiny_archive import one_torch_thread, shared_tiny_project, tiny_config  # noqa: F401 (autouse fixture)

from orthodiff.errors import OrthodiffError
from orthodiff.finetune.endtoend import pixel_cells
from orthodiff.finetune.run import run_finetune
from orthodiff.heads.segmentation import PixelSegmenter, class_weights

SEGMENT = ["finetune.task=segment", "finetune.mode=probe", "finetune.learning_rate=1e-2"]


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    return shared_tiny_project(tmp_path_factory)


def _log(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_decoder_trains_exactly_max_steps_and_records_the_curve(project, tmp_path):
    cfg = tiny_config(project, tmp_path, *SEGMENT, "finetune.max_steps=5", "finetune.eval_every=2",
                      "finetune.epochs=1")  # the step budget outlasts one epoch (two batches)
    result = run_finetune(cfg)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["steps"] == 5 and info["stopped_early"] is False and info["best_step"] in (2, 4, 5)
    assert info["segmenter"] == "decoder" and len(info["class_weights"]) == 3
    rows = _log(result.run_dir)
    assert [r["step"] for r in rows] == [2, 4, 5]
    assert all(np.isfinite(r["train_loss"]) and r["val_mean_dice"] is not None for r in rows)
    assert max(r["val_mean_dice"] for r in rows) == pytest.approx(result.metrics["val"]["mean_dice"])


def test_patience_stops_a_run_that_cannot_improve(project, tmp_path):
    # learning rate 0: the weights never move, so the second validation is no better than the first
    cfg = tiny_config(project, tmp_path, *SEGMENT, "finetune.learning_rate=0", "finetune.max_steps=50",
                      "finetune.eval_every=1", "finetune.patience=1")
    info = json.loads((run_finetune(cfg).run_dir / "run.json").read_text())
    assert info["stopped_early"] is True and info["steps"] == 2 and info["best_step"] == 1


def test_pixel_segmenter_chooses_blocks_and_timesteps_on_validation(project, tmp_path):
    cfg = tiny_config(project, tmp_path, *SEGMENT, "finetune.segmenter=pixel", "finetune.max_steps=2",
                      "finetune.pixel_blocks=[up1,up2]", "finetune.pixel_timesteps=[10]", "finetune.pixel_hidden=8")
    result = run_finetune(cfg)
    info = json.loads((result.run_dir / "run.json").read_text())
    cells = info["pixel"]["cells"]
    assert [(c["blocks"], c["timesteps"]) for c in cells] == [(["up1", "up2"], [10]), (["up2"], [10])]
    best = max(cells, key=lambda c: c["val_mean_dice"])
    assert info["pixel"]["chosen"] == {"blocks": best["blocks"], "timesteps": best["timesteps"]}
    assert info["metrics"]["val"]["mean_dice"] == pytest.approx(best["val_mean_dice"])
    assert all(c["steps"] == 2 for c in cells) and info["steps"] == 2
    assert {r["cell"] for r in _log(result.run_dir)} == {0, 1}
    head = json.loads((result.run_dir / "head.json").read_text())
    assert head["features"]["segmenter"] == "pixel"
    row = __import__("pandas").read_csv(result.run_dir / "segmentations" / "index.csv").iloc[0]
    assert np.load(result.run_dir / row["pred"]).shape == (8, 16, 16)


def test_pixel_head_gives_logits_at_the_plane_size():
    channels = {"sagittal": {"up0@10": 16, "up2@10": 8, "up2@50": 8}, "axial": {"up2@10": 8}}
    sizes = {"sagittal": (8, 32, 32), "axial": (4, 16, 16)}
    head = PixelSegmenter(channels, sizes, num_classes=5, hidden=6)
    features = {"sagittal": {"up0@10": torch.randn(2, 16, 2, 8, 8), "up2@10": torch.randn(2, 8, 8, 32, 32),
                             "up2@50": torch.randn(2, 8, 8, 32, 32)},
                "axial": {"up2@10": torch.randn(2, 8, 2, 8, 8)}}
    images = {"sagittal": torch.randn(2, 1, 8, 32, 32), "axial": torch.randn(2, 1, 4, 16, 16)}
    out = head(features, torch.ones(2, 3, dtype=torch.bool), images)
    assert out["sagittal"].shape == (2, 5, 8, 32, 32) and out["axial"].shape == (2, 5, 4, 16, 16)
    out["sagittal"].sum().backward()
    assert head.projections["sagittal"]["up0@10"].weight.grad.abs().sum() > 0  # the coarse block has a say
    with pytest.raises(OrthodiffError, match="image"):
        head(features, None, {})


def test_pixel_grid_cells():
    assert pixel_cells(["up0", "up1", "up2"], [50, 150], grid=False) == [(["up0", "up1", "up2"], [50, 150])]
    cells = pixel_cells(["up0", "up1", "up2"], [50, 150], grid=True)
    assert len(cells) == 6 and (["up1", "up2"], [150]) in cells and (["up0", "up1", "up2"], [50, 150]) in cells


def test_class_weights_follow_inverse_square_root_frequency():
    weights = class_weights([9000, 900, 100, 0])
    assert weights.mean().item() == pytest.approx(1.0)
    assert (weights[1] / weights[0]).item() == pytest.approx(10**0.5, rel=1e-4)
    assert (weights[2] / weights[1]).item() == pytest.approx(3.0, rel=1e-4)
    assert weights[3] == weights[:3].max()  # never seen in training: the largest weight
    capped = class_weights([10**8, 1], cap=10.0)
    assert (capped[1] / capped[0]).item() == pytest.approx(10.0)
    with pytest.raises(OrthodiffError, match="voxel counts"):
        class_weights([0, 0])


def test_unknown_segmenter_is_refused(project, tmp_path):
    with pytest.raises(OrthodiffError, match="finetune.segmenter"):
        run_finetune(tiny_config(project, tmp_path, *SEGMENT, "finetune.segmenter=unet"))


def test_channels_last_trains_the_same_decoder_in_another_memory_order(project, tmp_path, monkeypatch):
    from orthodiff.finetune import endtoend
    from orthodiff.finetune.endtoend import use_channels_last
    from orthodiff.heads.segmentation import ConvBlock

    converted = []
    monkeypatch.setattr(endtoend, "use_channels_last", lambda model: converted.append(model) or use_channels_last(model))
    runs = {}
    for channels_last in (False, True):
        cfg = tiny_config(project, tmp_path / str(channels_last), *SEGMENT, "finetune.mode=partial",
                          "finetune.max_steps=3", "finetune.eval_every=3", "finetune.augment=false",
                          f"finetune.channels_last={str(channels_last).lower()}")
        runs[channels_last] = _log(run_finetune(cfg).run_dir)
        assert len(converted) == int(channels_last)  # only the run that asks for it is converted
    # the same arithmetic in another summation order: the same losses and Dice up to rounding
    assert runs[True][0]["train_loss"] == pytest.approx(runs[False][0]["train_loss"], rel=1e-4)
    assert runs[True][0]["val_mean_dice"] == pytest.approx(runs[False][0]["val_mean_dice"], abs=1e-3)
    block = use_channels_last(ConvBlock(2, 4))
    assert block[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not block[0].weight.is_contiguous()


def test_poly_schedule_decays_the_learning_rate_over_the_step_budget(project, tmp_path, monkeypatch):
    from orthodiff.baselines import dynunet

    calls = []
    poly = dynunet.poly_factor
    monkeypatch.setattr(dynunet, "poly_factor", lambda step, total: calls.append((step, total)) or poly(step, total))
    cfg = tiny_config(project, tmp_path, *SEGMENT, "finetune.max_steps=3", "finetune.eval_every=3",
                      "finetune.lr_schedule=poly")
    run_finetune(cfg)
    assert calls == [(0, 3), (1, 3), (2, 3)]  # every step, against the whole budget
    assert poly(0, 3) == 1.0 and poly(2, 3) == pytest.approx((1 / 3) ** 0.9)
    calls.clear()
    run_finetune(tiny_config(project, tmp_path / "constant", *SEGMENT, "finetune.max_steps=3"))
    assert calls == []  # the default rate stays constant
    with pytest.raises(OrthodiffError, match="finetune.lr_schedule='cosine': use constant or poly"):
        run_finetune(tiny_config(project, tmp_path / "bad", *SEGMENT, "finetune.max_steps=3",
                                 "finetune.lr_schedule=cosine"))


def test_same_seed_trains_the_same_segmenter_and_another_seed_does_not(project, tmp_path):
    # end to end with augmentation on: the augmentation draws, batch order and initialisation all
    # follow the seed, so a rerun gives the same curve and predictions to the last bit
    def run(name, seed):
        cfg = tiny_config(project, tmp_path / name, *SEGMENT, "finetune.mode=partial", "finetune.augment=true",
                          "finetune.max_steps=3", "finetune.eval_every=3", f"seed={seed}")
        run_dir = run_finetune(cfg).run_dir
        return _log(run_dir), [p.read_bytes() for p in sorted((run_dir / "segmentations").rglob("*.npy"))]

    first, second, other = run("a", 0), run("b", 0), run("c", 1)
    assert first[0] == second[0] and first[1] == second[1] and first[1]
    assert first[0][0]["train_loss"] != other[0][0]["train_loss"]
