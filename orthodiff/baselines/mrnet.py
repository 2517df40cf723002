"""Baseline (c): MRNet-style 2D (Bien et al. 2018).

Per plane, a timm 2D CNN embeds every slice, the slice embeddings are max-pooled, and a linear
head gives per-label plane logits. A logistic regression combines the planes: for each label, a
learned weight per plane times that plane's logit, plus a bias. Unlike the original (three models
trained separately, then a logistic regression fitted on validation predictions), everything here
is trained jointly, end to end, by one BCE loss on the combined logit; ``plane_logits`` exposes
the per-plane outputs for anyone who wants the two-stage variant. A plane the study lacks
contributes nothing (its logit is masked to 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from einops import rearrange
from torch import nn

from ..errors import OrthodiffError
from ..planes import PLANES
from .common import batch_planes, check_labels, check_plane_size, on_present


class MRNet2DBaseline(nn.Module):
    """Slice-wise 2D CNN per plane, max over slices, per-plane linear heads, logistic-regression fusion.

    ``backbone`` is any timm model name; it is built with ``pretrained=False`` (no downloads),
    ``in_chans=1`` and ``num_classes=0`` (pooled features). ``slice_chunk`` bounds how many slices
    go through the CNN at once (memory), without changing the result.
    """

    def __init__(self, labels: Sequence[str], plane_size, planes: Sequence[str] = PLANES,
                 backbone: str = "resnet18", backbone_kwargs: dict | None = None,
                 slice_chunk: int | None = None):
        super().__init__()
        self.labels = check_labels(labels)
        self.planes = list(planes)
        self.plane_size = check_plane_size(plane_size, self.planes)
        self.slice_chunk = slice_chunk
        try:
            self.backbones = nn.ModuleDict({
                plane: timm.create_model(backbone, pretrained=False, in_chans=1, num_classes=0,
                                         **(backbone_kwargs or {}))
                for plane in self.planes
            })
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise OrthodiffError(f"backbone={backbone!r}: {exc}; use a timm model name such as resnet18") from exc
        self.feature_dim = self.backbones[self.planes[0]].num_features
        self.heads = nn.ModuleDict({plane: nn.Linear(self.feature_dim, len(self.labels)) for plane in self.planes})
        # Logistic regression over plane logits: one weight per (plane, label), one bias per label.
        self.combine_weight = nn.Parameter(torch.full((len(self.planes), len(self.labels)), 1.0 / len(self.planes)))
        self.combine_bias = nn.Parameter(torch.zeros(len(self.labels)))

    def _plane_embedding(self, plane: str, volumes: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> (N, F): the CNN on every slice, then the maximum over slices."""
        depth = volumes.shape[2]
        slices = rearrange(volumes, "n c d h w -> (n d) c h w")
        chunk = self.slice_chunk or slices.shape[0]
        features = torch.cat([self.backbones[plane](part) for part in slices.split(chunk)])
        return rearrange(features, "(n d) f -> n d f", d=depth).amax(dim=1)

    def plane_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, L) per-plane logits (0 where the plane is absent) and the (B, P) presence mask."""
        images, present = batch_planes(batch, self.planes, self.plane_size)
        logits = []
        for k, plane in enumerate(self.planes):
            embedded = on_present(lambda v, p=plane: self._plane_embedding(p, v), images[plane], present[:, k],
                                  self.feature_dim, self.training)
            logits.append(self.heads[plane](embedded) * present[:, k : k + 1].to(embedded.dtype))
        return torch.stack(logits, dim=1), present

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits (B, L): per label, the weighted sum of the present planes' logits plus a bias."""
        logits, _ = self.plane_logits(batch)
        return (logits * self.combine_weight).sum(dim=1) + self.combine_bias
