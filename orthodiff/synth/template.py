"""The knee template: a real knee segmentation, resampled into the anatomical frame and shipped small.

The shapes of the femur, tibia, patella, fibula, their cartilage and both menisci come from a
manual segmentation of a right knee (a sagittal 3D DESS scan) published with pymskt
(github.com/gattia/pymskt, folder ``data/``, commit 0f56f055fd154befe1e67ce82b2fa2de22dfdff5,
MIT licence, author Anthony Gatti). The package ships a derived copy,
``orthodiff/synth/data/knee_template.npz``: cropped to the labelled structures, resampled to
1 mm voxels in the anatomical frame (x lateral, y anterior, z superior, origin at the centre of the
tibial plateau), uint8. Regenerate it with

    python -m orthodiff.synth.template --from SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import OrthodiffError

TEMPLATE_PATH = Path(__file__).with_name("data") / "knee_template.npz"
SOURCE_NAME = "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd"
SPACING_MM = 1.0
MARGIN_MM = 3.0
# The source's label values, which the shipped template keeps.
TEMPLATE_LABELS = {1: "femoral_cartilage", 2: "medial_tibial_cartilage", 3: "lateral_tibial_cartilage",
                   4: "patellar_cartilage", 5: "femur", 6: "tibia", 7: "patella", 8: "fibula",
                   9: "lateral_meniscus", 10: "medial_meniscus"}
# Patient LPS -> anatomical frame of a right knee: its lateral side is patient right (-L), anterior is -P.
_ANATOMY_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class KneeTemplate:
    labels: np.ndarray   # uint8 (x, y, z), values of TEMPLATE_LABELS
    origin: np.ndarray   # anatomical mm of voxel (0, 0, 0)
    spacing: float

    def coordinates(self, axis: int) -> np.ndarray:
        return self.origin[axis] + self.spacing * np.arange(self.labels.shape[axis])


def build_template(nrrd_path: Path, spacing: float = SPACING_MM) -> KneeTemplate:
    """Resample the source label map into the anatomical frame.

    Each label's indicator is interpolated linearly and the largest wins, so thin cartilage keeps
    smooth edges at the coarser spacing instead of the stair steps of nearest-neighbour sampling.
    """
    import SimpleITK as sitk
    from scipy.ndimage import map_coordinates

    path = Path(nrrd_path)
    if not path.is_file():
        raise OrthodiffError(f"{path}: no such label map; pass the path of {SOURCE_NAME}")
    image = sitk.ReadImage(str(path))
    source = sitk.GetArrayFromImage(image)  # (k, j, i)
    if source.ndim != 3 or not set(np.unique(source).tolist()) <= {0, *TEMPLATE_LABELS}:
        raise OrthodiffError(f"{path}: expected a 3D knee label map with labels 0-10 ({SOURCE_NAME})")
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    lps_from_index = direction @ np.diag(image.GetSpacing())
    lps_origin = np.asarray(image.GetOrigin(), float)

    def to_anatomy(ijk):  # (n, 3) index (i, j, k) -> anatomical mm, before centring
        return (_ANATOMY_FROM_LPS @ (lps_origin[:, None] + lps_from_index @ ijk.T)).T

    # Centre: middle of both tibial cartilage plates in x and y, their upper surface in z.
    plates = to_anatomy(np.argwhere((source == 2) | (source == 3))[:, ::-1].astype(float))
    centre = np.array([plates[:, 0].mean(), plates[:, 1].mean(), np.percentile(plates[:, 2], 90)])
    centre = np.round(centre, 1)
    labelled = to_anatomy(np.argwhere(source > 0)[::7, ::-1].astype(float)) - centre
    lo = np.floor((labelled.min(0) - MARGIN_MM) / spacing) * spacing
    hi = np.ceil((labelled.max(0) + MARGIN_MM) / spacing) * spacing
    shape = tuple(int(n) for n in np.round((hi - lo) / spacing) + 1)
    grid = np.stack(np.meshgrid(*[lo[a] + spacing * np.arange(shape[a]) for a in range(3)], indexing="ij"), -1)
    lps = (_ANATOMY_FROM_LPS @ (grid.reshape(-1, 3) + centre).T)
    ijk = np.linalg.solve(lps_from_index, lps - lps_origin[:, None])  # (3, n): i, j, k
    kji = ijk[::-1]
    best = np.full(kji.shape[1], -1.0)
    labels = np.zeros(kji.shape[1], np.uint8)
    for value in range(0, 11):
        weight = map_coordinates((source == value).astype(np.float64), kji, order=1, mode="constant", cval=float(value == 0))
        better = weight > best
        labels[better], best[better] = value, weight[better]
    return KneeTemplate(labels.reshape(shape), lo.astype(np.float64), float(spacing))


def save_template(template: KneeTemplate, path: Path) -> Path:
    from ..fileio import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, labels=template.labels, origin=template.origin, spacing=np.float64(template.spacing))
    return path


@lru_cache(maxsize=2)
def load_template(path: Path = TEMPLATE_PATH) -> KneeTemplate:
    try:
        with np.load(path, allow_pickle=False) as data:
            return KneeTemplate(data["labels"].astype(np.uint8), data["origin"].astype(np.float64), float(data["spacing"]))
    except (OSError, KeyError, ValueError) as exc:
        raise OrthodiffError(f"{path}: the knee template is missing or unreadable ({exc}); "
                             f"regenerate it with python -m orthodiff.synth.template --from {SOURCE_NAME}") from exc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m orthodiff.synth.template", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, required=True, help=f"path of {SOURCE_NAME}")
    parser.add_argument("--out", type=Path, default=TEMPLATE_PATH, help="where to write the template (.npz)")
    args = parser.parse_args(argv)
    template = build_template(args.source)
    save_template(template, args.out)
    print(f"Wrote {args.out}: {template.labels.shape} voxels of {template.spacing:g} mm, "
          f"{args.out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
