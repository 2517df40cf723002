"""Floor (a): a logistic probe on raw plane tensors, average-pooled to a small grid per plane.

Every representation must beat it: it sees where intensity sits in each plane and nothing else.
Each plane tensor (1, D, H, W) is average-pooled to ``grid`` (D', H', W') and flattened; the planes
are concatenated, standardised (batch norm without learned parameters) and one linear layer gives
per-label logits, trained with the same loss, steps and model selection as every baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import OrthodiffError
from ..planes import PLANES
from .common import batch_planes, check_labels, check_plane_size


class RawVoxelsBaseline(nn.Module):
    """Average-pooled voxels of every plane, concatenated, into one linear (logistic) layer.

    A plane the study lacks contributes zeros (and a presence flag per plane, so the bias can
    account for it). ``grid`` is the pooled size per plane, e.g. (2, 4, 4): 32 values a plane.
    """

    def __init__(self, labels: Sequence[str], plane_size, planes: Sequence[str] = PLANES,
                 grid: Sequence[int] = (2, 4, 4)):
        super().__init__()
        self.labels = check_labels(labels)
        self.planes = list(planes)
        self.plane_size = check_plane_size(plane_size, self.planes)
        try:
            self.grid = tuple(int(g) for g in grid)
        except (TypeError, ValueError):
            self.grid = ()
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise OrthodiffError(f"raw_voxels grid={grid!r}: expected three positive ints (D, H, W), e.g. [2, 4, 4]")
        per_plane = self.grid[0] * self.grid[1] * self.grid[2]
        # no affine: a fixed standardisation keeps the probe linear in the pooled voxels
        self.norm = nn.BatchNorm1d(len(self.planes) * per_plane, affine=False)
        self.head = nn.Linear(len(self.planes) * (per_plane + 1), len(self.labels))

    def features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, planes x grid voxels) pooled voxels (0 for an absent plane) and the (B, planes) presence."""
        images, present = batch_planes(batch, self.planes, self.plane_size)
        pooled = []
        for k, plane in enumerate(self.planes):
            values = nn.functional.adaptive_avg_pool3d(images[plane].float(), self.grid).flatten(1)
            pooled.append(values * present[:, k : k + 1].float())
        return torch.cat(pooled, dim=1), present.float()

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits (B, L) for a batch of the Datasets contract."""
        pooled, present = self.features(batch)
        if self.training and pooled.shape[0] == 1:  # batch statistics need two rows
            normed = (pooled - self.norm.running_mean) / torch.sqrt(self.norm.running_var + self.norm.eps)
        else:
            normed = self.norm(pooled)
        return self.head(torch.cat([normed, present], dim=1))
