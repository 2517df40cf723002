"""Heads: pooling, fusion, EHR fusion, classifier and segmentation decoder (pure torch, tiny sizes)."""

import pytest
import torch
from tiny_archive import one_torch_thread  # noqa: F401 (autouse fixture)

from orthodiff.errors import OrthodiffError
from orthodiff.heads import (
    ConcatFusion,
    EHRFusion,
    GatedFusion,
    LatentQueryPool,
    MultiLabelClassifier,
    SegmentationModel,
    SelfAttentionPool,
    make_dice_ce_loss,
    make_pool,
    masked_bce_loss,
    positive_weights,
)
from orthodiff.planes import PLANES


def _maps(batch=3, channels=8, shape=(2, 4, 4)):
    torch.manual_seed(0)
    return {plane: torch.randn(batch, channels, *shape) for plane in PLANES}


def test_pool_shapes():
    x = torch.randn(2, 8, 2, 4, 4)
    assert SelfAttentionPool(8, heads=2)(x).shape == (2, 16)
    assert LatentQueryPool(8, heads=2)(x).shape == (2, 8)
    assert make_pool("mean", 8)(x).shape == (2, 8)
    # Head counts that do not divide the width are fitted, not refused.
    assert make_pool("attention", 6, heads=4)(torch.randn(2, 6, 1, 2, 2)).shape == (2, 12)
    with pytest.raises(OrthodiffError, match="finetune.pooling"):
        make_pool("max", 8)


def test_attention_pool_keeps_global_average_beside_attention():
    x = torch.randn(2, 8, 2, 4, 4)
    pooled = SelfAttentionPool(8, heads=2)(x)
    assert torch.allclose(pooled[:, 8:], x.flatten(2).mean(2), atol=1e-6)


def test_concat_fusion_uses_missing_embedding_when_absent():
    fusion = ConcatFusion(4)
    vectors = {plane: torch.ones(2, 4) for plane in PLANES}
    present = torch.tensor([[True, True, True], [True, False, True]])
    fused = fusion(vectors, present)
    assert fused.shape == (2, 12)
    assert torch.equal(fused[0], torch.ones(12))
    assert torch.allclose(fused[1, 4:8], fusion.missing.embedding[1])
    assert torch.equal(fused[1, :4], torch.ones(4))


def test_gated_weights_sum_to_one_per_label_and_skip_absent_planes():
    gated = GatedFusion(4, num_labels=5)
    with torch.no_grad():
        gated.gate_logits.normal_()
    assert torch.allclose(gated.weights().sum(1), torch.ones(5))
    present = torch.tensor([[True, False, True], [False, False, False]])
    weights = gated.weights(present)
    assert torch.allclose(weights.sum(2), torch.ones(2, 5))
    assert torch.all(weights[0, :, 1] == 0)
    assert torch.all(weights[1] > 0)  # no plane at all: the learned embeddings all take part
    logits = gated({plane: torch.randn(2, 4) for plane in PLANES}, present)
    assert logits.shape == (2, 5)
    report = gated.plane_weights(list("abcde"))
    assert set(report["a"]) == set(PLANES) and abs(sum(report["a"].values()) - 1) < 1e-6


def test_ehr_fusion_mixes_per_label():
    fusion = EHRFusion(num_ehr=4, num_labels=3)
    image = torch.zeros(2, 3)
    out = fusion(image, torch.randn(2, 4))
    assert out.shape == (2, 3)
    weights = fusion.image_weights(["a", "b", "c"])
    assert all(0 < w < 1 for w in weights.values())
    with pytest.raises(OrthodiffError, match="ehr"):
        EHRFusion(num_ehr=0, num_labels=3)


@pytest.mark.parametrize("fusion,pooling", [("concat", "attention"), ("gated", "latent")])
def test_classifier_learns_with_a_missing_plane(fusion, pooling):
    torch.manual_seed(0)
    maps = _maps(batch=12)
    targets = (maps["sagittal"].mean((1, 2, 3, 4)) > 0).float()[:, None].repeat(1, 2)
    targets[0, 1] = float("nan")
    present = torch.ones(12, 3, dtype=torch.bool)
    present[::4, 2] = False
    model = MultiLabelClassifier(dict.fromkeys(PLANES, 8), ["a", "b"], pooling=pooling, fusion=fusion, num_ehr=4, use_ehr=True)
    ehr = torch.randn(12, 4)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(25):
        loss = masked_bce_loss(model(maps, present, ehr), targets)
        first = first if first is not None else loss.item()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert torch.isfinite(loss) and loss.item() < 0.5 * first
    assert "ehr_image_weight" in model.explain()
    assert ("plane_weights" in model.explain()) == (fusion == "gated")


def test_masked_bce_ignores_unknown_and_pos_weight():
    logits = torch.zeros(3, 2)
    targets = torch.tensor([[1.0, float("nan")], [0.0, 0.0], [0.0, 1.0]])
    assert torch.isfinite(masked_bce_loss(logits, targets))
    weights = positive_weights(targets)
    assert torch.allclose(weights, torch.tensor([2.0, 1.0]))
    assert masked_bce_loss(logits, torch.full((3, 2), float("nan"))).item() == 0.0


def _seg_setup():
    shapes = {"down0": (4, 4, 8, 8), "down1": (8, 2, 4, 4), "mid": (8, 2, 4, 4)}
    plane_size = dict.fromkeys(PLANES, (8, 16, 16))
    return shapes, plane_size


def test_segmentation_model_shapes_and_cross_plane_conditioning():
    shapes, plane_size = _seg_setup()
    model = SegmentationModel(dict.fromkeys(PLANES, shapes), plane_size, "mid", ["down0", "down1"], num_classes=3)
    features = {p: {b: torch.randn(2, *s) for b, s in shapes.items()} for p in PLANES}
    present = torch.tensor([[True, True, True], [True, False, True]])
    out = model(features, present)
    assert set(out) == set(PLANES) and out["axial"].shape == (2, 3, 8, 16, 16)
    with_image = SegmentationModel({"axial": shapes}, plane_size, "mid", ["down0"], num_classes=3, image_channels=1)
    images = {"axial": torch.randn(2, 1, 8, 16, 16)}
    assert with_image(features, present[:, 2:], images)["axial"].shape == (2, 3, 8, 16, 16)
    with pytest.raises(OrthodiffError, match="no image"):
        with_image(features, present[:, 2:])
    with torch.no_grad():
        model.decoders["sagittal"].film.weight.normal_()
    changed = {p: dict(f) for p, f in features.items()}
    changed["coronal"] = {b: t + 1 for b, t in features["coronal"].items()}
    # The coronal plane's features reach the sagittal prediction through the fused vector.
    assert not torch.allclose(model(changed, present)["sagittal"][0], model(features, present)["sagittal"][0])
    # ... but not for the study that lacks the coronal plane.
    assert torch.allclose(model(changed, present)["sagittal"][1], model(features, present)["sagittal"][1])


def test_segmentation_head_overfits_a_tiny_batch():
    from monai.metrics import DiceMetric

    torch.manual_seed(0)
    shapes, plane_size = _seg_setup()
    model = SegmentationModel({"sagittal": shapes}, {"sagittal": plane_size["sagittal"]}, "mid", ["down0", "down1"], 3)
    target = torch.zeros(2, 1, 8, 16, 16, dtype=torch.long)
    target[:, :, 2:6, 4:12, 2:8] = 1
    target[:, :, 2:6, 4:12, 9:14] = 2
    # Features that carry the target (like a denoiser's early blocks do).
    down0 = torch.nn.functional.interpolate(target.float(), size=(4, 8, 8)).repeat(1, 4, 1, 1, 1)
    features = {"sagittal": {"down0": down0 + 0.1 * torch.randn_like(down0),
                             "down1": torch.randn(2, 8, 2, 4, 4), "mid": torch.randn(2, 8, 2, 4, 4)}}
    present = torch.ones(2, 1, dtype=torch.bool)
    loss_fn = make_dice_ce_loss()
    dice = DiceMetric(include_background=False)

    def onehot(t):
        return torch.nn.functional.one_hot(t[:, 0], 3).permute(0, 4, 1, 2, 3)

    def score():
        pred = model(features, present)["sagittal"].argmax(1, keepdim=True)
        dice.reset()
        dice(onehot(pred), onehot(target))
        return dice.aggregate().item()

    before = score()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = loss_fn(model(features, present)["sagittal"], target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = score()
    assert after > 0.8 and after > before + 0.3


def test_image_stem_reads_the_plane_tensor_at_full_resolution():
    torch.manual_seed(0)
    shapes, plane_size = _seg_setup()
    size = {"sagittal": plane_size["sagittal"]}
    with pytest.raises(OrthodiffError, match="decoder_image_stem"):
        SegmentationModel({"sagittal": shapes}, size, "mid", ["down0"], 2, image_stem=2)
    model = SegmentationModel({"sagittal": shapes}, size, "mid", ["down0"], 2, width=8, image_channels=1, image_stem=2)
    assert len(model.decoders["sagittal"].image_stem) == 2
    # A structure one voxel thick that only the full-size image shows; the features are noise.
    image = torch.randn(2, 1, 8, 16, 16) * 0.1
    target = torch.zeros(2, 1, 8, 16, 16, dtype=torch.long)
    target[:, :, 2:6, 4:12, 7] = 1
    image[target == 1] += 1.0
    features = {"sagittal": {b: torch.randn(2, *s) for b, s in shapes.items()}}
    present = torch.ones(2, 1, dtype=torch.bool)
    loss_fn = make_dice_ce_loss()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = loss_fn(model(features, present, {"sagittal": image})["sagittal"], target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    stem = model.decoders["sagittal"].image_stem[0][0].weight
    assert stem.grad is not None and float(stem.grad.abs().sum()) > 0
    pred = model(features, present, {"sagittal": image})["sagittal"].argmax(1, keepdim=True)
    hit = float(((pred == 1) & (target == 1)).sum())
    dice = 2 * hit / float((pred == 1).sum() + (target == 1).sum())
    assert dice > 0.8


def test_local_evidence_pool_shapes():
    from orthodiff.heads import AttentionMaxPool, GridPool

    x = torch.randn(2, 8, 2, 4, 4)
    assert AttentionMaxPool(8, heads=2)(x).shape == (2, 24)
    assert make_pool("attention_max", 6, heads=4)(torch.randn(2, 6, 1, 2, 2)).shape == (2, 18)
    assert GridPool(8, (1, 2, 2))(x).shape == (2, 32)
    assert make_pool("grid", 8, grid=[2, 2, 2])(x).shape == (2, 64)
    assert make_pool("grid_max", 8, grid=[1, 2, 2])(x).shape == (2, 64)
    for kind in ("attention_max", "grid", "grid_max"):
        assert make_pool(kind, 8, heads=2).out_features == make_pool(kind, 8, heads=2)(x).shape[1]
    with pytest.raises(OrthodiffError, match="finetune.readout_grid"):
        make_pool("grid", 8, grid=[1, 2])
    with pytest.raises(OrthodiffError, match="finetune.readout_grid"):
        make_pool("grid", 8, grid=[0, 2, 2])


def test_attention_max_pool_keeps_the_global_max_of_each_channel():
    x = torch.randn(2, 8, 2, 4, 4)
    pooled = make_pool("attention_max", 8, heads=2)(x)
    assert torch.allclose(pooled[:, 16:], x.flatten(2).amax(2))
    assert torch.allclose(pooled[:, 8:16], x.flatten(2).mean(2), atol=1e-6)


def test_grid_pool_tells_where_a_spot_lies_where_the_mean_cannot():
    """One bright voxel in the left half of the map, or the same voxel in the right half: the
    global average (and the attention pool's GAP half) are identical, the grid readout is not."""
    left, right = torch.zeros(1, 4, 2, 4, 4), torch.zeros(1, 4, 2, 4, 4)
    left[0, 1, 0, 1, 0] = 5.0
    right[0, 1, 0, 1, 3] = 5.0
    mean, grid = make_pool("mean", 4), make_pool("grid", 4, grid=[1, 2, 2])
    assert torch.equal(mean(left), mean(right))
    assert not torch.allclose(grid(left), grid(right))
    # The spot's cell (h 0..1, w 0..1 for left; w 2..3 for right) holds its average, the others 0.
    cells_left = grid(left).reshape(4, 1, 2, 2)[1, 0]
    cells_right = grid(right).reshape(4, 1, 2, 2)[1, 0]
    assert cells_left[0, 0] > 0 and cells_left[0, 1] == 0
    assert cells_right[0, 1] > 0 and cells_right[0, 0] == 0


@pytest.mark.parametrize("pooling", ["attention_max", "grid", "grid_max"])
def test_classifier_trains_with_local_evidence_pools_and_missing_planes(pooling):
    maps = _maps()
    channels = dict.fromkeys(PLANES, 8)
    model = MultiLabelClassifier(channels, ["a", "b"], pooling=pooling, readout_grid=[1, 2, 2])
    present = torch.tensor([[True, True, True], [True, False, True], [False, True, True]])
    logits = model(maps, present)
    assert logits.shape == (3, 2)
    loss = masked_bce_loss(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, float("nan")]]))
    loss.backward()
    assert torch.isfinite(loss) and model.head[1].weight.grad.abs().sum() > 0
