"""Late fusion of tabular data (age, sex, height, weight, ...) with the image logits."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import OrthodiffError


class EHRFusion(nn.Module):
    """Tabular logits from a small MLP, mixed with the image logits by a learned per-label weight.

    ``logits = a * image + (1 - a) * tabular`` with ``a = sigmoid(mix)`` per label; ``a`` starts
    near 1 (0.88) so the image model leads and the tabular part earns its share.
    """

    def __init__(self, num_ehr: int, num_labels: int, hidden: int = 16):
        super().__init__()
        if num_ehr < 1:
            raise OrthodiffError("finetune.use_ehr=true but the study data has no EHR columns (data.ehr_columns)")
        self.tabular = nn.Sequential(nn.Linear(num_ehr, hidden), nn.GELU(), nn.Linear(hidden, num_labels))
        self.mix = nn.Parameter(torch.full((num_labels,), 2.0))

    def forward(self, image_logits: torch.Tensor, ehr: torch.Tensor) -> torch.Tensor:
        ehr = torch.nan_to_num(ehr.to(image_logits.dtype))
        weight = torch.sigmoid(self.mix)
        return weight * image_logits + (1 - weight) * self.tabular(ehr)

    def image_weights(self, labels: list[str]) -> dict[str, float]:
        """{label: weight of the image logits} for reports."""
        weight = torch.sigmoid(self.mix).detach().cpu()
        return {label: float(weight[i]) for i, label in enumerate(labels)}
