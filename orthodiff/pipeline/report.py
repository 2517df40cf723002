"""Pictures and the one-page report of one predicted study.

Overlays show the series as acquired, at its own resolution, arranged as a radiologist reads it
(the plane tensor's orientation, see ``orthodiff.data.prepare``: voxel axes permuted and flipped,
never resampled): three central slices side by side, the heat map (jet, transparent where there is
no evidence) or the segmentation (one colour per class) on top, both on the series' own voxel grid.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from ..fileio import atomic_path, write_text

MIN_PIXELS = 160  # slices are enlarged (nearest neighbour) to at least this height in the PNGs
WINDOW_PERCENTILES = (0.5, 99.5)  # the grey-level window, as the plane tensors are scaled


def central_slices(depth: int) -> list[int]:
    """Three slices around the middle of a volume (fewer when it is thinner)."""
    middle = depth // 2
    step = max(1, depth // 4)
    return sorted({min(max(i, 0), depth - 1) for i in (middle - step, middle, middle + step)})


class SourceView:
    """A series on its own voxel grid, arranged like its plane tensor: axis 0 across slices, each
    slice (rows, columns) as ``imshow`` shows the tensor. ``arrange`` puts any array on that grid
    (segmentation, heat map) the same way."""

    def __init__(self, image: np.ndarray, source_affine: np.ndarray, tensor_affine: np.ndarray):
        from nibabel.orientations import io_orientation, ornt_transform

        self.transform = ornt_transform(io_orientation(np.asarray(source_affine, float)),
                                        io_orientation(np.asarray(tensor_affine, float)))
        spacing = np.linalg.norm(np.asarray(source_affine, float)[:3, :3], axis=0)
        arranged_spacing = np.empty(3)
        arranged_spacing[self.transform[:, 0].astype(int)] = spacing
        self.aspect = float(arranged_spacing[1] / arranged_spacing[2])  # pixel height / width
        self.image = _window(self.arrange(image))

    def arrange(self, array: np.ndarray) -> np.ndarray:
        from nibabel.orientations import apply_orientation

        array = np.asarray(array)
        if array.ndim == 4 and array.shape[3] == 1:  # NIfTI (x, y, z, 1)
            array = array[..., 0]
        return apply_orientation(array, self.transform)


def _window(image: np.ndarray) -> np.ndarray:
    """Grey levels in [0, 1] from the volume's percentile window."""
    image = np.asarray(image, dtype=np.float32)
    low, high = np.percentile(image, WINDOW_PERCENTILES)
    if high <= low:
        low, high = float(image.min()), float(image.max())
    return np.clip((image - low) / max(high - low, 1e-12), 0.0, 1.0)


def _grey(image: np.ndarray) -> np.ndarray:
    """[0, 1] image -> RGB floats in [0, 1]."""
    return np.repeat(np.asarray(image, dtype=np.float64)[..., None], 3, axis=-1)


def _square_pixels(rgb: np.ndarray, aspect: float) -> np.ndarray:
    """Stretch the coarser in-plane axis (nearest neighbour) so that anisotropic pixels look square."""
    if abs(aspect - 1.0) < 0.01:
        return rgb
    axis, factor = (0, aspect) if aspect > 1 else (1, 1.0 / aspect)
    size = rgb.shape[axis]
    index = np.minimum((np.arange(round(size * factor)) / factor).astype(int), size - 1)
    return np.take(rgb, index, axis=axis)


def _strip(rgb_slices: list[np.ndarray]) -> np.ndarray:
    height = rgb_slices[0].shape[0]
    scale = max(1, math.ceil(MIN_PIXELS / height))
    gap = np.ones((height * scale, 2 * scale, 3))
    parts = []
    for index, rgb in enumerate(rgb_slices):
        if index:
            parts.append(gap)
        parts.append(np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1))
    return np.concatenate(parts, axis=1)


def heatmap_png(path: Path, view: SourceView, heat: np.ndarray) -> Path:
    """Heat map in [0, 1] on the series' voxel grid over the series, central slices."""
    from matplotlib import colormaps

    jet = colormaps["jet"]
    heat = np.clip(view.arrange(heat), 0, 1)
    slices = []
    for d in central_slices(view.image.shape[0]):
        base = _grey(view.image[d])
        colour = jet(heat[d])[..., :3]
        alpha = 0.55 * heat[d][..., None]
        slices.append(_square_pixels(base * (1 - alpha) + colour * alpha, view.aspect))
    return _save_png(path, _strip(slices))


def segmentation_png(path: Path, view: SourceView, labels: np.ndarray) -> Path:
    """Segmentation (class indices on the series' voxel grid) over the series, central slices."""
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    labels = view.arrange(labels)
    slices = []
    for d in central_slices(view.image.shape[0]):
        rgb = _grey(view.image[d])
        for value in np.unique(labels[d]):
            if value == 0:
                continue
            mask = labels[d] == value
            rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.asarray(palette((int(value) - 1) % 10)[:3])
        slices.append(_square_pixels(rgb, view.aspect))
    return _save_png(path, _strip(slices))


def _save_png(path: Path, rgb: np.ndarray) -> Path:
    from matplotlib import image as mpimg

    with atomic_path(path) as tmp:
        mpimg.imsave(tmp, np.clip(rgb, 0, 1), format="png")
    return path


def write_report(path: Path, summary: dict, pictures: dict, segmentations: dict, gradcam_note: str) -> Path:
    """report.html: decisions table, planes used and missing, segmentations, heat maps per label x plane.

    ``pictures``: {label: {plane: png name}}; ``segmentations``: {plane: png name}.
    """
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(label)}</td><td>{entry['probability']:.3f}</td><td>{entry['threshold']:.3f}</td>"
        f"<td class='{'pos' if entry['decision'] else 'neg'}'>{'positive' if entry['decision'] else 'negative'}</td></tr>"
        for label, entry in summary["labels"].items()
    )
    missing = "".join(f"<li>{e(plane)}: {e(why)}</li>" for plane, why in summary["planes_missing"].items())
    notes = "".join(f"<li>{e(note)}</li>" for note in summary.get("notes", []))
    unlike = "".join(f"<li>{e(plane)}: {e(note)}</li>"
                     for plane, items in (summary.get("out_of_distribution") or {}).items() for note in items)
    planes = list(summary["planes_used"])
    seg_cells = "".join(
        f"<figure><img src='{e(segmentations[p])}' alt='{e(p)} segmentation'><figcaption>{e(p)}</figcaption></figure>"
        for p in planes if p in segmentations
    )
    dicom_segs = _dicom_seg_items(summary, planes)
    heat_rows = "".join(
        f"<tr><th>{e(label)}</th>"
        + "".join(f"<td><img src='{e(by_plane[p])}' alt='{e(label)} {e(p)}'></td>" if p in by_plane else "<td></td>"
                  for p in planes)
        + "</tr>"
        for label, by_plane in pictures.items()
    )
    document = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>orthodiff prediction: {e(summary['study_id'])}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 70em; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
td.pos {{ color: #b00; font-weight: bold; }} td.neg {{ color: #060; }}
img {{ max-width: 100%; }} figure {{ display: inline-block; margin: 0 1em 0 0; }}
.small {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>Study {e(summary['study_id'])}</h1>
<p class="small">Pipeline: {e(str(summary.get('pipeline', '')))}. Planes used: {e(', '.join(planes) or 'none')}.
A decision is positive when the probability reaches the label's threshold (chosen on validation).</p>
<table><tr><th>label</th><th>probability</th><th>threshold</th><th>decision</th></tr>{rows}</table>
{f'<h2>Missing planes</h2><ul>{missing}</ul>' if missing else ''}
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
{f'<h2>Unlike the training data</h2><p class="small">These inputs differ from the series the pipeline was trained on; '
  f'the probabilities may be less reliable for them (they are not adjusted).</p><ul>{unlike}</ul>' if unlike else ''}
{f'<h2>Segmentation</h2>{seg_cells}' if seg_cells else ''}
{f'<h3>DICOM Segmentation objects</h3><ul>{dicom_segs}</ul>' if dicom_segs else ''}
<h2>Grad-CAM heat maps</h2>
<p class="small">Three central slices of each plane. Target layer: {e(gradcam_note)}. Each map explains the decision:
for a positive label it shows the evidence for the finding, for a negative label the evidence against it.
Red is strong evidence, no colour none; each map is scaled to its own maximum.</p>
<table><tr><th></th>{''.join(f'<th>{e(p)}</th>' for p in planes)}</tr>{heat_rows}</table>
</body></html>
"""
    write_text(path, document)
    return path


def _dicom_seg_items(summary: dict, planes: list) -> str:
    """One list item per plane with a DICOM SEG: its file and the patient or study values it does
    not hold as the source does (with why)."""
    e = html.escape
    items = []
    for plane in planes:
        segmentation = summary["series"].get(plane, {}).get("segmentation", {})
        if "dicom_seg" not in segmentation:
            continue
        changes = segmentation.get("dicom_seg_header_changes", [])
        if changes:
            listed = "; ".join(f"{c['attribute']} ({c['reason']}: {c['action']})" for c in changes)
            text = f"header values not copied as the source holds them: {listed}"
        else:
            text = "patient and study values copied as the source holds them"
        items.append(f"<li>{e(plane)}: {e(segmentation['dicom_seg'])}; {e(text)}</li>")
    return "".join(items)
