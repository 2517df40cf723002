"""Fusing the three planes' pooled vectors, with a learned stand-in for a plane a study lacks."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import OrthodiffError
from ..planes import PLANES

FUSIONS = ("concat", "gated")


class MissingPlaneEmbedding(nn.Module):
    """Replaces the vector of an absent plane by a learned embedding of that plane."""

    def __init__(self, features: int, planes: tuple[str, ...] = PLANES):
        super().__init__()
        self.planes = tuple(planes)
        self.embedding = nn.Parameter(torch.zeros(len(self.planes), features))
        nn.init.normal_(self.embedding, std=0.02)

    def forward(self, vectors: dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """(B, P, F) with each absent plane's row replaced; ``present`` is bool (B, P)."""
        missing = [plane for plane in self.planes if plane not in vectors]
        if missing:
            raise OrthodiffError(f"fusion: no vector for planes {missing}; pass zeros and present=False instead")
        stacked = torch.stack([vectors[plane] for plane in self.planes], dim=1)
        mask = present.to(stacked.device, torch.bool).unsqueeze(-1)
        return torch.where(mask, stacked, self.embedding.unsqueeze(0).to(stacked.dtype))


class ConcatFusion(nn.Module):
    """Concatenates the plane vectors (paper default). Output: len(planes) * features."""

    def __init__(self, features: int, planes: tuple[str, ...] = PLANES):
        super().__init__()
        self.missing = MissingPlaneEmbedding(features, planes)
        self.out_features = len(self.missing.planes) * features

    def forward(self, vectors: dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        return self.missing(vectors, present).flatten(1)


class GatedFusion(nn.Module):
    """One linear classifier per plane; per-label softmax weights over the planes mix their logits.

    The weights are a learned (labels, planes) table, renormalised over the planes a study has,
    so they read directly as "how much each plane counts for each label".
    """

    def __init__(self, features: int, num_labels: int, planes: tuple[str, ...] = PLANES, dropout: float = 0.0):
        super().__init__()
        if num_labels < 1:
            raise OrthodiffError("GatedFusion: num_labels must be at least 1")
        self.missing = MissingPlaneEmbedding(features, planes)
        self.planes = self.missing.planes
        self.dropout = nn.Dropout(dropout)
        self.plane_heads = nn.ModuleList(nn.Linear(features, num_labels) for _ in self.planes)
        self.gate_logits = nn.Parameter(torch.zeros(num_labels, len(self.planes)))

    def forward(self, vectors: dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        stacked = self.dropout(self.missing(vectors, present))
        logits = torch.stack([head(stacked[:, index]) for index, head in enumerate(self.plane_heads)], dim=2)
        weights = self.weights(present)  # (B, L, P)
        return (logits * weights).sum(dim=2)

    def weights(self, present: torch.Tensor | None = None) -> torch.Tensor:
        """Per-label plane weights summing to 1: (L, P), or (B, L, P) restricted to present planes."""
        if present is None:
            return torch.softmax(self.gate_logits, dim=1)
        present = present.to(self.gate_logits.device, torch.bool)
        # A study with no plane at all keeps every plane (their learned embeddings) in the mix.
        present = present | ~present.any(dim=1, keepdim=True)
        masked = self.gate_logits.unsqueeze(0).masked_fill(~present.unsqueeze(1), float("-inf"))
        return torch.softmax(masked, dim=2)

    def plane_weights(self, labels: list[str]) -> dict[str, dict[str, float]]:
        """{label: {plane: weight}} for reports."""
        table = self.weights().detach().cpu()
        return {label: {plane: float(table[i, j]) for j, plane in enumerate(self.planes)} for i, label in enumerate(labels)}
