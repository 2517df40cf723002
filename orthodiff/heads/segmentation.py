"""Segmentation: a decoder per plane on multi-scale denoiser features, told about the other planes.

Each plane's decoder starts from the bottleneck feature, which is modulated (FiLM) by the fused
cross-plane vector, then climbs back through the skip features to the plane tensor's size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import OrthodiffError
from ..planes import PLANES
from .fusion import ConcatFusion
from .pooling import make_pool


def _groups(channels: int) -> int:
    for groups in (8, 4, 2, 1):
        if channels % groups == 0:
            return groups
    return 1


class ConvBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(_groups(out_channels), out_channels),
            nn.GELU(),
        )


class SegmentationDecoder(nn.Module):
    """Decoder for one plane.

    ``shapes`` maps block name -> (C, d, h, w) for this plane size (``Denoiser.feature_shape``);
    ``bottleneck`` names the deepest block, ``skips`` the others (any order: they are climbed from
    the coarsest to the finest). The denoiser's finest block is already at half resolution, so with
    ``image_channels`` the plane tensor itself joins at full size for the last block (thin
    structures such as cartilage and menisci need it). Output: logits (B, num_classes, *out_size).
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        bottleneck: str,
        skips: Sequence[str],
        fused_features: int,
        num_classes: int,
        out_size: Sequence[int],
        width: int = 16,
        image_channels: int = 0,
    ):
        super().__init__()
        if num_classes < 2:
            raise OrthodiffError("segmentation: need at least 2 classes (background and one structure)")
        unknown = [name for name in [bottleneck, *skips] if name not in shapes]
        if unknown:
            raise OrthodiffError(f"segmentation: no feature shape for blocks {unknown}; known: {sorted(shapes)}")
        self.bottleneck = bottleneck
        self.out_size = tuple(int(v) for v in out_size)
        # Coarsest first; ties (same resolution) keep the given order.
        self.skips = sorted(skips, key=lambda name: _voxels(shapes[name]))
        channels = int(shapes[bottleneck][0])
        self.film = nn.Linear(fused_features, 2 * channels)
        nn.init.zeros_(self.film.weight)  # starts as the identity: the other planes earn their say
        nn.init.zeros_(self.film.bias)
        self.up_blocks = nn.ModuleList()
        for name in self.skips:
            out_channels = max(width, int(shapes[name][0]))
            self.up_blocks.append(ConvBlock(channels + int(shapes[name][0]), out_channels))
            channels = out_channels
        self.image_channels = int(image_channels)
        self.final = nn.Sequential(ConvBlock(channels + self.image_channels, width), nn.Conv3d(width, num_classes, 1))

    def forward(
        self, features: Mapping[str, torch.Tensor], fused: torch.Tensor, image: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = features[self.bottleneck]
        gamma, beta = self.film(fused).chunk(2, dim=1)
        x = x * (1 + gamma[:, :, None, None, None]) + beta[:, :, None, None, None]
        for name, block in zip(self.skips, self.up_blocks):
            skip = features[name]
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        x = F.interpolate(x, size=self.out_size, mode="trilinear", align_corners=False)
        if self.image_channels:
            if image is None:
                raise OrthodiffError("segmentation decoder was built with image_channels but got no image")
            x = torch.cat([x, image.to(x.dtype)], dim=1)
        return self.final(x)


class SegmentationModel(nn.Module):
    """A decoder per plane; the bottleneck of every plane is pooled and concatenated into the
    fused vector that conditions each plane's decoder (a missing plane: its learned embedding)."""

    def __init__(
        self,
        shapes: Mapping[str, Mapping[str, Sequence[int]]],
        plane_size: Mapping[str, Sequence[int]],
        bottleneck: str,
        skips: Sequence[str],
        num_classes: int,
        pooling: str = "mean",
        width: int = 16,
        image_channels: int = 0,
    ):
        super().__init__()
        self.planes = tuple(plane for plane in PLANES if plane in shapes)
        if not self.planes:
            raise OrthodiffError("segmentation: shapes names no plane")
        self.image_channels = int(image_channels)
        self.pools = nn.ModuleDict(
            {plane: make_pool(pooling, int(shapes[plane][bottleneck][0])) for plane in self.planes}
        )
        widths = {self.pools[plane].out_features for plane in self.planes}
        if len(widths) != 1:
            raise OrthodiffError("segmentation: the planes' bottleneck widths differ; use one denoiser config")
        self.fusion = ConcatFusion(widths.pop(), self.planes)
        self.decoders = nn.ModuleDict(
            {
                plane: SegmentationDecoder(
                    shapes[plane], bottleneck, skips, self.fusion.out_features, num_classes, plane_size[plane], width,
                    image_channels,
                )
                for plane in self.planes
            }
        )

    def forward(
        self,
        features: Mapping[str, Mapping[str, torch.Tensor]],
        present: torch.Tensor,
        images: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """{plane: logits (B, K, D, H, W)}; ``present`` (B, P) in PLANES order; ``images`` the plane
        tensors when the decoders take them."""
        if present.shape[1] != len(self.planes):
            present = present[:, [PLANES.index(plane) for plane in self.planes]]
        vectors = {plane: self.pools[plane](features[plane][self.decoders[plane].bottleneck]) for plane in self.planes}
        fused = self.fusion(vectors, present)
        images = images or {}
        return {plane: self.decoders[plane](features[plane], fused, images.get(plane)) for plane in self.planes}


def make_dice_ce_loss():
    """MONAI Dice + cross-entropy on logits (B, K, ...) against integer targets (B, 1, ...)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)


def _voxels(shape: Sequence[int]) -> int:
    d, h, w = (int(v) for v in shape[1:4])
    return d * h * w
