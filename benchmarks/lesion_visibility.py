"""Lesion visibility: can a linear model on raw voxels tell each knee label at the bench's plane sizes?

Renders ``--studies`` synthetic knees (``orthodiff.synth``, seed fixed, at the archive's matrix),
prepares every series as ``prepare`` does at two sizes, and scores per label a logistic regression
on the raw voxels of the three planes (PCA to ``--components`` fitted on each training fold,
5-fold cross-validation grouped by patient, out-of-fold AUROC):

- bench: the small preset's plane tensor, the whole slab at 8 x 32 x 32;
- crop: a joint-centred crop, about 100 mm in plane, at 16 x 64 x 64 (``synth.preview``).

A label a linear model finds from raw voxels is in the data at that size; one it cannot find may
still be learnable by a deeper model, or its lesions may be smaller than the pixels there.

    OMP_NUM_THREADS=1 python benchmarks/lesion_visibility.py                 # 300 studies
    OMP_NUM_THREADS=1 python benchmarks/lesion_visibility.py --studies 60    # a quick look

Prints a markdown table and writes it, with the command, to
benchmarks/results/lesion-visibility/report.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "lesion-visibility"
SIZES = ("bench", "crop")


def render_features(studies: int, seed: int, matrix: int):
    """Per study: the three planes' tensors flattened at each size (a missing plane is zeros)."""
    from orthodiff.planes import PLANES
    from orthodiff.synth import sample_population
    from orthodiff.synth.preview import BENCH_SIZE, CROP_SIZE, joint_centre_ras, series_views
    from orthodiff.synth.study import render_study

    specs = sample_population("knee", studies, seed)
    shapes = {"bench": BENCH_SIZE, "crop": CROP_SIZE}
    features = {size: np.zeros((len(specs), len(PLANES) * int(np.prod(shapes[size]))), np.float32) for size in SIZES}
    for i, spec in enumerate(specs):
        series = render_study(spec, matrix)
        centre = joint_centre_ras(spec)
        for p, plane in enumerate(PLANES):
            if plane not in series:
                continue
            views = series_views(series[plane], plane, centre)
            for size in SIZES:
                flat = getattr(views, size).ravel()
                features[size][i, p * flat.size:(p + 1) * flat.size] = flat
        if (i + 1) % 50 == 0:
            print(f"rendered {i + 1}/{len(specs)}", file=sys.stderr, flush=True)
    return specs, features


def fold_components(features: np.ndarray, groups: np.ndarray, components: int, seed: int) -> list:
    """Per fold (5, by patient): its train and test rows and both projected on the train rows' PCA."""
    from sklearn.decomposition import PCA
    from sklearn.model_selection import GroupKFold

    folds = []
    for train, test in GroupKFold(n_splits=5).split(features, groups=groups):
        pca = PCA(min(components, len(train) - 1), random_state=seed).fit(features[train])
        folds.append((train, test, pca.transform(features[train]), pca.transform(features[test])))
    return folds


def score(folds: list, labels: np.ndarray) -> float:
    """Out-of-fold AUROC of a logistic regression on the projected voxels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    predicted = np.zeros(len(labels))
    for train, test, x_train, x_test in folds:
        if labels[train].min() == labels[train].max():
            predicted[test] = labels[train].mean()
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(x_train, labels[train])
        predicted[test] = model.predict_proba(x_test)[:, 1]
    return float(roc_auc_score(labels, predicted)) if 0 < labels.sum() < len(labels) else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--matrix", type=int, default=128, help="the archive's matrix (synth's default)")
    parser.add_argument("--components", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "report.md")
    args = parser.parse_args(argv)

    from orthodiff.synth import JOINT_LABELS

    start = time.perf_counter()
    specs, features = render_features(args.studies, args.seed, args.matrix)
    rendered = time.perf_counter() - start
    groups = np.array([spec.patient_id for spec in specs])
    folds = {size: fold_components(features[size], groups, args.components, args.seed) for size in SIZES}
    rows = []
    for label in JOINT_LABELS["knee"]:
        y = np.array([spec.labels[label] for spec in specs])
        aurocs = {size: score(folds[size], y) for size in SIZES}
        rows.append(f"| {label} | {int(y.sum())} | {aurocs['bench']:.2f} | {aurocs['crop']:.2f} |")
    total = time.perf_counter() - start
    table = "\n".join(["| label | positives | 8x32x32 whole slab | 16x64x64 joint crop (~100 mm) |",
                       "|---|---:|---:|---:|", *rows])
    command = "OMP_NUM_THREADS=1 python benchmarks/lesion_visibility.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = (f"# Lesion visibility: raw-voxel logistic regression per knee label\n\n"
              f"{len(specs)} synthetic knee studies of {len(set(groups))} patients (seed {args.seed}, matrix "
              f"{args.matrix}), three planes each, prepared as `prepare` does (trilinear, whole slab) at 8x32x32 and "
              f"as a joint-centred crop at 16x64x64; PCA to {args.components} components fitted per training fold, "
              f"standardised, logistic regression (C = 1); out-of-fold AUROC over 5 folds grouped by patient.\n\n"
              f"{table}\n\nCommand: `{command.strip()}`  \n"
              f"Machine: {platform.machine()}, Python {platform.python_version()}, one thread; rendering and "
              f"preparing took {rendered:.0f} s, all {total:.0f} s.\n")
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from orthodiff.fileio import atomic_path

    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(report)


if __name__ == "__main__":
    main()
