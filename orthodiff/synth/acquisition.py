"""Acquiring a painted anatomy as an MRI series: slice geometry, contrast, partial volume, artefacts.

One series is a stack of thick slices (3-4 mm) over a thin in-plane grid, slightly oblique and
shifted the way a technologist places them. Each slice averages the anatomy across its thickness
(partial volume). Contrast is proton-density fat-suppressed-like and differs by site; the scanner
adds a bias field, sometimes motion and ghosting (torchio), then Rician noise whose level depends
on the field strength.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .anatomy import KINDS, Anatomy

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

# DICOM-conventional in-plane axes (row direction, column direction), in RAS.
_PLANE_AXES = {
    "sagittal": ((0.0, -1.0, 0.0), (0.0, 0.0, -1.0)),  # rows run posterior, columns inferior
    "coronal": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),   # rows run to patient left, columns inferior
    "axial": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),     # rows run to patient left, columns posterior
}

# Proton-density fat-suppressed-like intensities per tissue kind, relative to fluid: fluid brightest,
# suppressed fat dark, fatty marrow dark grey (less suppressed than pure fat: it holds water and
# trabeculae), cortex and fibrous tissue (menisci, ligaments, tendons)
# darkest, cartilage intermediate-bright, muscle between. Reference: the real 3 T multi-echo series
# in ../shared/data/knee_mese_t2_dicom (GE, first echo TE 6.3 ms, PD-weighted, no fat suppression).
# Medians of hand-placed regions on its middle slices: muscle 1060-1340, femoral cartilage about
# 3000, so muscle/cartilage is about 0.4-0.5 (here 0.24/0.50); the menisci and cruciates are near the
# noise floor; the air's Rayleigh mean 290 gives sigma 231, about 0.03 of the brightest tissue
# (7260, the 99.9th percentile) at its 0.625 x 0.625 x 3 mm voxels (1.2 mm3). Noise relative to
# signal falls with voxel volume: at these sites' 4-8 mm3 voxels it would be 0.005-0.009; fat
# suppression and accelerated acquisition give some back, hence 0.010-0.014 of fluid at 3 T.
_BASE_INTENSITY = {
    "air": 0.0, "fat": 0.09, "muscle": 0.24, "cortex": 0.02, "marrow": 0.17, "marrow_edema": 0.55,
    "cartilage": 0.50, "fibrocartilage": 0.035, "ligament": 0.04, "tendon": 0.03, "injured": 0.42,
    "fluid": 0.95, "edema": 0.62, "skin": 0.30,
}
# Relative texture amplitude per kind: trabecular marrow, muscle fibres, fat septa.
_TEXTURE = {"marrow": 0.25, "marrow_edema": 0.25, "muscle": 0.15, "fat": 0.3, "cartilage": 0.08, "injured": 0.2,
            "edema": 0.15}


@dataclass(frozen=True)
class SiteProfile:
    """One imaging centre: its scanners, protocol geometry and contrast."""

    name: str
    weight: float                 # share of the studies
    p_3t: float                   # share of its exams at 3 T
    fov_mm: float
    matrix_scale: float           # rows = matrix * matrix_scale
    col_ratio: float              # columns / rows (rectangular field of view)
    slice_mm: float
    gap_mm: float
    slices: tuple[int, int]
    contrast: dict                # overrides of the base intensities
    echo_time_ms: float
    gain: float                   # stored value of intensity 1.0
    noise: float                  # noise sigma at 3 T, relative to fluid
    bias: float                   # bias-field coefficient range
    motion_p: float
    ghost_p: float


SITES = (
    SiteProfile("Northgate University Hospital", 0.45, 0.8, 150.0, 1.0, 1.0, 3.0, 0.3, (20, 24),
                {"fat": 0.08, "cartilage": 0.52}, 30.0, 1800.0, 0.012, 0.30, 0.05, 0.05),
    SiteProfile("Riverside Orthopaedic Clinic", 0.30, 0.2, 160.0, 0.875, 0.875, 4.0, 0.4, (16, 20),
                {"fat": 0.11, "fluid": 0.85, "cartilage": 0.45, "muscle": 0.27, "marrow": 0.20}, 38.0, 1000.0, 0.010, 0.45, 0.12, 0.10),
    SiteProfile("Lakeside Imaging Centre", 0.25, 0.5, 140.0, 1.0, 1.0, 3.5, 0.0, (18, 22),
                {"fat": 0.09, "fluid": 1.0, "cartilage": 0.55, "marrow": 0.17}, 25.0, 2500.0, 0.014, 0.35, 0.08, 0.08),
)
SITE_BY_NAME = {site.name: site for site in SITES}
# 1.5 T has roughly half the signal-to-noise ratio of 3 T.
NOISE_FACTOR = {3.0: 1.0, 1.5: 1.8}
# Where each joint's slab is centred, in the anatomical frame (mm), and its field-of-view factor.
JOINT_CENTRE = {"knee": (0.0, 12.0, 8.0), "ankle": (0.0, 2.0, -16.0), "shoulder": (-8.0, 0.0, 4.0)}
# A knee's coronal slab is centred on the tibial spines, behind the sagittal field of view's centre
# (which takes in the patella) and on the joint line, so its middle slice crosses both condyles,
# the menisci and the proximal tibia; its axial slab runs from above the patella to the tibial
# tuberosity, so its middle slice crosses the patellofemoral joint.
# The coronal slab's tilt, as a share of the knee's flexion (see ``sample_geometry``): nearer the
# tibia's axis than the femur's, since the narrow tibial shaft leaves a tilted slab sooner than the
# broad femoral condyles do.
KNEE_CORONAL_TILT = 0.7
KNEE_PLANE_CENTRE = {"coronal": (0.0, -4.0, 0.0), "axial": (0.0, 12.0, 22.0)}
JOINT_FOV = {"knee": 1.0, "ankle": 1.0, "shoulder": 1.12}


@dataclass
class SeriesGeometry:
    """Where a series' voxels lie: in-plane axes, normal, spacings and the first voxel."""

    plane: str
    row_dir: np.ndarray      # RAS direction of increasing column index (along a row)
    col_dir: np.ndarray      # RAS direction of increasing row index (down a column)
    normal: np.ndarray
    pixel_mm: float
    slice_mm: float          # thickness
    spacing_mm: float        # centre-to-centre distance between slices
    cols: int
    rows: int
    slices: int
    origin: np.ndarray       # RAS centre of voxel (0, 0, 0)

    @property
    def affine(self) -> np.ndarray:
        """NIfTI voxel (column, row, slice) -> RAS mm."""
        affine = np.eye(4)
        affine[:3, 0] = self.row_dir * self.pixel_mm
        affine[:3, 1] = self.col_dir * self.pixel_mm
        affine[:3, 2] = self.normal * self.spacing_mm
        affine[:3, 3] = self.origin
        return affine


@dataclass
class Pose:
    """How the patient lies in the scanner: anatomical frame -> RAS."""

    matrix: np.ndarray       # 3x3, includes the left/right mirror for the side
    offset: np.ndarray

    def world_from_anatomy(self) -> np.ndarray:
        affine = np.eye(4)
        affine[:3, :3], affine[:3, 3] = self.matrix, self.offset
        return affine


def _rotation(rng: np.random.Generator, degrees: tuple[float, float, float]) -> np.ndarray:
    """A small random rotation: angles drawn uniformly within +-degrees about x, y and z."""
    from .shapes import rotation

    ax, ay, az = (rng.uniform(-d, d) for d in degrees)
    return rotation("z", az) @ rotation("y", ay) @ rotation("x", ax)


# How far a knee is turned in the coil about its long axis (degrees, + = external rotation of the
# leg, which patients fall into when the foot is not strapped), and how far the field of view's
# centre misses the joint centre (mm; in plane, and across the slab, which then leaves part of one
# compartment out). README "Synthetic archives" gives the reasons.
KNEE_LEG_ROTATION_DEG = (-10.0, 15.0)
KNEE_CENTRING_MM = 15.0
KNEE_SLAB_SHIFT_MM = 8.0
KNEE_FOV_FACTOR = (0.9, 1.1)


def sample_pose(rng: np.random.Generator, side: int, joint: str = "knee") -> Pose:
    """Patient position; side +1 is a right limb, whose lateral side (anatomical +x) is RAS +x."""
    from .shapes import rotation

    mirror = np.diag([float(side), 1.0, 1.0])
    if joint != "knee":
        return Pose(_rotation(rng, (5.0, 3.0, 6.0)) @ mirror, rng.normal(0.0, 4.0, 3))
    # The leg's rotation is anatomical (external is lateral-ward for either side), so turn before mirroring.
    leg = rotation("z", -rng.uniform(*KNEE_LEG_ROTATION_DEG))
    return Pose(_rotation(rng, (5.0, 3.0, 0.0)) @ mirror @ leg, rng.normal(0.0, 4.0, 3))


def sample_geometry(plane: str, joint: str, site: SiteProfile, pose: Pose, matrix: int,
                    rng: np.random.Generator, flexion_deg: float = 0.0) -> SeriesGeometry:
    """Slab placement: small obliquity, shifted centre, jittered field of view and slice count.

    A flexed knee's coronal slab is tilted by most of the flexion (KNEE_CORONAL_TILT), the way a
    technologist lines it up between the femoral and the tibial shaft on the sagittal localiser, so
    both bones stay in it.
    """
    oblique = _rotation(rng, (6.0, 6.0, 6.0))
    if joint == "knee" and plane == "coronal":
        from .shapes import rotation

        oblique = oblique @ pose.matrix @ rotation("x", -KNEE_CORONAL_TILT * flexion_deg) @ pose.matrix.T
    row_dir, col_dir = (oblique @ np.asarray(axis) for axis in _PLANE_AXES[plane])
    normal = np.cross(row_dir, col_dir)
    rows = max(16, round(matrix * site.matrix_scale / 16.0) * 16)
    cols = max(16, round(rows * site.col_ratio / 16.0) * 16)
    fov_factor = rng.uniform(*KNEE_FOV_FACTOR) if joint == "knee" else rng.uniform(0.95, 1.05)
    pixel = site.fov_mm * JOINT_FOV[joint] * fov_factor / rows
    slices = int(rng.integers(site.slices[0], site.slices[1] + 1))
    spacing = site.slice_mm + site.gap_mm
    if joint == "knee":  # the technologist's centring: off in plane, and across the slab
        miss = (rng.uniform(-KNEE_CENTRING_MM, KNEE_CENTRING_MM, 2) @ np.stack([row_dir, col_dir])
                + rng.uniform(-KNEE_SLAB_SHIFT_MM, KNEE_SLAB_SHIFT_MM) * normal)
    else:
        miss = rng.normal(0.0, 3.0, 3)
    target = KNEE_PLANE_CENTRE.get(plane, JOINT_CENTRE[joint]) if joint == "knee" else JOINT_CENTRE[joint]
    centre = pose.matrix @ np.asarray(target) + pose.offset + miss
    origin = centre - ((cols - 1) / 2 * pixel * row_dir + (rows - 1) / 2 * pixel * col_dir + (slices - 1) / 2 * spacing * normal)
    return SeriesGeometry(plane, row_dir, col_dir, normal, pixel, site.slice_mm, spacing, cols, rows, slices, origin)


def tissue_intensities(anatomy: Anatomy, site: SiteProfile) -> tuple[np.ndarray, np.ndarray]:
    """Per-tissue intensity and texture amplitude for this site's contrast."""
    values = {**_BASE_INTENSITY, **site.contrast}
    kinds = [KINDS[k] for k in anatomy.table.kind_index()]
    return (np.asarray([values[k] for k in kinds], np.float32),
            np.asarray([_TEXTURE.get(k, 0.05) for k in kinds], np.float32))


def signal_volume(anatomy: Anatomy, site: SiteProfile, rng: np.random.Generator) -> np.ndarray:
    """Noise-free signal on the fine grid: tissue intensity with a fine-grained texture."""
    intensity, texture_amp = tissue_intensities(anatomy, site)
    labels = anatomy.canvas.labels
    # White noise at the grid's scale (1.2-1.6 mm) reads as trabecular grain once resampled. One
    # field per process, cut at a random offset per study: drawing a fresh one would cost more
    # than the rest of the signal.
    field = _grain_field(labels.shape)
    start = [int(rng.integers(0, field.shape[a] - labels.shape[a] + 1)) for a in range(3)]
    texture = field[tuple(slice(s, s + n) for s, n in zip(start, labels.shape))]
    grain = texture_amp[labels]
    # A field of view reaching past the grid repeats its outer faces: keep them free of grain so
    # the limb continues as smooth bands instead of streaks.
    for axis in range(3):
        np.moveaxis(grain, axis, 0)[[0, 1, -2, -1]] = 0.0
    grain *= texture
    grain += 1.0
    signal = intensity[labels]
    signal *= grain
    return np.maximum(signal, 0.0, out=signal)


@lru_cache(maxsize=2)
def _grain_field(shape: tuple[int, int, int]) -> np.ndarray:
    """Gaussian white noise a little larger than the grid, the same in every process."""
    return np.random.default_rng(20240611).standard_normal(tuple(n + 24 for n in shape), dtype=np.float32)


def slab_profile(signal: np.ndarray, anatomy: Anatomy, pose: Pose, geometry: SeriesGeometry) -> np.ndarray:
    """Average the signal over the slice thickness (partial volume).

    The slab normal lies within a few degrees of one fine-grid axis, so a box filter of the slice
    thickness along that axis stands in for integrating across each slice.
    """
    from scipy.ndimage import correlate1d

    normal_in_grid = np.linalg.inv(pose.matrix) @ geometry.normal
    axis = int(np.argmax(np.abs(normal_in_grid)))
    width = geometry.slice_mm / anatomy.canvas.spacing  # in voxels
    half = int(np.ceil(width / 2 - 0.5))
    offsets = np.arange(-half, half + 1)
    # Overlap of each voxel [o - 0.5, o + 0.5] with the box [-width/2, width/2].
    weights = np.clip(np.minimum(offsets + 0.5, width / 2) - np.maximum(offsets - 0.5, -width / 2), 0, None)
    return correlate1d(signal, weights / weights.sum(), axis=axis, mode="nearest")


def _sample_grid(anatomy: Anatomy, pose: Pose, geometry: SeriesGeometry):
    """grid_sample coordinates (1, slices, rows, cols, 3) of the series' voxel centres in the fine grid."""
    import torch
    import torch.nn.functional as F

    canvas = anatomy.canvas
    index_from_world = np.linalg.inv(pose.world_from_anatomy() @ canvas.index_to_anatomy())
    voxel_to_index = index_from_world @ geometry.affine
    out_shape = (geometry.cols, geometry.rows, geometry.slices)
    # affine_grid maps normalised output coordinates (w, h, d) = (col, row, slice) to normalised
    # input coordinates (w, h, d) = (z, y, x) of the fine grid; both with align_corners=True.
    out_norm = np.eye(4)
    out_norm[:3, :3] = np.diag([(n - 1) / 2.0 for n in out_shape])
    out_norm[:3, 3] = [(n - 1) / 2.0 for n in out_shape]
    in_norm = np.eye(4)
    in_norm[:3, :3] = np.diag([2.0 / (n - 1) for n in canvas.shape])
    in_norm[:3, 3] = -1.0
    theta = (in_norm @ voxel_to_index @ out_norm)[[2, 1, 0]][:, [0, 1, 2, 3]]
    theta = torch.from_numpy(theta[None].astype(np.float32))
    size = (1, 1, geometry.slices, geometry.rows, geometry.cols)
    return F.affine_grid(theta, size, align_corners=True)


def class_volume(anatomy: Anatomy):
    """Segmentation classes on the fine grid as a float32 tensor (grid_sample samples floats)."""
    import torch

    return torch.from_numpy(anatomy.table.class_lut().astype(np.float32)[anatomy.canvas.labels])


def render_series(anatomy: Anatomy, signal: np.ndarray, classes, pose: Pose, geometry: SeriesGeometry):
    """Partial-volume image (cols, rows, slices) float32 tensor and the segmentation at slice centres (uint8).

    ``classes`` is the float32 tensor of segmentation classes on the fine grid (see ``class_volume``).
    """
    import torch
    import torch.nn.functional as F

    grid = _sample_grid(anatomy, pose, geometry)
    slab = torch.from_numpy(slab_profile(signal, anatomy, pose, geometry))
    # Border padding continues the limb beyond the painted grid.
    image = F.grid_sample(slab[None, None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
    seg = F.grid_sample(classes[None, None], grid, mode="nearest", padding_mode="zeros", align_corners=True)[0, 0]
    return image.permute(2, 1, 0).contiguous(), seg.permute(2, 1, 0).numpy().astype(np.uint8)


def scanner_artefacts(image, geometry: SeriesGeometry, site: SiteProfile, field_strength: float,
                      rng: np.random.Generator, torch_seed: int) -> np.ndarray:
    """Motion and ghosting (sometimes), bias field (always) through torchio, then Rician noise."""
    import torch
    import torchio as tio

    transforms = []
    if rng.random() < site.motion_p:
        transforms.append(tio.RandomMotion(degrees=2.0, translation=2.0, num_transforms=2))
    if rng.random() < site.ghost_p:
        transforms.append(tio.RandomGhosting(num_ghosts=(2, 5), axes=(int(rng.integers(2)),), intensity=(0.1, 0.3)))
    torch.manual_seed(torch_seed)  # torchio draws its parameters from torch's generator
    if transforms:
        image = tio.Compose(transforms)(tio.ScalarImage(tensor=image[None], affine=geometry.affine)).data[0]
    clean = image.numpy() * _bias_field(image.shape, site)
    # Magnitude images carry Rician noise: the modulus of signal plus complex Gaussian noise.
    sigma = site.noise * NOISE_FACTOR[field_strength]
    real = clean + np.float32(sigma) * rng.standard_normal(clean.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(clean.shape, dtype=np.float32)
    noisy = np.sqrt(real * real + imag * imag)
    return np.clip(np.round(noisy * site.gain), 0, 32767).astype(np.int16)


def _bias_field(shape, site: SiteProfile) -> np.ndarray:
    """torchio's smooth polynomial bias field, drawn on a coarse grid and upsampled (it is smooth)."""
    import torch
    import torch.nn.functional as F
    import torchio as tio

    coarse = (max(4, shape[0] // 8), max(4, shape[1] // 8), shape[2])
    ones = tio.ScalarImage(tensor=torch.ones((1, *coarse)))
    field = tio.RandomBiasField(coefficients=site.bias, order=3)(ones).data[None].float()
    return F.interpolate(field, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()
