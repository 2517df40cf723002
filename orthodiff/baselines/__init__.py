"""Supervised baselines for the benchmarks, trained from scratch on the same batches as orthodiff.

``build_baseline("resnet3d" | "mrnet2d" | "raw-voxels", labels, plane_size, **kwargs)`` returns an ``nn.Module``
mapping a batch of the Datasets contract (``images`` {plane: (B,1,D,H,W)}, ``present`` (B,3)) to
logits (B, L).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import OrthodiffError

BASELINES = ("resnet3d", "mrnet2d", "raw-voxels")


def build_baseline(name: str, labels: Sequence[str], plane_size, **kwargs):
    """A baseline by name: "resnet3d" (MONAI 3D ResNet-18 per plane), "mrnet2d" (MRNet-style 2D) or
    "raw-voxels" (a logistic probe on average-pooled plane tensors)."""
    if name == "resnet3d":
        from .resnet3d import ResNet3DBaseline as model_class
    elif name == "mrnet2d":
        from .mrnet import MRNet2DBaseline as model_class
    elif name == "raw-voxels":
        from .raw_voxels import RawVoxelsBaseline as model_class
    else:
        raise OrthodiffError(f"baseline {name!r} is unknown; use one of {', '.join(BASELINES)}")
    try:
        return model_class(labels, plane_size, **kwargs)
    except TypeError as exc:  # an option the model does not take
        raise OrthodiffError(f"baseline {name!r}: {exc}") from exc
