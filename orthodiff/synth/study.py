"""Render one study: build the subject's anatomy, apply its labels, acquire each plane."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..planes import PLANES
from .abnormalities import apply_abnormalities
from .acquisition import (
    SITE_BY_NAME,
    SeriesGeometry,
    class_volume,
    render_series,
    sample_geometry,
    sample_pose,
    scanner_artefacts,
    signal_volume,
)
from .anatomy import Anatomy, Subject, build_anatomy
from .knee import sample_knee_pose
from .population import StudySpec

# Fine grid per joint at the default matrix: (voxels along x, y, z; mm per voxel), about as fine
# as the in-plane pixels (~1.2 mm at matrix 128; the knee's a little coarser, to pay for its size).
# The knee's grid is long in z and y so that a field of view placed off centre, or a flexed leg,
# stays inside it (beyond it the image repeats the grid's faces).
FINE_GRID = {"knee": ((90, 100, 132), 1.6), "ankle": ((128, 128, 128), 1.2), "shoulder": ((128, 128, 128), 1.35)}


def fine_grid(joint: str, matrix: int) -> tuple[tuple[int, int, int], float]:
    """A coarser anatomy grid for small matrices: no detail is lost that the pixels could show,
    and a 48-pixel archive renders several times faster."""
    shape, spacing = FINE_GRID[joint]
    pixel = 150.0 / matrix
    coarse = min(max(spacing, 0.9 * pixel), 2.0 * spacing)
    return tuple(int(np.ceil(n * spacing / coarse)) for n in shape), coarse


@dataclass
class RenderedSeries:
    image: np.ndarray        # int16 (cols, rows, slices)
    seg: np.ndarray          # uint8, same shape
    geometry: SeriesGeometry
    echo_time_ms: float


def subject_anatomy(spec: StudySpec, matrix: int = 128) -> Anatomy:
    """The patient's normal anatomy with this study's abnormalities painted in."""
    rng = np.random.default_rng(spec.anatomy_seed)
    scale = (spec.height / 172.0) ** 0.8 * float(np.clip(rng.normal(1.0, 0.03), 0.92, 1.08))
    cartilage = float(np.clip(2.8 - 0.015 * (spec.age - 40), 1.8, 3.3))
    shape, spacing = fine_grid(spec.joint, matrix)
    subject = Subject(scale, cartilage, rng)
    if spec.joint == "knee":  # shape from the patient, flexion and rotation from this exam
        subject.knee_pose = sample_knee_pose(rng, np.random.default_rng([*spec.study_seed, 11]), scale)
    anatomy = build_anatomy(spec.joint, subject, shape, spacing)
    apply_abnormalities(anatomy, spec.labels, spec.study_seed)
    return anatomy


def render_study(spec: StudySpec, matrix: int = 128) -> dict[str, RenderedSeries]:
    """Every present plane of the study; the same spec always gives the same arrays."""
    anatomy = subject_anatomy(spec, matrix)
    site = SITE_BY_NAME[spec.site]
    rng = np.random.default_rng(spec.study_seed)
    pose = sample_pose(rng, spec.side, spec.joint)
    signal = signal_volume(anatomy, site, rng)
    classes = class_volume(anatomy)
    series = {}
    for index, plane in enumerate(PLANES):  # draw geometry for every plane: a missing one shifts nothing
        geometry = sample_geometry(plane, spec.joint, site, pose, matrix, rng, anatomy.landmarks.get("flexion_deg", 0.0))
        artefact_rng = np.random.default_rng([*spec.study_seed, 100 + index])
        torch_seed = int(rng.integers(2**31 - 1))
        if plane not in spec.planes:
            continue
        image, seg = render_series(anatomy, signal, classes, pose, geometry)
        stored = scanner_artefacts(image, geometry, site, spec.field_strength, artefact_rng, torch_seed)
        series[plane] = RenderedSeries(stored, seg, geometry, site.echo_time_ms)
    return series
