"""Knee lesions as proton-density fat-suppressed MRI shows them, at their real sizes.

Each edit draws one lesion the way musculoskeletal radiology describes it, sized relative to its
structure, and returns a short description (type, grade, site) for previews:

- meniscal tear: a 2 mm cleft of fluid signal through the meniscus reaching an articular surface
  (horizontal, oblique, vertical longitudinal, radial), or a displaced fragment (bucket handle lying
  in the notch in front of the PCL, "double PCL"; a flipped posterior-horn fragment lying on the
  anterior horn, "double anterior horn") that leaves a small, blunted meniscus behind;
- cartilage defect: a focal defect 6-16 mm wide, partial (ICRS 2-3) or full thickness (ICRS 4),
  filled with fluid, with subchondral marrow oedema under the deeper ones;
- ACL tear: discontinuous fibres with fluid in the gap, a wavy distal stump sagging flat below its
  course, oedema in the notch and (mostly) pivot-shift bone bruises; or an absent ligament (chronic);
  or one bundle torn (partial);
- PCL tear: a thickened ligament of intermediate signal (interstitial tear) or a discontinuity;
- MCL and LCL injury, by grade: oedema around an intact ligament (1), a thickened ligament of
  intermediate signal within it (2), a fluid-filled discontinuity (3);
- effusion: fluid distending the suprapatellar recess, small, moderate or large, the larger ones
  filling the side and posterior recesses too.

A cleft is at least about one grid voxel thick so that it stays continuous; on the fine grid of a
128-pixel archive (1.6 mm) that is its real 1-2 mm, on the coarser grids of small archives it is
thicker. Each edit paints only the tissues it should change, near its structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import Anatomy
from .knee import FLUID_FILM_MM
from .shapes import Capsule, Ellipsoid

SOFT_ONLY = ("fat", "muscle")
JOINT_SPACE = ("fat", "fat_pad", "muscle", "fluid", "edema")  # what a displaced fragment or fluid may fill
ARTICULAR = ("femoral_cartilage", "tibial_cartilage")
CLEFT_MM = 1.0  # half-thickness of a tear's cleft: real tear lines are 1-2 mm of fluid signal


def _cleft_half(anatomy: Anatomy) -> float:
    return max(CLEFT_MM, 0.55 * anatomy.canvas.spacing)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _voxel_points(anatomy: Anatomy, tissue: str) -> np.ndarray:
    """Anatomical mm of every voxel of one tissue, (n, 3)."""
    canvas = anatomy.canvas
    index = np.argwhere(canvas.labels == canvas.ids[tissue])
    return np.stack([canvas.axes[a][index[:, a]] for a in range(3)], 1).astype(float)


def _bbox(points: np.ndarray, margin: float) -> np.ndarray:
    return np.stack([points.min(0) - margin, points.max(0) + margin])


# -------------------------------------------------------------------------------------------- menisci
@dataclass(frozen=True)
class MeniscusFrame:
    """Polar coordinates of a C-shaped meniscus on its tibial plateau.

    ``phi`` is the angle around the meniscus' centre in the tibia's plane (-90 degrees: posterior
    horn, +90: anterior horn, the body at 180 medially and 0 laterally), ``rho`` the distance from the
    centre relative to the meniscus' radii (inner free edge about 0.4, periphery about 1), ``h`` the
    height along the tibia's axis (mm).
    """

    centre: np.ndarray
    radii: np.ndarray
    turn: np.ndarray   # tibia directions -> subject directions

    def polar(self, x, y, z):
        px, py, pz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        t = self.turn
        u = t[0, 0] * px + t[1, 0] * py + t[2, 0] * pz
        v = t[0, 1] * px + t[1, 1] * py + t[2, 1] * pz
        h = t[0, 2] * px + t[1, 2] * py + t[2, 2] * pz
        return np.arctan2(v / self.radii[1], u / self.radii[0]), np.hypot(u / self.radii[0], v / self.radii[1]), h

    def point(self, phi: float, rho: float, h: float) -> np.ndarray:
        local = np.array([self.radii[0] * rho * np.cos(phi), self.radii[1] * rho * np.sin(phi), h])
        return self.centre + self.turn @ local

    def radius_mm(self, phi) -> np.ndarray:
        """mm per unit of rho at angle phi."""
        return np.hypot(self.radii[0] * np.cos(phi), self.radii[1] * np.sin(phi))


def _wrap(angle):
    return (angle + np.pi) % (2 * np.pi) - np.pi


@dataclass(frozen=True)
class Section:
    """The meniscus' cross-section around one angle: free edge and periphery (rho), and its
    inferior and superior surfaces (h) as functions of rho."""

    rho_in: float
    rho_out: float
    rho_bins: np.ndarray
    h_low: np.ndarray
    h_high: np.ndarray

    @property
    def width(self) -> float:
        return self.rho_out - self.rho_in

    def low(self, rho):
        return np.interp(rho, self.rho_bins, self.h_low)

    def high(self, rho):
        return np.interp(rho, self.rho_bins, self.h_high)


def _section(frame: MeniscusFrame, points: np.ndarray, phi0: float, half_width: float = np.deg2rad(20)) -> Section:
    phi, rho, h = frame.polar(points[:, 0], points[:, 1], points[:, 2])
    near = np.abs(_wrap(phi - phi0)) < half_width
    if near.sum() < 8:  # a thin part of the C: widen the sector
        near = np.abs(_wrap(phi - phi0)) < 2 * half_width
    rho, h = rho[near], h[near]
    edges = np.linspace(rho.min(), rho.max() + 1e-6, 7)
    centres, lows, highs = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (rho >= lo) & (rho < hi)
        if inside.any():
            centres.append((lo + hi) / 2)
            lows.append(h[inside].min())
            highs.append(h[inside].max())
    return Section(float(rho.min()), float(rho.max()), np.asarray(centres), np.asarray(lows), np.asarray(highs))


# Where tears are (share of posterior horn, body, anterior horn) and which kinds, medial and lateral:
# the medial posterior horn holds most tears, mostly horizontal or oblique (degenerative); lateral
# tears are more often radial or vertical (traumatic, with ACL tears).
_TEAR_SITES = {"medial_meniscus": (0.7, 0.2, 0.1), "lateral_meniscus": (0.55, 0.25, 0.2)}
_TEAR_KINDS = ("horizontal", "oblique", "vertical", "radial", "bucket handle", "flipped fragment")
_TEAR_KIND_P = {"medial_meniscus": (0.25, 0.35, 0.12, 0.12, 0.1, 0.06),
                "lateral_meniscus": (0.15, 0.2, 0.15, 0.3, 0.1, 0.1)}


def meniscal_tear(name: str):
    """The edit of one meniscus' tear label."""

    def edit(anatomy: Anatomy, rng: np.random.Generator) -> str:
        centre, radii, turn = anatomy.landmarks["menisci"][name]
        frame = MeniscusFrame(np.asarray(centre, float), np.asarray(radii, float), np.asarray(turn, float))
        points = _voxel_points(anatomy, name)
        kind = _TEAR_KINDS[int(rng.choice(len(_TEAR_KINDS), p=_TEAR_KIND_P[name]))]
        body = np.pi if name == "medial_meniscus" else 0.0
        if kind in ("bucket handle", "flipped fragment"):
            return _displaced_fragment(anatomy, rng, name, frame, points, kind, body)
        site = int(rng.choice(3, p=_TEAR_SITES[name]))
        phi0 = (-np.pi / 2, body, np.pi / 2)[site] + rng.uniform(-1, 1) * np.deg2rad(15)
        section = _section(frame, points, phi0)
        mask = _CLEFTS[kind](rng, frame, section, phi0, _cleft_half(anatomy))
        anatomy.canvas.paint_mask(_bbox(points, 2.0), mask, "fluid", only=(name,))
        return f"{kind} tear, {('posterior horn', 'body', 'anterior horn')[site]}"

    return edit


def _arc_mm(frame, phi, rho, phi0):
    return _wrap(phi - phi0) * rho * frame.radius_mm(phi0)


def _horizontal(rng, frame, section, phi0, half):
    """A cleavage along the middle of the wedge from the free edge towards the periphery."""
    reach = section.rho_in + rng.uniform(0.5, 0.85) * section.width
    length = rng.uniform(10, 20)

    def mask(x, y, z):
        phi, rho, h = frame.polar(x, y, z)
        middle = (section.low(rho) + section.high(rho)) / 2
        return (np.abs(h - middle) < half) & (rho < reach) & (np.abs(_arc_mm(frame, phi, rho, phi0)) < length / 2)

    return mask


def _oblique(rng, frame, section, phi0, half):
    """From the inferior surface, rising outwards at 30-60 degrees, through most or all of the height."""
    rho0 = section.rho_in + rng.uniform(0.25, 0.6) * section.width
    angle = np.deg2rad(rng.uniform(30, 60))
    foot = float(section.low(rho0))
    height = float(section.high(rho0) - foot)
    run = rng.uniform(0.6, 1.2) * height / np.sin(angle)
    length = rng.uniform(10, 20)
    scale = frame.radius_mm(phi0)

    def mask(x, y, z):
        phi, rho, h = frame.polar(x, y, z)
        r = (rho - rho0) * scale
        across = -r * np.sin(angle) + (h - foot) * np.cos(angle)
        along = r * np.cos(angle) + (h - foot) * np.sin(angle)
        return (np.abs(across) < half) & (along > -4.0) & (along < run) & (np.abs(_arc_mm(frame, phi, rho, phi0)) < length / 2)

    return mask


def _vertical(rng, frame, section, phi0, half):
    """Along the meniscus in its peripheral part, through its whole height."""
    rho0 = section.rho_out - rng.uniform(0.2, 0.45) * section.width
    length = rng.uniform(10, 25)
    scale = frame.radius_mm(phi0)

    def mask(x, y, z):
        phi, rho, _ = frame.polar(x, y, z)
        return (np.abs(rho - rho0) * scale < half) & (np.abs(_arc_mm(frame, phi, rho, phi0)) < length / 2)

    return mask


def _radial(rng, frame, section, phi0, half):
    """Across the meniscus from its free edge outwards, through its whole height; its edges part a little."""
    reach = section.rho_in + rng.uniform(0.4, 1.0) * section.width
    gap = max(half, rng.uniform(1.0, 2.0))

    def mask(x, y, z):
        phi, rho, _ = frame.polar(x, y, z)
        return (np.abs(_arc_mm(frame, phi, rho, phi0)) < gap) & (rho < reach)

    return mask


_CLEFTS = {"horizontal": _horizontal, "oblique": _oblique, "vertical": _vertical, "radial": _radial}


def _displaced_fragment(anatomy, rng, name, frame, points, kind, body) -> str:
    """The inner part of the meniscus torn off over an arc and lying elsewhere in the joint."""
    canvas = anatomy.canvas
    phi, rho, h = frame.polar(points[:, 0], points[:, 1], points[:, 2])
    toward_body = np.sign(_wrap(body + np.pi / 2)) or 1.0  # from the posterior horn round through the body
    start = -np.pi / 2 + np.deg2rad(rng.uniform(-15, 10)) * toward_body
    span = np.deg2rad(rng.uniform(100, 170) if kind == "bucket handle" else rng.uniform(35, 60))
    offset = _wrap(phi - start) * toward_body
    arc = (offset >= 0) & (offset <= span)
    share = rng.uniform(0.4, 0.6)  # the fragment's share of the meniscus' width
    fragment = np.zeros(len(points), bool)
    for lo in np.arange(0, span, np.deg2rad(15)):  # the free edge and periphery, sector by sector
        sector = arc & (offset >= lo) & (offset < lo + np.deg2rad(15))
        if sector.any():
            cut = rho[sector].min() + share * np.ptp(rho[sector])
            fragment |= sector & (rho <= cut)
    if not fragment.any():
        fragment = arc
    index = np.round((points[fragment] - [axis[0] for axis in canvas.axes]) / canvas.spacing).astype(int)
    canvas.labels[tuple(index.T)] = canvas.ids["fat"]  # the femoral and tibial cartilage close on the space
    volume = fragment.sum() * canvas.spacing ** 3
    if kind == "bucket handle":
        # In the notch, in front of and below the PCL and parallel to it: the "double PCL" sign.
        pcl = anatomy.landmarks["pcl"]
        s = anatomy.landmarks["scale"]
        shift = np.array([2.0 * np.sign(frame.centre[0]), 6.0 * s, -4.0 * s])
        a, b = pcl.point(0.05) + shift, pcl.point(0.75) + shift
        radius = float(np.clip(np.sqrt(volume / (np.pi * np.linalg.norm(b - a))), 1.2, 3.5))
        canvas.paint(Capsule(tuple(a), tuple(b), radius), name, only=JOINT_SPACE)
        return f"bucket-handle tear over {np.degrees(span):.0f} degrees, fragment in the notch"
    # A flipped posterior-horn fragment lies against the anterior horn, behind it or on top of it:
    # the "double anterior horn" sign. It takes the joint space there, pressing on the cartilage.
    anterior = np.abs(_wrap(phi - np.pi / 2)) < np.deg2rad(25)
    if not anterior.any():
        anterior = np.ones(len(points), bool)
    radii = np.array([3.0, 2.2, 1.6]) * np.cbrt(volume / (4 / 3 * np.pi * 3.0 * 2.2 * 1.6))
    inner, middle = float(rho[anterior].min()), float(np.median(h[anterior]))
    scale = float(frame.radius_mm(np.pi / 2))
    places = (frame.point(np.pi / 2, inner - radii[1] / scale, middle),
              frame.point(np.pi / 2, float(np.median(rho[anterior])), float(h[anterior].max()) + radii[2]))
    painted = 0
    for where in places:
        painted += canvas.paint(Ellipsoid(tuple(where), tuple(radii)), name, only=JOINT_SPACE + ARTICULAR)
        if painted >= 0.5 * fragment.sum():
            break
    return "posterior-horn fragment flipped onto the anterior horn"


# ------------------------------------------------------------------------------------------ ligaments
def _sleeve(lig: Capsule, extra_mm: float, t0: float = 0.0, t1: float = 1.0, factor: float = 1.0) -> Capsule:
    """The part of a ligament between t0 and t1, its cross-section ``factor`` times as thick plus ``extra_mm``."""
    radius = lig.radius * factor + extra_mm
    squash = tuple((lig.radius * factor * s + extra_mm) / radius for s in lig.squash)
    return Capsule(tuple(lig.point(t0)), tuple(lig.point(t1)), radius, squash)


def _along(lig: Capsule, mm: float) -> float:
    """A length along the ligament as a share of it."""
    return mm / max(float(np.linalg.norm(np.subtract(lig.b, lig.a))), 1e-6)


def _wavy(canvas, start, end, radius: float, amplitude: float, tissue: str, only, rng) -> None:
    """A lax, undulating band from start to end (a torn ligament's stump), waving in the sagittal plane."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    side = _unit(np.cross(end - start, [1.0, 0.0, 0.0]))
    phase = rng.uniform(0, 2 * np.pi)
    ts = np.linspace(0, 1, 5)
    knots = [start + t * (end - start) + side * amplitude * np.sin(np.pi * t) * np.sin(2 * np.pi * t + phase) for t in ts]
    for a, b in zip(knots[:-1], knots[1:]):
        canvas.paint(Capsule(tuple(a), tuple(b), radius), tissue, only=only)


def _bone_bruise(anatomy: Anatomy, bone: str, centre, radii) -> None:
    anatomy.canvas.paint(Ellipsoid(tuple(centre), tuple(radii)), f"{bone}_edema", only=(bone,))


def _in_tibia(anatomy, point, offset):
    return np.asarray(point) + anatomy.landmarks["tibia_rotation"] @ np.asarray(offset, float)


def acl_tear(anatomy: Anatomy, rng: np.random.Generator) -> str:
    lm, canvas = anatomy.landmarks, anatomy.canvas
    lig, s = lm["acl"], lm["scale"]
    kind = rng.choice(["complete", "chronic", "partial"], p=[0.65, 0.15, 0.2])
    site = rng.choice(["mid-substance", "femoral", "tibial"], p=[0.7, 0.2, 0.1])
    t0 = {"mid-substance": rng.uniform(0.35, 0.65), "femoral": rng.uniform(0.12, 0.25), "tibial": rng.uniform(0.75, 0.85)}[site]
    if kind == "partial":  # one bundle torn over 8-15 mm, the rest thickened and of intermediate signal
        half = _along(lig, rng.uniform(4, 7.5))
        canvas.paint(_sleeve(lig, 0.0, t0 - half, t0 + half, factor=1.2), "acl_injured", only=("acl", "fat", "fat_pad"))
        side = _unit(np.cross(np.subtract(lig.b, lig.a), [1.0, 0.0, 0.0])) * lig.radius * 0.5 * rng.choice([-1, 1])
        bundle = Capsule(tuple(lig.point(t0 - half) + side), tuple(lig.point(t0 + half) + side), lig.radius * 0.55, lig.squash)
        canvas.paint(bundle, "fluid", only=("acl_injured",))
        return f"partial tear (one bundle), {site}"
    canvas.paint(_sleeve(lig, 0.6), "fat", only=("acl",))  # the normal ligament is gone
    tibial_end = np.asarray(lig.b, float)
    if kind == "chronic":  # resorbed: an empty notch, a short remnant lying flat on the tibia
        remnant = tibial_end + lm["tibia_rotation"] @ np.array([0.0, -rng.uniform(5, 9) * s, 1.5])
        canvas.paint(Capsule(tuple(tibial_end), tuple(remnant), lig.radius * 0.6, lig.squash), "acl", only=JOINT_SPACE)
        return "chronic complete tear, ligament absent"
    gap = _along(lig, rng.uniform(2.5, 5.0))
    femoral_end = lig.point(max(t0 - gap, 0.0))
    canvas.paint(Capsule(tuple(lig.a), tuple(femoral_end), lig.radius * rng.uniform(1.0, 1.2), lig.squash), "acl_injured",
                 only=JOINT_SPACE)
    # The distal stump is lax: it sags below the ligament's course (flatter than Blumensaat's line) and waves.
    sag = rng.uniform(3, 8) * s
    free_end = lig.point(min(t0 + gap, 1.0)) + np.array([0.0, 0.5 * sag, -sag])
    _wavy(canvas, tibial_end, free_end, lig.radius * rng.uniform(0.8, 1.0), rng.uniform(1.0, 2.0), "acl_injured", JOINT_SPACE, rng)
    canvas.paint(Capsule(tuple(femoral_end), tuple(free_end), lig.radius * 1.1), "fluid", only=("fat", "fat_pad"))
    cuff = _along(lig, 8.0)
    canvas.paint(_sleeve(lig, rng.uniform(1.5, 3.0), max(t0 - cuff, 0.0), min(t0 + cuff, 1.0)), "edema", only=("fat", "fat_pad"))
    if rng.random() < 0.7:  # the pivot-shift bruises of the lateral femoral condyle and posterolateral tibia
        _bone_bruise(anatomy, "femur", lm["lateral_condyle"] + [0, 4 * s, 9 * s], (9 * s, 10 * s, 6 * s))
        _bone_bruise(anatomy, "tibia", _in_tibia(anatomy, lm["lateral_plateau_posterior"], (0, 4 * s, -8 * s)),
                     (9 * s, 8 * s, 6 * s))
    return f"complete tear, {site}"


def pcl_tear(anatomy: Anatomy, rng: np.random.Generator) -> str:
    canvas, lig = anatomy.canvas, anatomy.landmarks["pcl"]
    t0 = rng.uniform(0.25, 0.7)
    half = _along(lig, rng.uniform(6, 10))
    canvas.paint(_sleeve(lig, 0.0, max(t0 - half, 0), min(t0 + half, 1), factor=rng.uniform(1.3, 1.7)), "pcl_injured",
                 only=("pcl", "fat", "fat_pad"))
    if rng.random() < 0.6:  # interstitial: thickened, intermediate signal, continuous
        return "interstitial tear: thickened, intermediate signal"
    gap = _along(lig, rng.uniform(1.5, 3.0))
    canvas.paint(_sleeve(lig, 0.5, t0 - gap, t0 + gap, factor=1.6), "fluid", only=("pcl_injured", "pcl", "fat", "fat_pad"))
    canvas.paint(_sleeve(lig, rng.uniform(1.0, 2.5), max(t0 - half, 0), min(t0 + half, 1), factor=1.6), "edema",
                 only=("fat", "fat_pad"))
    return "complete tear, fluid in the gap"


def collateral_injury(name: str):
    """MCL or LCL injury by grade; the MCL most often tears near the femur."""

    def edit(anatomy: Anatomy, rng: np.random.Generator) -> str:
        canvas, lig = anatomy.canvas, anatomy.landmarks[name]
        grade = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
        proximal = name == "mcl" and rng.random() < 0.65
        t0 = rng.uniform(0.1, 0.4) if proximal else rng.uniform(0.3, 0.8)
        reach = _along(lig, rng.uniform(12, 20))
        span = (max(t0 - reach, 0.0), min(t0 + reach, 1.0))
        canvas.paint(_sleeve(lig, rng.uniform(1.5, 3.0) + 1.5 * (grade - 1), *span), "edema", only=SOFT_ONLY)
        if grade >= 2:
            thick = _along(lig, rng.uniform(6, 10))
            canvas.paint(_sleeve(lig, 0.0, max(t0 - thick, 0), min(t0 + thick, 1), factor=rng.uniform(1.6, 2.0)),
                         f"{name}_injured", only=(name, "edema", "fat", "muscle"))
        if grade == 3:
            gap = _along(lig, rng.uniform(1.5, 3.0))
            canvas.paint(_sleeve(lig, 0.5, t0 - gap, t0 + gap, factor=2.0), "fluid", only=(name, f"{name}_injured", "edema"))
        return f"grade {grade} ({('sprain, oedema around an intact ligament', 'partial tear', 'complete tear')[grade - 1]})"

    return edit


# ---------------------------------------------------------------------------------------- cartilage
_BONE_UNDER = {"femoral_cartilage": "femur", "patellar_cartilage": "patella"}


def cartilage_defect(anatomy: Anatomy, rng: np.random.Generator) -> str:
    """A focal defect of the weight-bearing femoral condyle or the patella, filled with fluid."""
    from scipy.ndimage import distance_transform_edt

    lm, canvas = anatomy.landmarks, anatomy.canvas
    site = ("medial femoral condyle", "lateral femoral condyle", "patella")[int(rng.choice(3, p=[0.5, 0.2, 0.3]))]
    tissue = "patellar_cartilage" if site == "patella" else "femoral_cartilage"
    bone = _BONE_UNDER[tissue]
    landmark = lm["patellar_cartilage" if site == "patella" else f"{site.split()[0]}_condyle_cartilage"]
    cartilage = _voxel_points(anatomy, tissue)
    aim = landmark + rng.uniform(-4, 4, 3)
    centre = cartilage[np.argmin(np.linalg.norm(cartilage - aim, axis=1))]
    radius = rng.uniform(3.0, 8.0)  # 6-16 mm across
    grade = int(rng.choice([2, 3, 4], p=[0.3, 0.35, 0.35]))
    depth = {2: rng.uniform(0.3, 0.5), 3: rng.uniform(0.55, 0.85), 4: 1.01}[grade]

    window = tuple(slice(int(np.searchsorted(axis, c - radius - 3 * canvas.spacing)),
                         int(np.searchsorted(axis, c + radius + 3 * canvas.spacing, side="right")))
                   for axis, c in zip(canvas.axes, centre))
    x, y, z = (axis[w] for axis, w in zip(canvas.axes, window))
    view = canvas.labels[window]
    ids = canvas.ids
    is_cartilage = view == ids[tissue]
    is_bone = np.isin(view, [ids[bone], ids[f"{bone}_cortex"], ids[f"{bone}_edema"]])
    # Relative depth from the joint surface: 0 at the surface, 1 at the bone.
    from_joint = distance_transform_edt(is_cartilage | is_bone)
    from_bone = distance_transform_edt(~is_bone)
    relative = from_joint / np.maximum(from_joint + from_bone, 1e-6)
    near = ((x[:, None, None] - centre[0]) ** 2 + (y[None, :, None] - centre[1]) ** 2
            + (z[None, None, :] - centre[2]) ** 2 < radius ** 2)
    defect = is_cartilage & near & (relative <= depth)
    if not defect.any():  # cartilage one voxel thick here: the defect takes its surface layer
        defect = is_cartilage & near & (from_joint <= 1.0)
    view[defect] = ids["fluid"]
    if grade == 4 or (grade == 3 and rng.random() < 0.3):  # subchondral marrow oedema under the deeper defects
        def mm(mask):
            index = np.argwhere(mask)
            return np.stack([x[index[:, 0]], y[index[:, 1]], z[index[:, 2]]], 1).mean(0)

        floor = mm(defect)
        into_bone = _unit(mm(is_bone) - floor)
        # A lens under the defect: as wide as it plus a little, 3-5 mm deep into the bone.
        across = _unit(np.cross(into_bone, [1.0, 0.0, 0.0] if abs(into_bone[0]) < 0.9 else [0.0, 1.0, 0.0]))
        axes = np.stack([across, np.cross(into_bone, across), into_bone])
        deep = rng.uniform(3, 5)
        anatomy.canvas.paint(Ellipsoid(tuple(floor + into_bone * (deep + 1.0)), (radius + 2, radius + 2, deep), axes),
                             f"{bone}_edema", only=(bone,))
        return f"ICRS grade {grade}, {2 * radius:.0f} mm, {site}, subchondral oedema"
    return f"ICRS grade {grade}, {2 * radius:.0f} mm, {site}"


# ------------------------------------------------------------------------------------------ effusion
# Anteroposterior distension of the suprapatellar recess (mm): above the normal film of fluid (under
# 4 mm), a small effusion is 4-6 mm, a moderate one 6-10 mm, a large one over 10 mm.
_EFFUSION_MM = {"small": (4.0, 6.0), "moderate": (6.0, 10.0), "large": (10.0, 16.0)}


def joint_effusion(anatomy: Anatomy, rng: np.random.Generator) -> str:
    lm, canvas = anatomy.landmarks, anatomy.canvas
    s = lm["scale"]
    amount = ("small", "moderate", "large")[int(rng.choice(3, p=[0.35, 0.4, 0.25]))]
    depth = rng.uniform(*_EFFUSION_MM[amount])
    grow = depth / 10.0
    # The suprapatellar recess, between the quadriceps tendon and the prefemoral fat (sagittal): it
    # distends forwards from the normal film of fluid on the femur and reaches higher and wider.
    centre = lm["pouch"] + [0.0, depth / 2 - FLUID_FILM_MM, 4.0 * s * grow]
    canvas.paint(Ellipsoid(tuple(centre), (18 * s + 6 * grow, depth / 2, 10 * s + 10 * grow)), "fluid", only=SOFT_ONLY)
    if amount == "small":
        return f"small effusion, suprapatellar recess {depth:.0f} mm"
    for side in ("lateral", "medial"):  # the parapatellar recesses (axial) and, when large, the posterior ones
        sign = 1 if side == "lateral" else -1
        canvas.paint(Ellipsoid(tuple(lm[f"{side}_epicondyle"] + [sign * 5 * s, 12 * s, -4 * s]), (depth * 0.3, 14 * s, 12 * s)),
                     "fluid", only=SOFT_ONLY)
        if amount == "large":
            canvas.paint(Ellipsoid(tuple(lm[f"{side}_condyle_posterior"] + [0, -5 * s, 4 * s]), (8 * s, depth * 0.3, 9 * s)),
                         "fluid", only=SOFT_ONLY)
    return f"{amount} effusion, suprapatellar recess {depth:.0f} mm"
