"""What every supervised baseline shares: argument checks, batch checks, per-plane dispatch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..errors import OrthodiffError
from ..planes import PLANES, check_plane


def check_labels(labels: Sequence[str]) -> list[str]:
    labels = [str(label) for label in labels] if not isinstance(labels, str) else []
    if not labels:
        raise OrthodiffError("labels: give a non-empty list of label names, e.g. ['acl', 'effusion']")
    if len(set(labels)) != len(labels):
        raise OrthodiffError(f"labels: names repeat in {labels}; give each label once")
    return labels


def check_plane_size(plane_size, planes: Sequence[str] = PLANES) -> dict[str, tuple[int, int, int]]:
    """{plane: (D, H, W)} for every plane; one (D, H, W) is accepted for all planes."""
    planes = [check_plane(plane, "planes") for plane in planes]
    if not planes:
        raise OrthodiffError("planes: give at least one of sagittal, coronal, axial")
    if not isinstance(plane_size, Mapping):
        plane_size = dict.fromkeys(planes, plane_size)
    sizes = {}
    for plane in planes:
        size = plane_size.get(plane)
        try:
            size = tuple(int(s) for s in size)
        except (TypeError, ValueError):
            size = ()
        if len(size) != 3 or min(size) < 1:
            raise OrthodiffError(f"plane_size[{plane!r}]={plane_size.get(plane)!r}: expected three positive ints "
                                 "[D, H, W] (data.plane_size in the config)")
        sizes[plane] = size
    return sizes


def batch_planes(batch: Mapping, planes: Sequence[str], plane_size: dict) -> tuple[dict, torch.Tensor]:
    """The batch's plane images and its (B, len(planes)) presence mask, checked against ``plane_size``."""
    if "images" not in batch or "present" not in batch:
        raise OrthodiffError("batch: expected keys 'images' and 'present' (orthodiff.data.datasets.collate_studies)")
    images, present = batch["images"], batch["present"]
    columns = [PLANES.index(plane) for plane in planes]
    if present.ndim != 2 or present.shape[1] != len(PLANES):
        raise OrthodiffError(f"batch['present'] has shape {tuple(present.shape)}; expected (B, 3) in {PLANES} order")
    for plane in planes:
        if plane not in images:
            raise OrthodiffError(f"batch['images'] lacks plane {plane!r}; a missing plane is zeros with present=False")
        expected = (present.shape[0], 1, *plane_size[plane])
        if tuple(images[plane].shape) != expected:
            raise OrthodiffError(f"batch['images'][{plane!r}] has shape {tuple(images[plane].shape)}; this baseline "
                                 f"was built for {expected}: build it with the cache's plane_size")
    return images, present[:, columns].bool()


def on_present(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, present: torch.Tensor,
               width: int, training: bool = False) -> torch.Tensor:
    """``fn`` applied to the rows whose plane is present; zeros (B, width) elsewhere.

    Absent rows never enter the network, so their zero images do not shift batch-norm statistics.
    Exception: in training with a single present row, batch norm on a 1x1x1 map has no statistics
    to take, so the whole batch goes through and the absent rows' outputs are zeroed.
    """
    rows = present.nonzero(as_tuple=True)[0]
    out = images.new_zeros(images.shape[0], width)
    if rows.numel() == 0:
        return out
    if training and rows.numel() == 1 and images.shape[0] > 1:
        return fn(images).to(out.dtype) * present[:, None].to(out.dtype)
    return out.index_copy(0, rows, fn(images[rows]).to(out.dtype))
