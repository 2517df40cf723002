"""Training-time augmentation for low-label fine-tuning (torchio), plane by plane.

Small affine, bias field, noise and gamma; no flips, so medial and lateral never swap. The
intensity transforms see [0, 1] intensities (bias field and gamma assume non-negative values) and
the result returns to the plane tensor's [-1, 1]. A plane's segmentation moves with its image.
"""

from __future__ import annotations

from collections.abc import Callable

from ..planes import PLANES


def make_study_augment() -> Callable[[dict], dict]:
    """The ``augment`` callable of ``StudyDataset``: {plane: (1,D,H,W), "<plane>_seg": (1,D,H,W)} in and out."""
    import torchio as tio

    transform = tio.Compose(
        [
            tio.RandomAffine(scales=0.05, degrees=5, translation=2, isotropic=False, p=0.75),
            tio.RandomBiasField(coefficients=0.2, order=2, p=0.5),
            tio.RandomGamma(log_gamma=(-0.15, 0.15), p=0.5),
            tio.RandomNoise(std=(0.0, 0.02), p=0.5),
        ]
    )

    def augment(sample: dict) -> dict:
        out = {}
        for plane in PLANES:
            if plane not in sample:
                continue
            images = {"image": tio.ScalarImage(tensor=(sample[plane].float() + 1) / 2)}
            seg_key = f"{plane}_seg"
            if seg_key in sample:
                images["seg"] = tio.LabelMap(tensor=sample[seg_key].long())
            result = transform(tio.Subject(**images))
            out[plane] = (result["image"].data.float() * 2 - 1).clamp(-1, 1)
            if seg_key in sample:
                out[seg_key] = result["seg"].data.long()
        return out

    return augment
