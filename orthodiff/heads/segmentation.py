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
    the coarsest to the finest). The encoder's finest block is at half resolution, so with
    ``image_channels`` the plane tensor itself joins at full size for the last block (thin
    structures such as cartilage and menisci need it), first through ``image_stem`` convolution
    blocks of ``width`` channels: a full-resolution stage like a UNet's top level, so a structure
    one or two voxels thick is seen by more than one convolution. Output: logits
    (B, num_classes, *out_size).
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
        image_stem: int = 0,
    ):
        super().__init__()
        if num_classes < 2:
            raise OrthodiffError("segmentation: need at least 2 classes (background and one structure)")
        if int(image_stem) < 0 or (int(image_stem) and not int(image_channels)):
            raise OrthodiffError(f"finetune.decoder_image_stem={image_stem}: must be >= 0, and 0 without an image")
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
        stem = [ConvBlock(self.image_channels if i == 0 else width, width) for i in range(int(image_stem))]
        self.image_stem = nn.Sequential(*stem)
        image_width = width if stem else self.image_channels
        self.final = nn.Sequential(ConvBlock(channels + image_width, width), nn.Conv3d(width, num_classes, 1))

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
            x = torch.cat([x, self.image_stem(image.to(x.dtype))], dim=1)
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
        image_stem: int = 0,
    ):
        super().__init__()
        self.planes = tuple(plane for plane in PLANES if plane in shapes)
        if not self.planes:
            raise OrthodiffError("segmentation: shapes names no plane")
        self.image_channels = int(image_channels)
        self.image_stem = int(image_stem)
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
                    image_channels, image_stem,
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


class PixelSegmenter(nn.Module):
    """Per-voxel head on multi-scale, multi-timestep denoiser features (DDPM-segmentation,
    Baranchuk et al. 2022), one per plane.

    ``channels`` maps plane -> {feature key: C} (a key names a block read at a timestep). Each map is
    normalised, projected by a 1x1x1 convolution and upsampled (trilinear) to the plane size; the sum
    of the projections equals one 1x1x1 convolution over the concatenation of the upsampled maps,
    without holding that concatenation at full size. With ``image_channels`` the plane tensor joins
    too. A small per-voxel MLP (1x1x1 convolutions) gives logits (B, num_classes, *plane_size).
    """

    def __init__(
        self,
        channels: Mapping[str, Mapping[str, int]],
        plane_size: Mapping[str, Sequence[int]],
        num_classes: int,
        hidden: int = 32,
        image_channels: int = 1,
    ):
        super().__init__()
        if num_classes < 2:
            raise OrthodiffError("segmentation: need at least 2 classes (background and one structure)")
        if int(hidden) < 1:
            raise OrthodiffError(f"finetune.pixel_hidden={hidden}: must be at least 1")
        self.planes = tuple(plane for plane in PLANES if plane in channels)
        if not self.planes or not all(channels[plane] for plane in self.planes):
            raise OrthodiffError("pixel segmentation: give at least one plane with at least one feature map")
        self.keys = {plane: list(channels[plane]) for plane in self.planes}
        self.out_size = {plane: tuple(int(v) for v in plane_size[plane]) for plane in self.planes}
        self.image_channels = int(image_channels)
        self.norms = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        self.mlps = nn.ModuleDict()
        for plane in self.planes:
            norms, projections = nn.ModuleDict(), nn.ModuleDict()
            for key, width in channels[plane].items():
                norms[key] = nn.GroupNorm(_groups(int(width)), int(width), affine=False)
                projections[key] = nn.Conv3d(int(width), hidden, 1, bias=False)
            if self.image_channels:
                projections["image"] = nn.Conv3d(self.image_channels, hidden, 1, bias=False)
            self.norms[plane], self.projections[plane] = norms, projections
            self.mlps[plane] = nn.Sequential(
                nn.GroupNorm(_groups(hidden), hidden), nn.GELU(), nn.Conv3d(hidden, hidden, 1), nn.GELU(),
                nn.Conv3d(hidden, num_classes, 1),
            )

    def forward(
        self,
        features: Mapping[str, Mapping[str, torch.Tensor]],
        present: torch.Tensor | None = None,
        images: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """{plane: logits (B, K, D, H, W)} from {plane: {key: (B, C, d, h, w)}}; ``present`` is unused
        (each plane is segmented from its own features)."""
        images = images or {}
        out = {}
        for plane in self.planes:
            total = None
            for key in self.keys[plane]:
                value = self.projections[plane][key](self.norms[plane][key](features[plane][key]))
                value = F.interpolate(value, size=self.out_size[plane], mode="trilinear", align_corners=False)
                total = value if total is None else total + value
            if self.image_channels:
                if plane not in images:
                    raise OrthodiffError("pixel segmenter was built with image_channels but got no image")
                total = total + self.projections[plane]["image"](images[plane].to(total.dtype))
            out[plane] = self.mlps[plane](total)
        return out


def make_dice_ce_loss(weight=None):
    """MONAI Dice + cross-entropy on logits (B, K, ...) against integer targets (B, 1, ...);
    ``weight`` (K,) weighs the classes in both terms (``class_weights``)."""
    from monai.losses import DiceCELoss

    weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, weight=weight)


def class_weights(counts: Sequence[float], power: float = 0.5, cap: float = 10.0) -> torch.Tensor:
    """Class weights (K,) from training voxel counts: ``frequency ** -power``, scaled to a mean of 1
    over the classes and capped at ``cap`` x the smallest, so a structure of 0.1% of the voxels
    is not drowned by bone and background. A class never seen gets the largest weight."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() < 2 or bool((counts < 0).any()) or float(counts.sum()) <= 0:
        raise OrthodiffError(f"class weights: expected non-negative voxel counts of >= 2 classes, got {counts.tolist()}")
    frequency = counts / counts.sum()
    seen = frequency > 0
    weights = torch.ones_like(frequency)
    weights[seen] = frequency[seen] ** -float(power)
    weights[seen] = torch.clamp(weights[seen], max=float(weights[seen].min()) * float(cap))
    weights[~seen] = weights[seen].max()
    return (weights / weights.mean()).float()


def _voxels(shape: Sequence[int]) -> int:
    d, h, w = (int(v) for v in shape[1:4])
    return d * h * w
