"""3D anatomy of the knee, ankle and shoulder as tissue-label volumes.

The knee comes from a real segmentation (``template.py``, ``knee.py``). The ankle and shoulder are
each drawn from a few dozen primitives in an anatomical frame (mm; x lateral,
y anterior, z superior, origin at the joint centre), scaled by the subject's size and jittered per
subject. A *tissue* is what the renderer gives an intensity (femur marrow, femur cortex, femur
bone bruise ...); each tissue maps to one *segmentation class* (all three femur tissues are class
"femur"; fat, muscle and fluid are background).

Segmentation classes (index 0 is background):

- knee: femur, tibia, patella, fibula, femoral_cartilage, tibial_cartilage, patellar_cartilage,
  medial_meniscus, lateral_meniscus, cruciate_ligaments (ACL and PCL).
- ankle: tibia, fibula, talus, calcaneus, navicular, talar_cartilage, tibial_cartilage, atfl, cfl,
  achilles_tendon.
- shoulder: humerus, scapula (glenoid, body, spine, coracoid), acromion, clavicle,
  humeral_cartilage, labrum, supraspinatus_tendon, infraspinatus_tendon, subscapularis_tendon,
  biceps_tendon.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .shapes import Box, Canvas, Capsule, Ellipsoid, ZCylinder, rotation
from .tissues import JOINT_CLASSES, KINDS, SOFT, TissueTable, tissue_table


@dataclass
class Subject:
    """What shapes one subject's anatomy: size, cartilage thickness and a jitter stream."""

    scale: float
    cartilage_mm: float
    rng: np.random.Generator
    knee_pose: object = None  # knee.KneePose: the template's deformation, flexion and rotation

    def j(self, spread: float = 0.05) -> float:
        """A per-subject multiplicative jitter around 1."""
        return float(1.0 + np.clip(self.rng.normal(0.0, spread), -2.5 * spread, 2.5 * spread))


@dataclass
class Anatomy:
    """The painted tissue volume plus the landmarks that abnormalities edit."""

    joint: str
    canvas: Canvas
    table: TissueTable
    landmarks: dict = field(default_factory=dict)
    findings: dict = field(default_factory=dict)  # label -> what its edit drew (kind, grade, site)


def build_anatomy(joint: str, subject: Subject, grid_shape=(128, 128, 128), spacing: float = 1.2) -> Anatomy:
    table = tissue_table(joint)
    canvas = Canvas(grid_shape, spacing, table.ids)
    landmarks = _BUILDERS[joint](canvas, subject)
    return Anatomy(joint, canvas, table, landmarks)


def _bone(canvas: Canvas, shape, name: str, cortex: float = 1.4, cartilage: list | None = None) -> None:
    """Cortex, marrow and (optionally) cartilage layers of one bone, in one distance evaluation."""
    layers = [(f"{name}_cortex", -np.inf, 0.0, SOFT, None), (name, -np.inf, -cortex, (f"{name}_cortex",), None)]
    for tissue, thickness, where in cartilage or []:
        layers.append((tissue, 0.0, thickness, SOFT, where))
    canvas.paint_layers(shape, layers)


def _cyl(x: float, y: float, rx: float, ry: float, z0: float = -400.0, z1: float = 400.0) -> ZCylinder:
    return ZCylinder((x, y), (rx, ry), z0, z1)


# --------------------------------------------------------------------------------------------- knee
def _knee(canvas: Canvas, sub: Subject) -> dict:
    """The real template's bones, cartilage and menisci, deformed and posed (see ``knee.py``)."""
    from .knee import paint_knee, sample_knee_pose

    pose = sub.knee_pose or sample_knee_pose(sub.rng, sub.rng, sub.scale)
    landmarks = paint_knee(canvas, pose)
    landmarks["cartilage_mm"] = sub.cartilage_mm
    return landmarks


# -------------------------------------------------------------------------------------------- ankle
def _ankle(canvas: Canvas, sub: Subject) -> dict:
    s, j, t = sub.scale, sub.j, sub.cartilage_mm * 0.7
    canvas.paint(_cyl(0, -5 * s, 40 * s * j(), 44 * s, z0=-40 * s), "fat")
    canvas.paint(Ellipsoid((0, 40 * s, -45 * s), (42 * s, 110 * s, 30 * s)), "fat")
    canvas.paint(Ellipsoid((0, -28 * s, -45 * s), (30 * s, 30 * s, 28 * s)), "fat")
    canvas.paint(_cyl(0, -16 * s, 27 * s, 22 * s, z0=45 * s), "muscle", only=("fat",))
    canvas.paint(Ellipsoid((0, 35 * s, -66 * s), (28 * s, 60 * s, 7 * s)), "muscle", only=("fat",))

    calcaneus = Ellipsoid((2 * s, -12 * s, -44 * s), (17 * s * j(), 34 * s * j(), 15 * s), rotation("x", -15))
    _bone(canvas, calcaneus, "calcaneus")
    talus = Ellipsoid((0, 4 * s, -14 * s), (16 * s * j(), 20 * s * j(), 14 * s)) | Ellipsoid((-4 * s, 28 * s, -20 * s), (12 * s, 12 * s, 10 * s))
    _bone(canvas, talus, "talus", cartilage=[("talar_cartilage", t, lambda x, y, z: z > -9 * s)])
    _bone(canvas, Ellipsoid((-6 * s, 44 * s, -22 * s), (14 * s, 6 * s, 10 * s)), "navicular")
    plafond = 2.5 * s
    tibia = ((Ellipsoid((0, 2 * s, 16 * s), (20 * s * j(), 17 * s * j(), 14 * s)) - Box((0, 0, plafond - 50), (100, 100, 50)))
             | _cyl(0, 2 * s, 13 * s * j(), 13 * s, z0=10 * s)
             | Ellipsoid((-18 * s, 3 * s, -4 * s), (5 * s, 9 * s, 11 * s)))
    _bone(canvas, tibia, "tibia", cartilage=[("tibial_cartilage", t, lambda x, y, z: (z < plafond + 0.3) & (x > -13 * s) & (x < 17 * s))])
    fibula = Capsule((24 * s, -8 * s, 5 * s), (20 * s, -8 * s, 300), 7 * s) | Ellipsoid((24 * s, -6 * s, -10 * s), (7 * s, 11 * s, 16 * s))
    _bone(canvas, fibula, "fibula")

    atfl = Capsule((25 * s, 4 * s, -16 * s), (12 * s, 24 * s, -18 * s), 1.8 * s * j(), (1.0, 1.0, 2.2))
    cfl = Capsule((25 * s, -6 * s, -26 * s), (19 * s, -16 * s, -44 * s), 2.2 * s * j())
    achilles = Capsule((0, -34 * s, 90 * s), (0, -44 * s, -38 * s), 3.5 * s * j(), (2.2, 1.0, 1.0))
    for name, shape in (("atfl", atfl), ("cfl", cfl), ("achilles_tendon", achilles),
                        ("peroneal_tendons", Capsule((28 * s, -16 * s, 80), (29 * s, -14 * s, -28 * s), 2.5 * s)),
                        ("tibialis_posterior", Capsule((-17 * s, -10 * s, 80), (-23 * s, 4 * s, -20 * s), 2.5 * s))):
        canvas.paint(shape, name, only=SOFT)
    canvas.paint(Ellipsoid((0, 18 * s, 0), (12 * s, 2 * s, 3 * s)), "fluid", only=("fat", "muscle"))
    return {"scale": s, "cartilage_mm": t, "atfl": atfl, "cfl": cfl, "achilles": achilles, "plafond": plafond}


# ----------------------------------------------------------------------------------------- shoulder
def _shoulder(canvas: Canvas, sub: Subject) -> dict:
    s, j, t = sub.scale, sub.j, sub.cartilage_mm * 0.6
    canvas.paint(Ellipsoid((-30 * s, 0, -10 * s), (85 * s * j(), 70 * s * j(), 130 * s)), "fat")
    canvas.paint(Ellipsoid((2 * s, 0, -8 * s), (40 * s, 42 * s, 52 * s)), "muscle", only=("fat",))  # deltoid
    canvas.paint(Capsule((-30 * s, -6 * s, 30 * s), (-90 * s, -12 * s, 34 * s), 11 * s), "muscle", only=("fat",))
    canvas.paint(Ellipsoid((-58 * s, -32 * s, -12 * s), (30 * s, 9 * s, 38 * s), rotation("z", 30)), "muscle", only=("fat",))
    canvas.paint(Ellipsoid((-58 * s, -2 * s, -12 * s), (30 * s, 9 * s, 38 * s), rotation("z", 30)), "muscle", only=("fat",))

    humerus = (Ellipsoid((0, 0, 0), (24 * s * j(), 24 * s * j(), 26 * s))
               | _cyl(8 * s, 0, 13 * s * j(), 13 * s, z1=-15 * s)
               | Ellipsoid((18 * s, 4 * s, 8 * s), (8 * s, 10 * s, 9 * s))
               | Ellipsoid((8 * s, 20 * s, -2 * s), (6 * s, 6 * s, 8 * s)))
    humerus = humerus - Capsule((15 * s, 19 * s, 20 * s), (15 * s, 19 * s, -80 * s), 3.5 * s)
    _bone(canvas, humerus, "humerus", cartilage=[("humeral_cartilage", t, lambda x, y, z: (x < 4 * s) & (z > -18 * s))])
    scapula = (Ellipsoid((-34 * s, 0, 0), (6 * s, 13 * s * j(), 18 * s * j()))
               | Box((-72 * s, -18 * s, -12 * s), (38 * s, 3 * s, 42 * s), rotation("z", 30))
               | Capsule((-80 * s, -30 * s, 24 * s), (-22 * s, -20 * s, 33 * s), 5 * s)
               | Capsule((-40 * s, 0, 14 * s), (-20 * s, 30 * s, 8 * s), 5 * s))
    _bone(canvas, scapula, "scapula")
    acromion = Ellipsoid((-2 * s, -6 * s, 38 * s), (20 * s * j(), 16 * s, 4.5 * s), rotation("y", -8))
    _bone(canvas, acromion, "acromion")
    clavicle = Capsule((-27 * s, 4 * s, 39 * s), (-140 * s, 25 * s, 44 * s), 7 * s * j())
    _bone(canvas, clavicle, "clavicle")

    rim_x = -28 * s
    canvas.paint_mask(((rim_x - 4 * s, -17 * s, -22 * s), (rim_x + 4 * s, 17 * s, 22 * s)), _labrum_mask(rim_x, 13 * s, 18 * s),
                      "labrum", only=SOFT)
    cuff = {
        "supraspinatus_tendon": [Capsule((-30 * s, -4 * s, 28 * s), (0, -2 * s, 29 * s), 3 * s, (1.0, 3.5, 1.0)),
                                 Capsule((0, -2 * s, 29 * s), (20 * s, 2 * s, 17 * s), 3 * s, (1.0, 3.5, 1.0))],
        "infraspinatus_tendon": [Capsule((-35 * s, -30 * s, 5 * s), (0, -27 * s, 8 * s), 3 * s, (1.0, 1.0, 3.0)),
                                 Capsule((0, -27 * s, 8 * s), (20 * s, -10 * s, 8 * s), 3 * s, (1.0, 1.0, 3.0))],
        "subscapularis_tendon": [Capsule((-35 * s, 24 * s, -5 * s), (0, 27 * s, -3 * s), 3 * s, (1.0, 1.0, 3.0)),
                                 Capsule((0, 27 * s, -3 * s), (10 * s, 22 * s, -4 * s), 3 * s, (1.0, 1.0, 3.0))],
        "biceps_tendon": [Capsule((15 * s, 19 * s, -80 * s), (15 * s, 19 * s, 15 * s), 2.5 * s),
                          Capsule((15 * s, 19 * s, 15 * s), (4 * s, 10 * s, 27 * s), 2.5 * s),
                          Capsule((4 * s, 10 * s, 27 * s), (-26 * s, 0, 20 * s), 2.5 * s)],
    }
    for name, parts in cuff.items():
        for part in parts:
            canvas.paint(part, name, only=SOFT)
    canvas.paint(Ellipsoid((-12 * s, 0, -27 * s), (10 * s, 8 * s, 2 * s)), "fluid", only=("fat", "muscle"))
    return {"scale": s, "cuff": cuff, "clavicle": clavicle, "acromion": acromion, "rim_x": rim_x}


def _labrum_mask(rim_x, ry, rz):
    """A triangular ring on the glenoid rim."""

    def mask(x, y, z):
        rho = np.sqrt((y / ry) ** 2 + (z / rz) ** 2)
        depth = np.clip((x - (rim_x - 3.0)) / 6.0, 0, 1)  # thinner towards the joint
        return (rho >= 0.85 + 0.2 * depth) & (rho <= 1.2 - 0.1 * depth) & (x > rim_x - 3.0) & (x < rim_x + 3.5)

    return mask


_BUILDERS = {"knee": _knee, "ankle": _ankle, "shoulder": _shoulder}
JOINTS = tuple(_BUILDERS)

__all__ = ["JOINTS", "JOINT_CLASSES", "KINDS", "SOFT", "Anatomy", "Subject", "TissueTable", "build_anatomy", "tissue_table"]
