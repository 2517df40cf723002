"""Abnormalities: each label edits the painted anatomy locally.

Every edit is local, uses its own random stream, and paints only over the tissues it should
change, so the same subject can be rendered with and without a label and differ only there.
Where each is seen best (as in real MRI) follows from its geometry: the cruciates run along the
sagittal plane, collateral ligaments lie in the coronal plane, effusion fills the suprapatellar
recess (sagittal) and its side recesses (axial). The knee's lesions, drawn as MRI shows them at
their real sizes, are in ``knee_lesions.py``; the ankle's and shoulder's are drawn here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import knee_lesions
from .anatomy import Anatomy
from .shapes import Capsule, Ellipsoid

Edit = Callable[[Anatomy, np.random.Generator], "str | None"]
SOFT_ONLY = ("fat", "muscle")


def _ligament_gap(anatomy: Anatomy, rng, lig: Capsule, name: str, widen: float = 1.6) -> None:
    """A torn ligament: thickened, bright stumps and a fluid-filled gap in mid-substance."""
    canvas = anatomy.canvas
    t0 = rng.uniform(0.35, 0.65)
    half = rng.uniform(0.1, 0.16)
    stump = Capsule(lig.a, lig.b, lig.radius * 1.35, lig.squash)
    canvas.paint(stump, f"{name}_injured", only=(name, "fat", "fluid"))
    gap = Capsule(tuple(lig.point(t0 - half)), tuple(lig.point(t0 + half)), lig.radius * widen, lig.squash)
    canvas.paint(gap, "edema", only=(name, f"{name}_injured", "fat"))


def _bone_bruise(anatomy: Anatomy, bone: str, centre, radii) -> None:
    anatomy.canvas.paint(Ellipsoid(tuple(centre), tuple(radii)), f"{bone}_edema", only=(bone,))


# -------------------------------------------------------------------------------------------- ankle
def _atfl_tear(anatomy, rng):
    lig = anatomy.landmarks["atfl"]
    anatomy.canvas.paint(Capsule(lig.a, lig.b, lig.radius * 2.0, lig.squash), "edema", only=SOFT_ONLY)
    _ligament_gap(anatomy, rng, lig, "atfl", widen=1.6)


def _cfl_tear(anatomy, rng):
    lig = anatomy.landmarks["cfl"]
    anatomy.canvas.paint(Capsule(lig.a, lig.b, lig.radius * 1.9, lig.squash), "edema", only=SOFT_ONLY)
    _ligament_gap(anatomy, rng, lig, "cfl", widen=1.5)


def _achilles_rupture(anatomy, rng):
    tendon, canvas = anatomy.landmarks["achilles"], anatomy.canvas
    # Rupture 2-6 cm above the insertion: frayed, thick stumps and a fluid gap.
    t0 = 1.0 - rng.uniform(40, 60) / 128.0
    canvas.paint(Capsule(tuple(tendon.point(t0 - 0.2)), tuple(tendon.point(min(t0 + 0.2, 1.0))), tendon.radius * 1.5, tendon.squash),
                 "achilles_tendon_injured", only=("achilles_tendon", "fat"))
    canvas.paint(Capsule(tuple(tendon.point(t0 - 0.05)), tuple(tendon.point(t0 + 0.05)), tendon.radius * 1.7, tendon.squash),
                 "fluid", only=("achilles_tendon", "achilles_tendon_injured", "fat"))


def _talar_osteochondral_lesion(anatomy, rng):
    s, canvas = anatomy.landmarks["scale"], anatomy.canvas
    side = rng.choice([-1, 1])
    centre = (side * 9 * s, rng.uniform(-2, 8) * s, -3 * s)
    canvas.paint(Ellipsoid(centre, (6 * s, 7 * s, 6 * s)), "talus_edema", only=("talus",))
    canvas.paint(Ellipsoid(centre, (4 * s, 5 * s, 4 * s)), "fluid", band=(-1.2, 0.0), only=("talus_edema", "talus_cortex"))
    canvas.paint(Ellipsoid((centre[0], centre[1], 0.5), (4 * s, 5 * s, 2 * s)), "fluid", only=("talar_cartilage",))


# ----------------------------------------------------------------------------------------- shoulder
def _cuff_tear(name: str, part: int, lo: float, hi: float) -> Edit:
    def edit(anatomy, rng):
        seg = anatomy.landmarks["cuff"][name][part]
        t0 = rng.uniform(lo, hi)
        half = rng.uniform(0.08, 0.15)
        anatomy.canvas.paint(Capsule(seg.a, seg.b, seg.radius * 1.3, seg.squash), f"{name}_injured", only=(name,))
        anatomy.canvas.paint(Capsule(tuple(seg.point(t0 - half)), tuple(seg.point(t0 + half)), seg.radius * 1.3, seg.squash),
                             "fluid", only=(name, f"{name}_injured", "fat", "muscle"))
    return edit


def _biceps_injury(anatomy, rng):
    canvas, groove = anatomy.canvas, anatomy.landmarks["cuff"]["biceps_tendon"][0]
    canvas.paint(Capsule(groove.a, groove.b, groove.radius * 2.0), "fluid", only=SOFT_ONLY)  # sheath fluid
    canvas.paint(Capsule(groove.a, groove.b, groove.radius * 1.5), "biceps_tendon_injured", only=("biceps_tendon", "fluid"))


def _ac_joint_injury(anatomy, rng):
    s, canvas, clavicle = anatomy.landmarks["scale"], anatomy.canvas, anatomy.landmarks["clavicle"]
    lift = rng.uniform(3, 7) * s
    canvas.replace(("clavicle", "clavicle_cortex", "clavicle_edema"), "fat")
    raised = Capsule((clavicle.a[0] - 2 * s, clavicle.a[1], clavicle.a[2] + lift), (clavicle.b[0], clavicle.b[1], clavicle.b[2] + lift / 3),
                     clavicle.radius)
    canvas.paint_layers(raised, [("clavicle_cortex", -np.inf, 0.0, ("fat", "muscle", "air", "fluid", "edema"), None),
                                 ("clavicle", -np.inf, -1.4, ("clavicle_cortex",), None)])
    canvas.paint(Ellipsoid((-24 * s, 4 * s, 40 * s), (8 * s, 9 * s, 8 * s)), "edema", only=SOFT_ONLY)
    _bone_bruise(anatomy, "clavicle", raised.point(0.0), (10 * s, 8 * s, 8 * s))


def _glenohumeral_effusion(anatomy, rng):
    s, canvas = anatomy.landmarks["scale"], anatomy.canvas
    grade = rng.uniform(0.8, 1.3)
    canvas.paint(Ellipsoid((-10 * s, 0, -27 * s), (16 * s, 14 * s, 5 * s * grade)), "fluid", only=SOFT_ONLY)  # axillary
    canvas.paint(Ellipsoid((-18 * s, -22 * s, 0), (8 * s, 4 * s * grade, 14 * s)), "fluid", only=SOFT_ONLY)  # posterior
    canvas.paint(Ellipsoid((-18 * s, 22 * s, 0), (8 * s, 4 * s * grade, 14 * s)), "fluid", only=SOFT_ONLY)  # anterior


def _subacromial_bursitis(anatomy, rng):
    s, canvas = anatomy.landmarks["scale"], anatomy.canvas
    thick = rng.uniform(1.5, 3.0) * s
    canvas.paint(Ellipsoid((6 * s, -2 * s, 32.5 * s), (24 * s, 18 * s, thick)), "fluid", only=SOFT_ONLY)
    canvas.paint(Ellipsoid((24 * s, 0, 20 * s), (thick, 16 * s, 12 * s)), "fluid", only=SOFT_ONLY)  # under the deltoid


# Label order per joint is the order of the CSV columns.
EDITS: dict[str, dict[str, Edit]] = {
    "knee": {
        "acl_tear": knee_lesions.acl_tear,
        "pcl_tear": knee_lesions.pcl_tear,
        "medial_meniscal_tear": knee_lesions.meniscal_tear("medial_meniscus"),
        "lateral_meniscal_tear": knee_lesions.meniscal_tear("lateral_meniscus"),
        "mcl_injury": knee_lesions.collateral_injury("mcl"),
        "lcl_injury": knee_lesions.collateral_injury("lcl"),
        "cartilage_defect": knee_lesions.cartilage_defect,
        "joint_effusion": knee_lesions.joint_effusion,
    },
    "ankle": {
        "atfl_tear": _atfl_tear,
        "cfl_tear": _cfl_tear,
        "achilles_rupture": _achilles_rupture,
        "talar_osteochondral_lesion": _talar_osteochondral_lesion,
    },
    "shoulder": {
        "supraspinatus_tear": _cuff_tear("supraspinatus_tendon", 1, 0.45, 0.8),
        "infraspinatus_tear": _cuff_tear("infraspinatus_tendon", 1, 0.4, 0.8),
        "subscapularis_tear": _cuff_tear("subscapularis_tendon", 1, 0.3, 0.7),
        "biceps_long_head_injury": _biceps_injury,
        "ac_joint_injury": _ac_joint_injury,
        "glenohumeral_effusion": _glenohumeral_effusion,
        "subacromial_bursitis": _subacromial_bursitis,
    },
}
JOINT_LABELS = {joint: tuple(edits) for joint, edits in EDITS.items()}


def apply_abnormalities(anatomy: Anatomy, labels: dict[str, int], seed: tuple[int, ...]) -> None:
    """Apply each present label's edit with its own random stream, keyed by the label's index; what an
    edit says it drew (kind, grade, site) goes to ``anatomy.findings``."""
    for index, (name, edit) in enumerate(EDITS[anatomy.joint].items()):
        if labels.get(name):
            finding = edit(anatomy, np.random.default_rng([*seed, 7000 + index]))
            anatomy.findings[name] = finding or name.replace("_", " ")
