"""Lesion signal: how much of each knee lesion's signal survives at each plane size, against the noise.

A label's ceiling is bounded by what the images hold. For ``--subjects`` synthetic knees without
findings, each knee label is added alone (the same subject, seed and noise, so the pair differs only
where the lesion is: ``synth.preview``). Both are prepared as ``prepare`` does at several sizes, and
the difference ``delta`` is compared with the noise that the same preparation leaves:

- **matched-filter SNR**: ``|delta|^2 / std(delta . noise)``, the signal-to-noise ratio of an observer
  that knows the lesion's shape and place (the best any model can do; noise drawn ``--draws`` times
  as white Gaussian noise of the site's level on the native grid, then prepared);
- **peak CNR**: the largest voxel change over the prepared noise's per-voxel standard deviation.

Per label, the median over subjects of the best plane. A lesion whose SNR falls from tens at native
resolution to a few at a size is, at that size, about as hard to find as the noise makes it; one
whose peak CNR is under 1 is no brighter than one voxel's noise, so a reader sees nothing.

    OMP_NUM_THREADS=1 python benchmarks/lesion_signal.py                  # 12 subjects
    OMP_NUM_THREADS=1 python benchmarks/lesion_signal.py --subjects 4     # a quick look

Prints a markdown table and writes it, with the command, to
benchmarks/results/lesion-signal/report.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "lesion-signal"
# name -> (plane size, in-plane field of view in mm or None for the whole slab); "native" is the series
SIZES = {
    "8x32x32 slab": ((8, 32, 32), None),
    "16x64x64 crop": ((16, 64, 64), 100.0),
    "32x64x64 crop": ((32, 64, 64), 100.0),
    "16x96x96 crop": ((16, 96, 96), 100.0),
    "32x96x96 crop": ((32, 96, 96), 100.0),
}
CHANGED = 0.1  # a voxel the lesion changes by at least 5% of the [-1, 1] intensity range


def prepared(image: np.ndarray, affine: np.ndarray, plane: str, size: tuple, centre, window=None):
    """The series as ``prepare`` makes it at ``size`` = (plane size, in-plane field of view in mm or None):
    the whole slab resampled to D slices, joint-centred when cropped, intensities windowed to [-1, 1].

    Returns the tensor (D, H, W) and the intensity window used: ``prepare``'s own percentile window, or
    ``window`` when given, so that a lesion is windowed as its lesion-free twin was (a large bright
    lesion moves the percentiles, and then every voxel would change with it).
    """
    from orthodiff.data import prepare
    from orthodiff.io.volume import Volume

    shape, field = size
    fov = None if field is None else (None, field, field)
    used = []
    own = prepare._normalise

    def windowed(tensor, scale):
        values = tensor.as_tensor().numpy()
        low, high = window if window is not None else np.percentile(values, prepare.INTENSITY_PERCENTILES)
        used.append((float(low), float(high)))
        return scale(a_min=float(low), a_max=float(high), b_min=-1.0, b_max=1.0, clip=True)(tensor)

    prepare._normalise = windowed  # the same resampling as prepare, with a window this benchmark chooses
    try:
        tensor, _ = prepare.to_plane_tensor(Volume(image, affine), plane, shape, slab="fit", field_of_view_mm=fov,
                                            centre_ras=None if field is None else centre)
    finally:
        prepare._normalise = own
    return tensor[0], used[0]


def noise_sigma(spec) -> float:
    """The Rician noise's Gaussian sigma in stored units (``synth.acquisition.scanner_artefacts``)."""
    from orthodiff.synth.acquisition import NOISE_FACTOR, SITE_BY_NAME

    site = SITE_BY_NAME[spec.site]
    return float(site.noise * NOISE_FACTOR[spec.field_strength] * site.gain)


def subject_signal(spec, matrix: int, labels, draws: int, rng: np.random.Generator) -> dict:
    """Per label and size: (footprint, peak change, peak CNR, matched-filter SNR) of the plane where the
    lesion covers most voxels, for this subject."""
    from orthodiff.synth.preview import joint_centre_ras
    from orthodiff.synth.study import render_study

    normal = spec.with_labels(**dict.fromkeys(spec.labels, 0))
    reference = render_study(normal, matrix)
    centre = joint_centre_ras(normal)
    sigma = noise_sigma(normal)
    base, noise = {}, {}
    for plane, series in reference.items():
        image = series.image.astype(np.float32)
        affine = series.geometry.affine
        fields = [rng.normal(0.0, sigma, image.shape).astype(np.float32) for _ in range(draws)]
        for size, size_spec in sizes_of(image).items():
            clean, window = prepared(image, affine, plane, size_spec, centre)
            base[plane, size] = clean, window
            noise[plane, size] = np.stack([prepared(image + n, affine, plane, size_spec, centre, window)[0] - clean
                                           for n in fields])
    out = {}
    for label in labels:
        lesion = render_study(normal.with_labels(**{label: 1}), matrix)
        best = {}
        for plane, series in lesion.items():
            image = series.image.astype(np.float32)
            for size, size_spec in sizes_of(image).items():
                clean, window = base[plane, size]
                delta = prepared(image, series.geometry.affine, plane, size_spec, centre, window)[0] - clean
                footprint = int((np.abs(delta) >= CHANGED).sum())
                peak = float(np.abs(delta).max())
                projections = noise[plane, size].reshape(draws, -1) @ delta.ravel()
                energy = float((delta * delta).sum())
                snr = energy / float(projections.std(ddof=1)) if energy > 0 else 0.0
                values = (footprint, peak / 2, peak / float(noise[plane, size].std()), snr)
                if values >= best.get(size, (-1,)):
                    best[size] = values
        out[label] = best
    return out


def sizes_of(image: np.ndarray) -> dict:
    """"native" (the series prepared at its own grid: only its intensities are rescaled), then ``SIZES``."""
    return {"native": ((image.shape[2], max(image.shape[:2]), max(image.shape[:2])), None), **SIZES}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--matrix", type=int, default=128, help="the archive's matrix (synth's default)")
    parser.add_argument("--draws", type=int, default=8, help="noise fields per subject and plane")
    parser.add_argument("--out", type=Path, default=RESULTS / "report.md")
    args = parser.parse_args(argv)

    from orthodiff.synth import JOINT_LABELS, sample_population

    labels = JOINT_LABELS["knee"]
    start = time.perf_counter()
    specs = sample_population("knee", args.subjects, args.seed)
    rng = np.random.default_rng(args.seed)
    per_subject = []
    for i, spec in enumerate(specs):
        per_subject.append(subject_signal(spec, args.matrix, labels, args.draws, rng))
        print(f"subject {i + 1}/{len(specs)} done", file=sys.stderr, flush=True)
    sizes = ("native", *SIZES)
    metrics = (("Voxels the lesion changes by at least 5% of the intensity range", "{:.0f}", 0),
               ("Largest voxel change, as a fraction of the intensity range", "{:.0%}", 1),
               ("Peak CNR: the largest voxel change over one voxel's prepared noise", "{:.0f}", 2),
               ("Matched-filter SNR: an observer that knows the lesion's shape and place", "{:.0f}", 3))
    sections = []
    for title, form, which in metrics:
        rows = [f"| {label} | " + " | ".join(
            form.format(np.median([subject[label][size][which] for subject in per_subject])) for size in sizes)
            + " |" for label in labels]
        sections.append(f"## {title}\n\n| label | " + " | ".join(sizes) + " |\n|---|" + "---:|" * len(sizes)
                        + "\n" + "\n".join(rows))
    total = time.perf_counter() - start
    command = "OMP_NUM_THREADS=1 python benchmarks/lesion_signal.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = (
        "# Lesion signal: what survives of each knee lesion at each plane size\n\n"
        f"{len(specs)} synthetic knees (seed {args.seed}, matrix {args.matrix}), each label added alone to the same "
        "subject; prepared as `prepare` does (whole slab resampled to D slices, trilinear with anti-aliasing, "
        "intensities to [-1, 1], the lesion image with its lesion-free twin's window); crops are joint-centred, 100 mm in plane; native is the series at its own grid. "
        f"Noise: {args.draws} white Gaussian fields per subject and plane at the site's level on the native grid, "
        "prepared the same way. Each cell is the median over subjects of the plane where the lesion changes most "
        "voxels.\n\n" + "\n\n".join(sections)
        + f"\n\nCommand: `{command.strip()}`  \nMachine: {platform.machine()}, Python "
        f"{platform.python_version()}, one thread; {total:.0f} s.\n"
    )
    print(report)
    from orthodiff.fileio import write_text

    write_text(args.out, report)


if __name__ == "__main__":
    main()
