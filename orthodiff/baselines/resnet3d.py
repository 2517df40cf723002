"""Baseline (b): a MONAI 3D ResNet-18 per plane, embeddings concatenated, one linear layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import resnet18
from torch import nn

from ..planes import PLANES
from .common import batch_planes, check_labels, check_plane_size, on_present


class ResNet3DBaseline(nn.Module):
    """One 3D ResNet-18 per plane -> pooled embedding; a plane the study lacks gets a learned
    embedding (initialised at zero) instead; the concatenation feeds a linear multi-label head.

    ``widen_factor`` scales every ResNet width (1.0 is the standard ResNet-18: 512-d embeddings).
    Trained from scratch: no pretrained weights are loaded.
    """

    def __init__(self, labels: Sequence[str], plane_size, planes: Sequence[str] = PLANES,
                 widen_factor: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.labels = check_labels(labels)
        self.planes = list(planes)
        self.plane_size = check_plane_size(plane_size, self.planes)
        self.backbones = nn.ModuleDict({
            plane: resnet18(spatial_dims=3, n_input_channels=1, feed_forward=False, widen_factor=widen_factor)
            for plane in self.planes
        })
        self.embed_dim = self.backbones[self.planes[0]].in_planes  # width of the pooled output
        self.missing_embedding = nn.Parameter(torch.zeros(len(self.planes), self.embed_dim))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(len(self.planes) * self.embed_dim, len(self.labels))

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits (B, L) for a batch of the Datasets contract."""
        images, present = batch_planes(batch, self.planes, self.plane_size)
        embeddings = []
        for k, plane in enumerate(self.planes):
            embedded = on_present(self.backbones[plane], images[plane], present[:, k], self.embed_dim,
                                  self.training)
            mask = present[:, k : k + 1].to(embedded.dtype)
            embeddings.append(embedded * mask + self.missing_embedding[k] * (1 - mask))
        return self.head(self.dropout(torch.cat(embeddings, dim=1)))
