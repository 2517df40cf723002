"""Patch-based pretraining: the crop each plane trains on, and the keys that seed the crops.

Random crops of the planes buy a wider network more steps for the same compute. The denoiser is
convolutional and attends only at its lowest level, over any number of tokens, so it is scored
(held-out loss) and read for features on whole planes whatever crop it trained on.

Every crop is drawn from (seed, plane, micro-batch, rank, slot in the batch), like the noise and
the timesteps of the loop (``sampling``), so a resumed run draws the crops an uninterrupted one
would, and two processes draw different ones.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import OrthodiffError
from ..planes import PLANES
from .sampling import derived_seed

CROP_STREAM = 6271  # keeps the crop draws apart from every other seeded draw


def plane_patch_size(cfg, plane: str) -> tuple[int, int, int] | None:
    """The crop (D, H, W) that ``plane`` trains on, or None for whole planes (``pretrain.patch_size``
    unset or empty, or a mapping without that plane). One line naming the field when it does not fit."""
    from ..models.denoiser import check_denoiser_config

    setting = cfg.pretrain.patch_size
    if _empty(setting):
        return None
    if isinstance(setting, Mapping):
        unknown = [name for name in setting if name not in PLANES]
        if unknown:
            raise OrthodiffError(
                f"pretrain.patch_size.{unknown[0]}: not a plane; use {', '.join(PLANES)} or one [D, H, W] for all"
            )
        size, field = setting.get(plane), f"pretrain.patch_size.{plane}"
        if _empty(size):
            return None
    else:
        size, field = setting, f"pretrain.patch_size (for {plane})"
    levels = len(check_denoiser_config(cfg.model))
    return check_patch_size(size, cfg.data.plane_size[plane], levels, field)


def check_patch_size(size, plane_size, levels: int, field: str) -> tuple[int, int, int]:
    """Three integers, each at most the plane's and a multiple of 2^(levels-1): the network halves
    every axis levels-1 times and joins its skips at each size, so an axis it cannot halve evenly fails."""
    from ..models.denoiser import check_halvable

    plane = [int(s) for s in plane_size]
    try:
        values = [float(s) for s in size]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(v.is_integer() and v >= 1 for v in values):
        raise OrthodiffError(f"{field}={_show(size)}: give three positive integers [D, H, W], e.g. [{plane[0]}, "
                             f"{plane[1] // 2}, {plane[2] // 2}]")
    patch = tuple(int(v) for v in values)
    if any(p > s for p, s in zip(patch, plane)):
        raise OrthodiffError(
            f"{field}={list(patch)}: larger than the plane {plane} (data.plane_size); crops are drawn inside the "
            "plane, so give sizes no larger than its own"
        )
    check_halvable(patch, levels, field, "crop")
    return patch


def crop_seed(seed: int, plane: str) -> int:
    """The seed of a plane's crop draws (each crop adds its draw key: micro-batch, rank, slot)."""
    return derived_seed(seed, PLANES.index(plane), CROP_STREAM)


class DrawKeyedBatches:
    """A ``StepSeededBatchSampler`` whose indices carry their draw key: each batch of micro-batch ``m``
    on rank ``r`` becomes [(index, (m, r, slot)), ...], the addresses a cropping
    ``PlaneVolumeDataset`` reads."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        for offset, batch in enumerate(self.sampler):
            micro_batch = self.sampler.start_micro_batch + offset
            yield [(index, (micro_batch, self.sampler.rank, slot)) for slot, index in enumerate(batch)]


def _empty(value) -> bool:
    return value is None or (hasattr(value, "__len__") and not isinstance(value, str) and len(value) == 0)


def _show(value):
    return list(value) if isinstance(value, (list, tuple)) else value
