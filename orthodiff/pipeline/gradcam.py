"""Grad-CAM heat maps of the diagnosis head, per label and plane, with MONAI ``visualize.GradCAM``.

Each map explains the decision the pipeline made: for a positive decision the score is the label's
logit (where the evidence for the finding lies); for a negative decision it is the negated logit
(where the evidence against it lies: the "counterfactual" map of Selvaraju et al., 2017).

Target layer: the pooling input, i.e. the denoiser feature map at the head's (block, timestep) for
that plane, just before the classification head pools it (with the default ``mid`` block, the
output of the denoiser's middle block). Grad-CAM needs only that layer's activations and the
gradient of a label's logit with respect to them; gradients do not depend on the layers before
it, so the denoiser runs once per plane (without gradients) and only the light head runs forward
and backward per label. The map (ReLU of the gradient-weighted channel sum) is upsampled
trilinearly to the plane tensor and scaled by its maximum into [0, 1]; all zeros means the plane
holds no evidence for that decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

TARGET_LAYER = "pooling_input"
TARGET_DESCRIPTION = (
    "pooling input: the denoiser feature map at the head's (block, timestep) for that plane, "
    "as the classification head receives it"
)


class _HeadOnOnePlane(nn.Module):
    """The classifier as a function of one plane's feature map; the other planes are held fixed."""

    def __init__(self, classifier: nn.Module, maps: Mapping[str, torch.Tensor], present: torch.Tensor,
                 ehr: torch.Tensor | None, plane: str, signs: torch.Tensor):
        super().__init__()
        self.signs = signs  # +1 explains a positive decision, -1 a negative one
        self.classifier = classifier
        self.pooling_input = nn.Identity()  # the Grad-CAM target layer
        self.maps = {name: value.detach() for name, value in maps.items()}
        self.present, self.ehr, self.plane = present, ehr, plane

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        maps = dict(self.maps)
        maps[self.plane] = self.pooling_input(feature_map)
        return self.classifier(maps, self.present, self.ehr) * self.signs


def _same_size(size):
    return lambda tensor: tensor


def _raw(tensor):
    return tensor


def gradcam_maps(
    classifier: nn.Module,
    maps: Mapping[str, torch.Tensor],
    present: torch.Tensor,
    ehr: torch.Tensor | None,
    plane: str,
    out_size,
    decisions: Sequence[bool],
) -> torch.Tensor:
    """Heat maps (L, D, H, W) in [0, 1] of every label of ``classifier`` for one plane of one study,
    each explaining that label's decision (``decisions``, in label order)."""
    from monai.visualize import GradCAM

    signs = torch.tensor([1.0 if positive else -1.0 for positive in decisions], device=maps[plane].device)
    was_training = classifier.training
    # In eval mode: MONAI restores the wrapper's own mode after each call, and a new module is in
    # training mode, which would leave the classifier's dropout and batch norm in training mode.
    model = _HeadOnOnePlane(classifier, maps, present, ehr, plane, signs).eval()
    cam = GradCAM(nn_module=model, target_layers=TARGET_LAYER, upsampler=_same_size, postprocessing=_raw)
    feature_map = maps[plane].detach().clone().requires_grad_(True)
    heat = []
    with torch.enable_grad():
        for index in range(len(classifier.labels)):
            raw = cam(feature_map, class_idx=index).detach().float()  # (1, 1, d, h, w), ReLU'd
            heat.append(F.interpolate(raw, size=tuple(int(s) for s in out_size), mode="trilinear", align_corners=False)[0, 0])
    stacked = torch.stack(heat)
    peak = stacked.flatten(1).amax(dim=1).clamp(min=1e-12)
    classifier.zero_grad(set_to_none=True)
    classifier.train(was_training)
    return (stacked / peak[:, None, None, None]).clamp(0, 1).cpu()


def maps_to_source(maps, tensor_affine, source_shape, source_affine):
    """Many plane-tensor maps (L, D, H, W) onto the series' voxel grid at once: (L, *source_shape).

    The same mapping as ``orthodiff.data.prepare.to_source_geometry`` for images (linear, edge
    values up to half a voxel outside, 0 beyond), done in one ``grid_sample`` call for all labels:
    mapping two dozen heat maps one by one takes longer than computing them.
    """
    import numpy as np

    maps = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    size = torch.tensor(maps.shape[1:], dtype=torch.float64)
    to_tensor = torch.as_tensor(np.linalg.inv(np.asarray(tensor_affine, float)) @ np.asarray(source_affine, float))
    axes = [torch.arange(int(n), dtype=torch.float64) for n in source_shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (I, J, K, 3) source voxel indices
    coords = grid @ to_tensor[:3, :3].T + to_tensor[:3, 3]  # plane-tensor (d, h, w) per source voxel
    outside = ((coords < -0.5) | (coords > size - 0.5)).any(dim=-1)
    normalised = torch.where(size > 1, 2 * coords / (size - 1).clamp(min=1) - 1, torch.zeros_like(coords))
    sampled = F.grid_sample(
        maps[None], normalised.flip(-1)[None].float(), mode="bilinear", padding_mode="border", align_corners=True
    )[0]
    sampled[:, outside] = 0.0
    return sampled.numpy()
