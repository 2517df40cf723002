"""The supervised segmentation reference: MONAI ``DynUNet`` per plane, planned as nnU-Net plans a
3D full-resolution network for a patch size and voxel spacing, trained from scratch.

Planning (nnU-Net's rules): an axis is downsampled while its feature map stays at least
``min_edge`` voxels and its spacing is at most twice the finest spacing; an axis much coarser than
the finest (the few thick slices of a plane tensor) gets kernel 1 until the in-plane spacing has
caught up, so the first stages of a 16 x 64 x 64 tensor with 3 mm slices and 0.5 mm pixels are
in-plane only. Filters double per stage from ``base_filters`` up to ``max_filters``. Deep
supervision adds heads on the next coarser decoder levels (nnU-Net's loss weights 1, 1/2, 1/4 ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import OrthodiffError
from ..planes import PLANES


def nnunet_plan(size: Sequence[int], spacing: Sequence[float], min_edge: int = 4, max_stages: int = 6,
                base_filters: int = 32, max_filters: int = 320) -> dict:
    """Kernel sizes, strides, upsampling kernels and filters of a DynUNet for ``size`` (D, H, W) at
    ``spacing`` (mm per voxel, same order)."""
    size = [int(v) for v in size]
    spacing = [float(v) for v in spacing]
    if len(size) != 3 or min(size) < 1 or len(spacing) != 3 or min(spacing) <= 0:
        raise OrthodiffError(f"DynUNet plan: expected a size (D, H, W) and a positive spacing, got {size}, {spacing}")
    kernels, strides = [], [[1, 1, 1]]
    while True:
        finest = min(spacing)
        kernels.append([3 if s <= 2 * finest else 1 for s in spacing])
        if len(kernels) >= max_stages:
            break
        stride = [2 if (n % 2 == 0 and n // 2 >= min_edge and s <= 2 * finest) else 1 for n, s in zip(size, spacing)]
        if max(stride) == 1:
            break
        strides.append(stride)
        size = [n // k for n, k in zip(size, stride)]
        spacing = [s * k for s, k in zip(spacing, stride)]
    filters = [min(int(base_filters) * 2**i, int(max_filters)) for i in range(len(kernels))]
    return {"kernel_size": kernels, "strides": strides, "upsample_kernel_size": strides[1:], "filters": filters}


class DynUNetSegmenter(nn.Module):
    """One planned DynUNet per plane: batch of the Datasets contract -> {plane: logits (B, K, D, H, W)};
    in training with deep supervision, {plane: (B, 1 + heads, K, D, H, W)} (MONAI's stacked outputs)."""

    def __init__(self, plane_size: Mapping[str, Sequence[int]], spacing: Mapping[str, Sequence[float]],
                 num_classes: int, planes: Sequence[str] = PLANES, deep_supervision: bool = True,
                 deep_supr_num: int = 2, base_filters: int = 32, max_filters: int = 320, min_edge: int = 4):
        from monai.networks.nets import DynUNet

        super().__init__()
        if num_classes < 2:
            raise OrthodiffError("dynunet: need at least 2 classes (background and one structure)")
        self.planes = tuple(plane for plane in PLANES if plane in planes)
        if not self.planes:
            raise OrthodiffError("dynunet: planes names no plane; use sagittal, coronal or axial")
        self.plans, self.nets = {}, nn.ModuleDict()
        for plane in self.planes:
            plan = nnunet_plan(plane_size[plane], spacing[plane], min_edge, base_filters=base_filters,
                               max_filters=max_filters)
            levels = len(plan["strides"]) - 1  # upsampling layers
            heads = min(int(deep_supr_num), levels - 1) if deep_supervision else 0
            self.plans[plane] = {**plan, "deep_supr_num": heads}
            self.nets[plane] = DynUNet(
                spatial_dims=3, in_channels=1, out_channels=int(num_classes), kernel_size=plan["kernel_size"],
                strides=plan["strides"], upsample_kernel_size=plan["upsample_kernel_size"], filters=plan["filters"],
                norm_name=("INSTANCE", {"affine": True}), deep_supervision=heads > 0, deep_supr_num=max(heads, 1),
                res_block=False,
            )

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {plane: self.nets[plane](batch["images"][plane]) for plane in self.planes}


def deep_supervision_weights(heads: int) -> list[float]:
    """nnU-Net's weights for the full-resolution output and ``heads`` coarser ones: 1, 1/2, 1/4 ...,
    normalised to sum to 1."""
    weights = [0.5**i for i in range(heads + 1)]
    return [w / sum(weights) for w in weights]


def poly_factor(step: int, total: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly learning-rate decay: (1 - step / total) ** 0.9."""
    return max(0.0, 1.0 - step / max(1, total)) ** exponent


__all__ = ["DynUNetSegmenter", "deep_supervision_weights", "nnunet_plan", "poly_factor"]
