"""Supervised baselines: shapes, missing planes, a training step, determinism, clear errors."""

from __future__ import annotations

import pytest
import torch

from orthodiff.baselines import build_baseline
from orthodiff.errors import OrthodiffError
from orthodiff.planes import PLANES

LABELS = ["acl", "meniscus", "effusion"]
SIZE = {"sagittal": [4, 32, 32], "coronal": [3, 32, 32], "axial": [4, 32, 32]}
TINY = {"resnet3d": {"widen_factor": 0.125}, "mrnet2d": {"backbone": "test_resnet"}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run fastest on one thread; on a shared, loaded CPU many threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(seed=0, batch_size=4, present=None):
    generator = torch.Generator().manual_seed(seed)
    if present is None:  # study 1 lacks coronal, study 2 lacks axial; each plane still has 3 studies
        present = [[1, 1, 1], [1, 0, 1], [1, 1, 0], [0, 1, 1]][:batch_size]
    present = torch.tensor(present, dtype=torch.bool)
    images = {}
    for k, plane in enumerate(PLANES):
        images[plane] = torch.randn(batch_size, 1, *SIZE[plane], generator=generator)
        images[plane][~present[:, k]] = 0.0  # the Datasets contract: zeros when absent
    labels = torch.randint(0, 2, (batch_size, len(LABELS)), generator=generator).float()
    return {"images": images, "present": present, "labels": labels}


def build(name, seed=0):
    torch.manual_seed(seed)
    return build_baseline(name, LABELS, SIZE, **TINY[name])


@pytest.mark.parametrize("name", ["resnet3d", "mrnet2d"])
def test_output_shape(name):
    model = build(name).eval()
    with torch.no_grad():
        logits = model(make_batch())
    assert logits.shape == (4, len(LABELS)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["resnet3d", "mrnet2d"])
def test_missing_plane_ignores_its_image(name):
    """Whatever sits in an absent plane's image, the logits stay the same."""
    model = build(name).eval()
    batch = make_batch()
    noisy = make_batch()
    noisy["images"]["coronal"][1] = torch.randn(1, *SIZE["coronal"]) * 5  # study 1 lacks coronal
    with torch.no_grad():
        assert torch.allclose(model(batch), model(noisy), atol=1e-6)
        present_again = dict(noisy, present=torch.ones_like(noisy["present"]))
        assert not torch.allclose(model(noisy)[1], model(present_again)[1])


def test_resnet3d_learns_the_missing_plane_embedding():
    model = build("resnet3d")
    model(make_batch()).sum().backward()
    grad = model.missing_embedding.grad
    assert grad[PLANES.index("coronal")].abs().sum() > 0  # study 1 lacks coronal
    all_present = build("resnet3d")
    all_present(make_batch(present=[[1, 1, 1]] * 4)).sum().backward()
    assert all_present.missing_embedding.grad is None or all_present.missing_embedding.grad.abs().sum() == 0


@pytest.mark.parametrize("name", ["resnet3d", "mrnet2d"])
def test_trains_when_one_study_holds_a_plane_at_the_smallest_size(name):
    """At 4x16x16 the ResNet's last map is 1x1x1: batch norm needs more than the one present row."""
    torch.manual_seed(0)
    size = {plane: [4, 16, 16] for plane in PLANES}
    model = build_baseline(name, LABELS, size, **TINY[name]).train()
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 1]], dtype=torch.bool)
    batch = {"images": {p: torch.randn(3, 1, 4, 16, 16) * present[:, k, None, None, None, None]
                        for k, p in enumerate(PLANES)}, "present": present}
    model(batch).sum().backward()
    model.eval()
    with torch.no_grad():
        coronal = batch["images"]["coronal"].clone()
        coronal[1:] = torch.randn(2, 1, 4, 16, 16)  # rows 1 and 2 lack coronal
        noisy = dict(batch, images=dict(batch["images"], coronal=coronal))
        assert torch.allclose(model(batch), model(noisy), atol=1e-6)


def test_mrnet_combines_plane_logits_by_logistic_regression():
    model = build("mrnet2d").eval()
    batch = make_batch()
    with torch.no_grad():
        plane_logits, present = model.plane_logits(batch)
        expected = (plane_logits * model.combine_weight).sum(1) + model.combine_bias
        assert torch.allclose(model(batch), expected)
    assert plane_logits.shape == (4, 3, len(LABELS))
    assert (plane_logits[~present] == 0).all()


@pytest.mark.parametrize("name", ["resnet3d", "mrnet2d"])
def test_one_gradient_step_reduces_loss(name):
    model = build(name).train()
    batch = make_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    before = loss_fn(model(batch), batch["labels"])
    before.backward()
    optimizer.step()
    after = loss_fn(model(batch), batch["labels"])
    assert after.item() < before.item()


@pytest.mark.parametrize("name", ["resnet3d", "mrnet2d"])
def test_deterministic_under_seed(name):
    batch = make_batch()
    with torch.no_grad():
        first, second, other = (build(name, seed).eval()(batch) for seed in (0, 0, 1))
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_bad_arguments_give_clear_errors():
    with pytest.raises(OrthodiffError, match="baseline 'vit9' is unknown; use one of resnet3d, mrnet2d"):
        build_baseline("vit9", LABELS, SIZE)
    with pytest.raises(OrthodiffError, match=r"plane_size\['axial'\]"):
        build_baseline("resnet3d", LABELS, {"sagittal": [4, 32, 32], "coronal": [4, 32, 32]})
    with pytest.raises(OrthodiffError, match="labels"):
        build_baseline("mrnet2d", [], SIZE)
    with pytest.raises(OrthodiffError, match="unexpected keyword"):
        build_baseline("resnet3d", LABELS, SIZE, width=3)
    with pytest.raises(OrthodiffError, match="backbone='no_such_net'"):
        build_baseline("mrnet2d", LABELS, SIZE, backbone="no_such_net")
    model = build("mrnet2d")
    batch = make_batch()
    batch["images"]["axial"] = torch.zeros(4, 1, 5, 32, 32)
    with pytest.raises(OrthodiffError, match=r"batch\['images'\]\['axial'\] has shape"):
        model(batch)


# --------------------------------------------------------------------------- trained on a run's data


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from tiny_archive import shared_tiny_project

    return shared_tiny_project(tmp_path_factory)


def test_nnunet_plan_keeps_thick_slices_out_of_the_first_stages():
    from orthodiff.baselines.dynunet import nnunet_plan

    plan = nnunet_plan((16, 64, 64), (3.0, 0.5, 0.5))
    assert plan["kernel_size"][:2] == [[1, 3, 3], [1, 3, 3]]  # slices 6x the pixel: in-plane only
    assert plan["strides"][:3] == [[1, 1, 1], [1, 2, 2], [1, 2, 2]]
    assert [2, 2, 2] in plan["strides"]  # once the pixels have coarsened, all three axes
    assert plan["upsample_kernel_size"] == plan["strides"][1:]
    assert plan["filters"][0] == 32 and max(plan["filters"]) <= 320
    isotropic = nnunet_plan((32, 32, 32), (1.0, 1.0, 1.0))
    assert isotropic["strides"][1] == [2, 2, 2] and isotropic["kernel_size"][0] == [3, 3, 3]
    with pytest.raises(OrthodiffError, match="spacing"):
        nnunet_plan((16, 64, 64), (0.0, 0.5, 0.5))


def test_dynunet_builds_for_small_anisotropic_patches_with_deep_supervision():
    from orthodiff.baselines.dynunet import DynUNetSegmenter

    model = DynUNetSegmenter({"sagittal": (4, 32, 32)}, {"sagittal": (3.0, 0.5, 0.5)}, 4, planes=["sagittal"],
                             base_filters=4)
    plan = model.plans["sagittal"]
    assert all(stride[0] == 1 for stride in plan["strides"])  # 4 slices are never halved
    assert plan["deep_supr_num"] >= 1
    batch = {"images": {"sagittal": torch.randn(2, 1, 4, 32, 32)}}
    model.train()
    assert model(batch)["sagittal"].shape == (2, 1 + plan["deep_supr_num"], 4, 4, 32, 32)
    model.eval()
    assert model(batch)["sagittal"].shape == (2, 4, 4, 32, 32)


def test_dynunet_trains_by_steps_and_writes_the_evaluate_contract(project, tmp_path):
    import json

    from tiny_archive import tiny_config

    from orthodiff.bench.cells.baselines_train import train_segmentation_baseline
    from orthodiff.evaluation.report import run_evaluation

    cfg = tiny_config(project, tmp_path, "finetune.task=segment", "finetune.max_steps=3", "finetune.eval_every=2")
    info = train_segmentation_baseline(cfg, "dynunet", tmp_path / "run", {"base_filters": 4, "optimizer": "sgd"})
    assert info["steps"] == 3 and info["best_step"] in (2, 3) and info["stopped_early"] is False
    assert info["optimizer"] == "sgd" and info["learning_rate"] == 0.01 and info["init"] == "scratch"
    assert info["plans"]["sagittal"]["strides"][0] == [1, 1, 1]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    result = run_evaluation(tmp_path / "run", n_bootstrap=20)
    structures = result.metrics["segmentation"]["overall"]["structures"]
    assert set(structures) == {"blob", "rim"}
    assert result.metrics["segmentation"]["overall"]["mean"]["dice"]["value"] is not None
    with pytest.raises(OrthodiffError, match="optimizer"):
        train_segmentation_baseline(cfg, "dynunet", tmp_path / "bad", {"optimizer": "lion"})


def test_dynunet_reruns_to_the_same_bits_under_one_seed(project, tmp_path):
    from tiny_archive import tiny_config

    from orthodiff.bench.cells.baselines_train import train_segmentation_baseline

    def run(name, seed):
        cfg = tiny_config(project, tmp_path / name, "finetune.task=segment", "finetune.max_steps=3",
                          "finetune.eval_every=3", "finetune.augment=true", f"seed={seed}")
        train_segmentation_baseline(cfg, "dynunet", tmp_path / name / "run", {"base_filters": 4})
        run_dir = tmp_path / name / "run"
        masks = [p.read_bytes() for p in sorted((run_dir / "segmentations").rglob("*.npy"))]
        return (run_dir / "metrics.jsonl").read_text(), masks

    first, second, other = run("a", 0), run("b", 0), run("c", 1)
    assert first == second and first[1]
    assert first[0] != other[0]


def test_classification_baseline_trains_exactly_max_steps(project, tmp_path):
    import json

    from tiny_archive import tiny_config

    from orthodiff.bench.cells.baselines_train import train_baseline

    cfg = tiny_config(project, tmp_path, "finetune.max_steps=3", "finetune.eval_every=2")
    info = train_baseline(cfg, "resnet3d", tmp_path / "run", TINY["resnet3d"], epochs=1, learning_rate=1e-3,
                          batch_size=8)
    assert info["steps"] == 3 and set(info) >= {"best_step", "best_epoch", "stopped_early"}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3] and all("val_macro_auroc" in r for r in rows)
