"""A picture a person can check: an archive's studies, then each label at the archive's resolution and
at the sizes a benchmark feeds its models, beside the same knee without it.

Every subject drawn is a study of the archive (its ``metadata.csv``), rendered as ``synth`` wrote it.
Each label row edits one of them: the same subject and seed with only that label added, so the pair
differs only where the lesion is. The row shows the plane and slice where the label changes the
image most, at the archive's matrix, as ``prepare`` makes it for the ``small`` preset (the whole slab
at 8 x 32 x 32) and as a joint-centred crop (about 100 mm in plane, 16 x 64 x 64) would; a lesion
smaller than a pixel at a size is gone at that size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OrthodiffError
from ..planes import PLANES
from .abnormalities import JOINT_LABELS, apply_abnormalities
from .population import StudySpec, sample_population

BENCH_SIZE = (8, 32, 32)           # the small preset's plane tensor, whole slab
CROP_SIZE = (16, 64, 64)           # a joint-centred crop
CROP_FIELD_MM = 100.0              # its in-plane field of view


@dataclass(frozen=True)
class Views:
    """One series at the three sizes: native (cols, rows, slices), and two plane tensors (1, D, H, W)."""

    native: np.ndarray
    bench: np.ndarray
    crop: np.ndarray


def archive_studies(archive, subjects: int) -> list[StudySpec]:
    """The first ``subjects`` studies that ``synth`` wrote to ``archive``, as it drew them."""
    import pandas as pd

    from ..fileio import read_json

    archive = Path(archive)
    try:
        info = read_json(archive / "archive.json")
        written = pd.read_csv(archive / "metadata.csv")["study_id"].tolist()
    except (OSError, ValueError, KeyError) as exc:
        raise OrthodiffError(f"{archive}: not a synthetic archive ({exc}); write one with orthodiff synth") from exc
    specs = [spec for spec in sample_population(info["joint"], int(info["studies"]), int(info["seed"]))
             if spec.study_id in set(written)]
    return specs[:subjects]


def joint_centre_crop(image: np.ndarray, affine: np.ndarray, centre_ras: np.ndarray, field_mm: float = CROP_FIELD_MM):
    """The in-plane square of ``field_mm`` around the joint centre (all slices), with its affine."""
    voxel = np.linalg.solve(affine, np.append(centre_ras, 1.0))[:3]
    pixel = float(np.linalg.norm(affine[:3, 0]))
    half = int(round(field_mm / pixel / 2))
    starts = []
    for axis in range(2):
        start = int(round(voxel[axis])) - half
        starts.append(int(np.clip(start, 0, max(image.shape[axis] - 2 * half, 0))))
    cropped = image[starts[0]:starts[0] + 2 * half, starts[1]:starts[1] + 2 * half]
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.array([starts[0], starts[1], 0.0]) + affine[:3, 3]
    return cropped, shifted


def series_views(series, plane: str, centre_ras: np.ndarray) -> Views:
    """A rendered series at its own matrix, as the small preset prepares it, and joint-centred and cropped."""
    from ..data.prepare import to_plane_tensor
    from ..io.volume import Volume

    image, affine = series.image.astype(np.float32), series.geometry.affine
    bench, _ = to_plane_tensor(Volume(image, affine), plane, BENCH_SIZE, slab="fit")
    cropped, crop_affine = joint_centre_crop(image, affine, centre_ras)
    crop, _ = to_plane_tensor(Volume(np.ascontiguousarray(cropped), crop_affine), plane, CROP_SIZE, slab="fit")
    return Views(image, bench, crop)


def joint_centre_ras(spec: StudySpec) -> np.ndarray:
    """The joint centre in the scanner's frame: the study's pose, drawn first from its stream."""
    from .acquisition import JOINT_CENTRE, sample_pose

    pose = sample_pose(np.random.default_rng(spec.study_seed), spec.side, spec.joint)
    return pose.matrix @ np.asarray(JOINT_CENTRE[spec.joint]) + pose.offset


def findings(spec: StudySpec, matrix: int) -> dict[str, str]:
    """What each label's edit draws on this subject (kind, grade, site), one label at a time."""
    from .study import subject_anatomy

    normal = subject_anatomy(spec.with_labels(**dict.fromkeys(spec.labels, 0)), matrix)
    described = {}
    for label in JOINT_LABELS[spec.joint]:
        edited = copy.deepcopy(normal)
        apply_abnormalities(edited, {label: 1}, spec.study_seed)
        described[label] = edited.findings[label]
    return described


def _most_changed(a: np.ndarray, b: np.ndarray, axis: int) -> int:
    change = np.abs(a.astype(np.float32) - b.astype(np.float32))
    totals = change.sum(axis=tuple(i for i in range(change.ndim) if i != axis))
    return int(np.argmax(totals)) if totals.max() > 0 else a.shape[axis] // 2


def write_preview(archive, path=None, subjects: int = 3) -> Path:
    """PNG of ``archive``'s first ``subjects`` studies (mid-slices of each plane), then one row per label.

    Written to ``path`` (default ``archive/preview.png``).
    """
    import json

    from ..plotting import pyplot, save_png
    from .study import render_study

    archive = Path(archive)
    specs = archive_studies(archive, subjects)
    if not specs:
        raise OrthodiffError(f"{archive}: the archive lists no studies; write one with orthodiff synth")
    matrix = int(json.loads((archive / "archive.json").read_text())["matrix"])
    joint = specs[0].joint
    normals = [spec.with_labels(**dict.fromkeys(spec.labels, 0)) for spec in specs]
    as_written = [render_study(spec, matrix) for spec in specs]
    clean = [render_study(spec, matrix) for spec in normals]
    described = [findings(spec, matrix) if spec.joint == "knee" else {} for spec in normals]

    labels = JOINT_LABELS[joint]
    columns = 6
    plt = pyplot()
    fig, axes = plt.subplots(len(specs) + len(labels), columns, figsize=(2.0 * columns, 2.2 * (len(specs) + len(labels))),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (spec, series) in enumerate(zip(specs, as_written)):
        present = ", ".join(name for name, value in spec.labels.items() if value) or "normal"
        for c, plane in enumerate(p for p in PLANES if p in series):
            image = series[plane].image
            k = image.shape[2] // 2
            title = f"{spec.study_id} as written" if c == 0 else ""
            _show(axes[r, c], image[:, :, k].T, f"{title}\n{plane} {k + 1}/{image.shape[2]}", 0, float(np.percentile(image, 99.8)) or 1.0)
        axes[r, 3].text(0.0, 0.5, "labels: " + present.replace(", ", "\n"), fontsize=6, va="center", transform=axes[r, 3].transAxes)
    for i, label in enumerate(labels):
        which = i % len(specs)
        spec, reference = normals[which], clean[which]
        lesion = render_study(spec.with_labels(**{label: 1}), matrix)
        planes = [p for p in PLANES if p in lesion]
        plane = max(planes, key=lambda p: float(np.abs(lesion[p].image.astype(np.float32) - reference[p].image).sum()))
        centre = joint_centre_ras(spec)
        before, after = series_views(reference[plane], plane, centre), series_views(lesion[plane], plane, centre)
        row = axes[len(specs) + i]
        what = described[which].get(label, label)
        k = _most_changed(before.native, after.native, 2)
        top = float(np.percentile(before.native, 99.8)) or 1.0
        size = f"{before.native.shape[1]} px"
        _show(row[0], before.native[:, :, k].T, f"{spec.study_id} without {label}\n{plane} {size}, slice {k + 1}", 0, top)
        _show(row[1], after.native[:, :, k].T, f"with: {what}", 0, top)
        for c, name, shape in ((2, "bench", BENCH_SIZE), (4, "crop", CROP_SIZE)):
            a, b = getattr(before, name)[0], getattr(after, name)[0]
            d = _most_changed(a, b, 0)
            where = "whole slab" if name == "bench" else f"{CROP_FIELD_MM:.0f} mm crop"
            _show(row[c], a[d], f"without, {'x'.join(map(str, shape))} {where}\nslice {d + 1}", -1, 1)
            _show(row[c + 1], b[d], f"with, {'x'.join(map(str, shape))}\nlargest change {np.abs(b - a).max() / 2:.0%}", -1, 1)
    fig.tight_layout()
    return save_png(fig, Path(path) if path else archive / "preview.png")


def _show(ax, image, title: str, vmin: float, vmax: float) -> None:
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=5.5)
