"""Pictures and the one-page report of one predicted study.

Overlays show the plane tensor as a radiologist reads it (see ``orthodiff.data.prepare``): three
central slices side by side, the heat map (jet, transparent where there is no evidence) or the
segmentation (one colour per class) on top.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from ..fileio import atomic_path, write_text

MIN_PIXELS = 160  # slices are enlarged (nearest neighbour) to at least this height in the PNGs


def central_slices(depth: int) -> list[int]:
    """Three slices around the middle of the plane tensor (fewer when it is thinner)."""
    middle = depth // 2
    step = max(1, depth // 4)
    return sorted({min(max(i, 0), depth - 1) for i in (middle - step, middle, middle + step)})


def _grey(image: np.ndarray) -> np.ndarray:
    """[-1, 1] image -> RGB floats in [0, 1]."""
    grey = np.clip((image + 1.0) / 2.0, 0.0, 1.0)
    return np.repeat(grey[..., None], 3, axis=-1)


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


def heatmap_png(path: Path, image: np.ndarray, heat: np.ndarray) -> Path:
    """Heat map (D, H, W) in [0, 1] over the plane tensor image (D, H, W), central slices."""
    from matplotlib import colormaps

    jet = colormaps["jet"]
    slices = []
    for d in central_slices(image.shape[0]):
        base = _grey(image[d])
        colour = jet(np.clip(heat[d], 0, 1))[..., :3]
        alpha = 0.55 * np.clip(heat[d], 0, 1)[..., None]
        slices.append(base * (1 - alpha) + colour * alpha)
    return _save_png(path, _strip(slices))


def segmentation_png(path: Path, image: np.ndarray, labels: np.ndarray) -> Path:
    """Segmentation (D, H, W) uint8 over the plane tensor image, central slices."""
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    slices = []
    for d in central_slices(image.shape[0]):
        rgb = _grey(image[d])
        for value in np.unique(labels[d]):
            if value == 0:
                continue
            mask = labels[d] == value
            rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.asarray(palette((int(value) - 1) % 10)[:3])
        slices.append(rgb)
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
<h2>Grad-CAM heat maps</h2>
<p class="small">Three central slices of each plane. Target layer: {e(gradcam_note)}. Each map explains the decision:
for a positive label it shows the evidence for the finding, for a negative label the evidence against it.
Red is strong evidence, no colour none; each map is scaled to its own maximum.</p>
<table><tr><th></th>{''.join(f'<th>{e(p)}</th>' for p in planes)}</tr>{heat_rows}</table>
</body></html>
"""
    write_text(path, document)
    return path
