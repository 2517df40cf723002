"""Multi-label diagnosis from per-plane feature maps: pool -> fuse -> logits (-> EHR mix)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import OrthodiffError
from ..planes import PLANES
from .ehr import EHRFusion
from .fusion import FUSIONS, ConcatFusion, GatedFusion
from .pooling import DEFAULT_READOUT_GRID, make_pool


class MultiLabelClassifier(nn.Module):
    """One pool per plane, concatenation or gated fusion, a linear layer per label.

    ``channels`` gives the feature channels of each plane (planes may come from different blocks).
    Every plane is pooled to the same width (a linear projection when the widths differ), so the
    fusion sees equal-sized vectors. ``readout_grid`` is the (d, h, w) cell grid of the ``grid``
    and ``grid_max`` pools.
    """

    def __init__(
        self,
        channels: Mapping[str, int],
        labels: list[str],
        pooling: str = "attention",
        fusion: str = "concat",
        num_ehr: int = 0,
        use_ehr: bool = False,
        heads: int = 4,
        dropout: float = 0.1,
        readout_grid=DEFAULT_READOUT_GRID,
    ):
        super().__init__()
        if not labels:
            raise OrthodiffError("classifier: no labels; set data.labels or give the manifest label_ columns")
        if fusion not in FUSIONS:
            raise OrthodiffError(f"finetune.fusion={fusion!r}: use one of {', '.join(FUSIONS)}")
        self.planes = tuple(plane for plane in PLANES if plane in channels)
        if not self.planes:
            raise OrthodiffError("classifier: channels names no plane")
        self.labels = list(labels)
        self.fusion_kind = fusion
        self.pools = nn.ModuleDict(
            {plane: make_pool(pooling, int(channels[plane]), heads, grid=readout_grid) for plane in self.planes}
        )
        widths = {plane: self.pools[plane].out_features for plane in self.planes}
        width = max(widths.values())
        self.align = nn.ModuleDict(
            {plane: (nn.Identity() if widths[plane] == width else nn.Linear(widths[plane], width)) for plane in self.planes}
        )
        self.vector_features = width
        self.norms = nn.ModuleDict({plane: PresentBatchNorm(width) for plane in self.planes})
        if fusion == "concat":
            self.fusion = ConcatFusion(width, self.planes)
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.fusion.out_features, len(labels)))
        else:
            self.fusion = GatedFusion(width, len(labels), self.planes, dropout=dropout)
            self.head = nn.Identity()
        self.ehr = EHRFusion(num_ehr, len(labels)) if use_ehr else None

    def plane_vectors(self, features: Mapping[str, torch.Tensor], present: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled, width-aligned, standardised vector of each plane; ``present`` in self.planes order."""
        return {
            plane: self.norms[plane](self.align[plane](self.pools[plane](features[plane])), present[:, i])
            for i, plane in enumerate(self.planes)
        }

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: torch.Tensor,
        ehr: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, L). ``present`` (B, P) in PLANES order selects the planes a study has."""
        present = _select_planes(present, self.planes)
        logits = self.head(self.fusion(self.plane_vectors(features, present), present))
        if self.ehr is not None:
            if ehr is None:
                raise OrthodiffError("classifier: use_ehr is on but the batch carries no ehr tensor")
            logits = self.ehr(logits, ehr)
        return logits

    def explain(self) -> dict:
        """Learned weights worth reporting: gated plane weights, EHR image weights."""
        report: dict = {}
        if isinstance(self.fusion, GatedFusion):
            report["plane_weights"] = self.fusion.plane_weights(self.labels)
        if self.ehr is not None:
            report["ehr_image_weight"] = self.ehr.image_weights(self.labels)
        return report


class PresentBatchNorm(nn.Module):
    """Batch norm without affine (as linear probes of MAE and dinov2 use) whose training statistics
    come only from studies that have the plane; with fewer than two such studies in a batch it
    uses the running statistics. Frozen features differ in scale by orders of magnitude between
    blocks and timesteps; this puts every probe of a grid on the same footing."""

    def __init__(self, features: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(features, affine=False)

    def forward(self, vectors: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        present = present.to(vectors.device, torch.bool)
        if not self.training:
            return self.norm(vectors)
        if int(present.sum()) < 2:
            return nn.functional.batch_norm(vectors, self.norm.running_mean, self.norm.running_var, training=False)
        out = vectors.clone()
        out[present] = self.norm(vectors[present])
        return out


def _select_planes(present: torch.Tensor, planes: tuple[str, ...]) -> torch.Tensor:
    """``present`` comes in PLANES order; keep the columns of the planes this model uses."""
    if present.shape[1] == len(planes):
        return present
    return present[:, [PLANES.index(plane) for plane in planes]]


def masked_bce_loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy over the known labels only (NaN targets are unknown and ignored)."""
    known = ~torch.isnan(targets)
    if not known.any():
        return logits.sum() * 0.0
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(targets), pos_weight=pos_weight, reduction="none"
    )
    return loss[known].mean()


def positive_weights(targets: torch.Tensor, max_weight: float = 50.0) -> torch.Tensor:
    """negatives / positives per label over the known labels, clipped to [1/max, max]."""
    known = ~torch.isnan(targets)
    positives = ((targets == 1) & known).sum(0).float()
    negatives = ((targets == 0) & known).sum(0).float()
    return (negatives / positives.clamp(min=1)).clamp(1 / max_weight, max_weight)
