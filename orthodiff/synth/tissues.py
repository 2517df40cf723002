"""The tissues of each joint's anatomy: what the renderer gives an intensity (femur marrow, femur
cortex, femur bone bruise ...), each with its kind and the segmentation class it belongs to (all
three femur tissues are class "femur"; fat, muscle and fluid are background). Shared by the
primitive joints of ``anatomy.py`` and the template knee of ``knee.py``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Tissue kinds: what the renderer knows about a tissue (intensity and texture per site).
KINDS = ("air", "fat", "muscle", "cortex", "marrow", "marrow_edema", "cartilage", "fibrocartilage",
         "ligament", "tendon", "injured", "fluid", "edema", "skin")
SOFT = ("air", "fat", "muscle", "fluid", "edema")  # what bones, cartilage and ligaments may overwrite

JOINT_CLASSES = {
    "knee": ("background", "femur", "tibia", "patella", "fibula", "femoral_cartilage", "tibial_cartilage",
             "patellar_cartilage", "medial_meniscus", "lateral_meniscus", "cruciate_ligaments"),
    "ankle": ("background", "tibia", "fibula", "talus", "calcaneus", "navicular", "talar_cartilage",
              "tibial_cartilage", "atfl", "cfl", "achilles_tendon"),
    "shoulder": ("background", "humerus", "scapula", "acromion", "clavicle", "humeral_cartilage", "labrum",
                 "supraspinatus_tendon", "infraspinatus_tendon", "subscapularis_tendon", "biceps_tendon"),
}

# (tissue, kind, class); bones expand to marrow, cortex and bone-bruise tissues, ligaments and
# tendons to a normal and an injured tissue.
_BONES = {
    "knee": ("femur", "tibia", "patella", "fibula"),
    "ankle": ("tibia", "fibula", "talus", "calcaneus", "navicular"),
    "shoulder": ("humerus", "scapula", "acromion", "clavicle"),
}
_OTHER = {
    "knee": [("femoral_cartilage", "cartilage", "femoral_cartilage"),
             ("tibial_cartilage", "cartilage", "tibial_cartilage"),
             ("patellar_cartilage", "cartilage", "patellar_cartilage"),
             ("medial_meniscus", "fibrocartilage", "medial_meniscus"),
             ("lateral_meniscus", "fibrocartilage", "lateral_meniscus"),
             ("acl", "ligament", "cruciate_ligaments"), ("pcl", "ligament", "cruciate_ligaments"),
             ("mcl", "ligament", "background"), ("lcl", "ligament", "background"),
             ("patellar_tendon", "tendon", "background"), ("quadriceps_tendon", "tendon", "background"),
             ("skin", "skin", "background"), ("fat_pad", "fat", "background")],
    "ankle": [("talar_cartilage", "cartilage", "talar_cartilage"),
              ("tibial_cartilage", "cartilage", "tibial_cartilage"),
              ("atfl", "ligament", "atfl"), ("cfl", "ligament", "cfl"),
              ("achilles_tendon", "tendon", "achilles_tendon"),
              ("peroneal_tendons", "tendon", "background"), ("tibialis_posterior", "tendon", "background")],
    "shoulder": [("humeral_cartilage", "cartilage", "humeral_cartilage"),
                 ("labrum", "fibrocartilage", "labrum"),
                 ("supraspinatus_tendon", "tendon", "supraspinatus_tendon"),
                 ("infraspinatus_tendon", "tendon", "infraspinatus_tendon"),
                 ("subscapularis_tendon", "tendon", "subscapularis_tendon"),
                 ("biceps_tendon", "tendon", "biceps_tendon")],
}


@dataclass(frozen=True)
class TissueTable:
    """Tissue names with their kind and segmentation class, indexed by tissue id."""

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    classes: tuple[int, ...]

    @property
    def ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def class_lut(self) -> np.ndarray:
        return np.asarray(self.classes, np.uint8)

    def kind_index(self) -> np.ndarray:
        return np.asarray([KINDS.index(kind) for kind in self.kinds], np.int64)


def tissue_table(joint: str) -> TissueTable:
    classes = JOINT_CLASSES[joint]
    rows = [(name, name, "background") for name in SOFT]
    for bone in _BONES[joint]:
        rows += [(bone, "marrow", bone), (f"{bone}_cortex", "cortex", bone), (f"{bone}_edema", "marrow_edema", bone)]
    for name, kind, cls in _OTHER[joint]:
        rows.append((name, kind, cls))
        if kind in ("ligament", "tendon"):
            rows.append((f"{name}_injured", "injured", cls))
    return TissueTable(tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(classes.index(r[2]) for r in rows))
