"""Heads on denoiser features: pooling per plane, fusion across planes, EHR fusion,
multi-label classification and segmentation."""

from .classifier import MultiLabelClassifier, masked_bce_loss, positive_weights
from .ehr import EHRFusion
from .fusion import ConcatFusion, GatedFusion
from .pooling import AttentionMaxPool, GridPool, LatentQueryPool, SelfAttentionPool, make_pool
from .segmentation import SegmentationDecoder, SegmentationModel, make_dice_ce_loss

__all__ = [
    "AttentionMaxPool",
    "ConcatFusion",
    "EHRFusion",
    "GatedFusion",
    "GridPool",
    "LatentQueryPool",
    "MultiLabelClassifier",
    "SegmentationDecoder",
    "SegmentationModel",
    "SelfAttentionPool",
    "make_dice_ce_loss",
    "make_pool",
    "masked_bce_loss",
    "positive_weights",
]
