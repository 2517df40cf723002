"""Knee anatomy from the real template (see ``template.py``): soft tissues around it, a per-subject
deformation with flexion, and the ligaments and tendons that the template lacks.

What is shared by every subject is built once per process (``knee_atlas``): the template's bones
with a cortex, padded with straight shafts, wrapped in skin, subcutaneous fat, muscle, Hoffa's and
popliteal fat, and its landmarks. Per subject, each fine-grid voxel is mapped back into the atlas
twice, once with the femur's transform and once with the tibia's (which adds flexion and tibial
rotation about the flexion axis); bones and cartilage of either group win where they land, soft
tissue comes from the femur above the plane that bisects the flexion angle and from the tibia
below it. Ligaments and tendons are then drawn between landmarks carried by their own bone, so a
cruciate ligament spans the notch at any flexion, and the landmarks carried into the subject's
frame tell each abnormality where to go.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .shapes import Canvas, Capsule, Ellipsoid, rotation
from .template import load_template

# Template label -> tissue name (template.TEMPLATE_LABELS gives the labels).
_TEMPLATE_TISSUE = {1: "femoral_cartilage", 2: "tibial_cartilage", 3: "tibial_cartilage", 4: "patellar_cartilage",
                    5: "femur", 6: "tibia", 7: "patella", 8: "fibula", 9: "lateral_meniscus", 10: "medial_meniscus"}
FEMUR_GROUP = ("femur", "femur_cortex", "femoral_cartilage", "patella", "patella_cortex", "patellar_cartilage")
TIBIA_GROUP = ("tibia", "tibia_cortex", "fibula", "fibula_cortex", "tibial_cartilage", "medial_meniscus", "lateral_meniscus")
CORTEX_MM = 1.5
PAD_XY_MM, PAD_BELOW_MM, PAD_ABOVE_MM = 45, 40, 40
SKIN_MM, SUBCUT_MM = 2.0, 7.0


@dataclass(frozen=True)
class KneeAtlas:
    tissues: np.ndarray          # uint8 tissue ids of the knee table, (x, y, z) on a 1 mm grid
    origin: np.ndarray           # anatomical mm of voxel (0, 0, 0)
    spacing: float
    landmarks: dict              # name -> (3,) template-frame point (mm)
    femur_lut: np.ndarray        # bool per tissue id: belongs to the femur group
    tibia_lut: np.ndarray


@dataclass(frozen=True)
class KneePose:
    """One subject's knee: size and shape (per patient), flexion and rotation (per exam)."""

    scale: np.ndarray            # (3,) mm per template mm along x, y, z
    flexion_deg: float           # 0 = straight; the tibia swings posteriorly
    tibial_rotation_deg: float   # + = external rotation of the tibia under the femur
    warp: tuple                  # smooth displacement: ((amplitude (3,), frequency (3,), phase (3,)), ...) per axis

    def tibia_rotation(self) -> np.ndarray:
        """Template tibia directions -> subject directions (flexion about x after rotation about z)."""
        return rotation("x", -self.flexion_deg) @ rotation("z", self.tibial_rotation_deg)


def _points(mask: np.ndarray, origin: np.ndarray, spacing: float) -> np.ndarray:
    return origin + spacing * np.argwhere(mask)


def _landmarks(labels: np.ndarray, origin: np.ndarray, spacing: float) -> dict:
    """Attachment points and surfaces found on the template, in its frame (mm)."""
    femur, tibia = _points(labels == 5, origin, spacing), _points(labels == 6, origin, spacing)
    patella, fibula = _points(labels == 7, origin, spacing), _points(labels == 8, origin, spacing)
    fem_cart = _points(labels == 1, origin, spacing)
    lm = {}
    distal = femur[femur[:, 2] < 25]
    for name, side in (("lateral", 1), ("medial", -1)):
        condyle = distal[side * distal[:, 0] > 6]
        lm[f"{name}_condyle"] = np.array([np.median(condyle[:, 0]), np.median(condyle[:, 1]), condyle[:, 2].min()])
        lm[f"{name}_condyle_posterior"] = np.array([np.median(condyle[:, 0]), condyle[:, 1].min(), np.median(condyle[:, 2])])
        band = femur[np.abs(femur[:, 2] - 28) < 4]
        tip = band[np.argmax(side * band[:, 0])]
        lm[f"{name}_epicondyle"] = tip
        carts = fem_cart[(side * fem_cart[:, 0] > 8) & (fem_cart[:, 1] < 15) & (fem_cart[:, 1] > -5)]
        lm[f"{name}_condyle_cartilage"] = carts[np.argmin(carts[:, 2])]
        plate = _points(labels == (3 if side > 0 else 2), origin, spacing)
        lm[f"{name}_plateau"] = np.array([np.median(plate[:, 0]), np.median(plate[:, 1]), np.percentile(plate[:, 2], 80)])
        lm[f"{name}_plateau_posterior"] = np.array([np.median(plate[:, 0]), plate[:, 1].min() + 4, np.percentile(plate[:, 2], 80)])
    # Flexion axis: through the centres of the posterior condyles' curvature (about 20 mm in).
    post = (lm["lateral_condyle_posterior"] + lm["medial_condyle_posterior"]) / 2
    lm["flexion_centre"] = np.array([0.0, post[1] + 20.0, (lm["lateral_condyle"][2] + lm["medial_condyle"][2]) / 2 + 20.0])
    notch_x = (lm["lateral_condyle"][0] + lm["medial_condyle"][0]) / 2
    lm["notch"] = np.array([notch_x, post[1] + 12, lm["flexion_centre"][2]])
    # Cruciates: ACL from the lateral wall of the notch (posterior, high) to the anterior
    # intercondylar area; PCL from the medial wall (anterior) to the back of the tibia, below the plateau.
    lm["acl_femur"] = np.array([notch_x + 7, post[1] + 8, lm["flexion_centre"][2] - 2])
    lm["acl_tibia"] = np.array([notch_x - 2, 10.0, 0.0])
    lm["pcl_femur"] = np.array([notch_x - 6, post[1] + 26, lm["flexion_centre"][2] - 4])
    rear = tibia[np.abs(tibia[:, 2] + 8) < 2]
    lm["pcl_tibia"] = np.array([notch_x, rear[:, 1].min() + 2, -9.0])
    for name, side, z in (("mcl_tibia", -1, -45.0), ("tibia_lateral", 1, -20.0)):
        ring = tibia[np.abs(tibia[:, 2] - z) < 2]
        lm[name] = ring[np.argmax(side * ring[:, 0])]
    head = fibula[fibula[:, 2] > fibula[:, 2].max() - 6]
    lm["fibular_head"] = np.array([head[:, 0].max(), np.median(head[:, 1]), head[:, 2].max() - 3])
    front = tibia[(tibia[:, 2] < -18) & (tibia[:, 2] > -40)]
    lm["tibial_tuberosity"] = front[np.argmax(front[:, 1])]
    lm["patella_centre"] = patella.mean(0)
    lm["patella_inferior"] = patella[np.argmin(patella[:, 2])]
    lm["patella_superior"] = patella[np.argmax(patella[:, 2])]
    lm["patella_anterior_y"] = np.array([0.0, patella[:, 1].max(), 0.0])
    pat_cart = _points(labels == 4, origin, spacing)
    lm["patellar_cartilage"] = pat_cart.mean(0)
    shaft = femur[np.abs(femur[:, 2] - (lm["patella_superior"][2] + 12)) < 2]
    lm["femur_anterior_above_patella"] = np.array([np.median(shaft[:, 0]), shaft[:, 1].max(), lm["patella_superior"][2] + 12])
    return lm


@lru_cache(maxsize=1)
def knee_atlas() -> KneeAtlas:
    """The template wrapped in soft tissue, as knee tissue ids; built once per process."""
    from scipy.ndimage import distance_transform_edt

    from .anatomy import tissue_table

    template = load_template()
    ids = tissue_table("knee").ids
    labels, spacing = template.labels, template.spacing
    landmarks = _landmarks(labels, template.origin, spacing)

    # Tissues of the template itself, with a cortex on each bone (on the small template grid).
    inner = np.zeros(labels.shape, np.uint8)
    for value, name in _TEMPLATE_TISSUE.items():
        inner[labels == value] = ids[name]
    for value, bone in ((5, "femur"), (6, "tibia"), (7, "patella"), (8, "fibula")):
        box = tuple(slice(max(int(i.min()) - 2, 0), int(i.max()) + 3) for i in np.nonzero(labels == value))
        inside = labels[box] == value
        depth = distance_transform_edt(np.pad(inside, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
        inner[box][inside & (depth <= CORTEX_MM)] = ids[f"{bone}_cortex"]

    pad_xy, below, above = (int(round(v / spacing)) for v in (PAD_XY_MM, PAD_BELOW_MM, PAD_ABOVE_MM))
    # Straight shafts beyond the template: repeat its top and bottom slices.
    widths = ((pad_xy, pad_xy), (pad_xy, pad_xy), (0, 0))
    labels = np.pad(np.pad(labels, ((0, 0), (0, 0), (below, above)), mode="edge"), widths)
    inner = np.pad(np.pad(inner, ((0, 0), (0, 0), (below, above)), mode="edge"), widths)
    origin = template.origin - spacing * np.array([pad_xy, pad_xy, below])
    x, y, z = (origin[a] + spacing * np.arange(labels.shape[a]) for a in range(3))

    tissues = np.full(labels.shape, ids["air"], np.uint8)
    _wrap_in_soft_tissue(tissues, labels, x, y, z, ids, landmarks)
    np.copyto(tissues, inner, where=labels > 0)

    n = len(tissue_table("knee").names)
    femur_lut, tibia_lut = np.zeros(n, bool), np.zeros(n, bool)
    femur_lut[[ids[t] for t in FEMUR_GROUP]] = True
    tibia_lut[[ids[t] for t in TIBIA_GROUP]] = True
    return KneeAtlas(tissues, origin, spacing, landmarks, femur_lut, tibia_lut)


def _wrap_in_soft_tissue(tissues, labels, x, y, z, ids, lm) -> None:
    """Skin, subcutaneous fat, muscle, and the fat of the joint's front and back, slice by slice.

    The limb's outline follows the bones of each axial slice, smoothed along z: thin in front of
    the patella and tibia, thick behind (hamstrings, gastrocnemius) and above the patella (quadriceps).
    """
    from scipy.ndimage import gaussian_filter1d

    bones = labels > 0
    has = bones.any(axis=(0, 1))
    bx, by = bones.any(axis=1), bones.any(axis=0)  # (x, z), (y, z)
    xmin = np.array([x[bx[:, k]].min() if has[k] else np.nan for k in range(len(z))])
    xmax = np.array([x[bx[:, k]].max() if has[k] else np.nan for k in range(len(z))])
    ymin = np.array([y[by[:, k]].min() if has[k] else np.nan for k in range(len(z))])
    ymax = np.array([y[by[:, k]].max() if has[k] else np.nan for k in range(len(z))])
    keep = ~np.isnan(xmin)
    outline = []
    for values in (xmin, xmax, ymin, ymax):
        filled = np.interp(z, z[keep], values[keep])
        outline.append(gaussian_filter1d(filled, 6.0, mode="nearest"))
    xmin, xmax, ymin, ymax = outline
    top_patella = lm["patella_superior"][2]
    quad = np.clip((z - top_patella + 5) / 35.0, 0, 1)        # quadriceps bulk above the patella
    calf = np.clip((-z - 30) / 40.0, 0, 1)                     # calf muscles below the tuberosity
    ant = 7.0 + 30.0 * quad + 4.0 * calf
    post = 38.0 + 6.0 * quad + 10.0 * calf
    side = 14.0 + 10.0 * quad + 6.0 * calf
    xc, yc = (xmin + xmax) / 2, (ymin + ymax) / 2
    rx = (xmax - xmin) / 2 + side
    ra, rp = ymax - yc + ant, yc - ymin + post

    x, y, z = (v.astype(np.float32) for v in (x, y, z))
    xc, yc, rx, ra, rp = (v.astype(np.float32) for v in (xc, yc, rx, ra, rp))
    X, Y = x[:, None, None], y[None, :, None]
    dx = X - xc[None, None, :]
    dy = Y - yc[None, None, :]
    ry = np.where(dy > 0, ra[None, None, :], rp[None, None, :])
    rho = np.sqrt((dx / rx[None, None, :]) ** 2 + (dy / ry) ** 2)
    radius = np.where(np.abs(dx) / rx[None, None, :] > np.abs(dy) / ry, rx[None, None, :], ry)
    depth = (1.0 - rho) * radius
    limb = rho <= 1.0
    tissues[limb] = ids["skin"]
    tissues[limb & (depth > SKIN_MM)] = ids["fat"]
    deep = limb & (depth > SKIN_MM + SUBCUT_MM)
    tissues[deep] = ids["muscle"]

    Z = z[None, None, :]
    bend = 0.015 * dx * dx  # rounded, not boxed, compartments
    joint = (Z > -28 + bend) & (Z < top_patella + 4 - bend)
    front = dy > 0
    tissues[deep & joint & front] = ids["fat"]
    hoffa = deep & front & (Z > -14) & (Z < lm["patella_inferior"][2] + 6) & (np.abs(dx) < 24)
    tissues[hoffa] = ids["fat_pad"]
    popliteal = deep & ~front & ((dx / 15.0) ** 2 + ((Z - 12.0) / 42.0) ** 2 < 1) & (dy > -(yc - ymin)[None, None, :] - 24)
    tissues[popliteal] = ids["fat"]
    # Prefemoral fat: a thin layer on the front of the femur above the trochlea.
    pre = deep & front & (Z > top_patella - 15) & (Z < top_patella + 45) & (Y < lm["femur_anterior_above_patella"][1] + 7)
    tissues[pre] = ids["fat"]


def sample_knee_pose(anatomy_rng: np.random.Generator, exam_rng: np.random.Generator, size: float) -> KneePose:
    """Size and shape come from the patient, flexion and tibial rotation from the exam.

    The ranges are documented in the README ("Synthetic archives").
    """
    aniso = np.clip(anatomy_rng.normal(1.0, 0.04, 3), 0.92, 1.08)
    warp = tuple((anatomy_rng.uniform(-2.5, 2.5, 3), anatomy_rng.uniform(0.015, 0.035, 3) * 2 * np.pi,
                  anatomy_rng.uniform(0, 2 * np.pi, 3)) for _ in range(3))
    flexion = float(exam_rng.uniform(0.0, 30.0))
    tibial = float(exam_rng.uniform(-8.0, 8.0))
    return KneePose(size * aniso, flexion, tibial, warp)


def _warp(pose: KneePose, axis: int, x, y, z):
    """Smooth displacement (mm) along ``axis`` at subject points: a product of low-frequency cosines."""
    amplitude, frequency, phase = pose.warp[axis]
    out = 0.0
    for k in range(3):  # three separable terms, each a cosine in x, y and z
        i, j = (k + 1) % 3, (k + 2) % 3
        coords = (x, y, z)
        out = out + amplitude[k] * np.cos(frequency[k] * coords[k] + phase[k]) * np.cos(0.5 * frequency[i] * coords[i]) \
            * np.cos(0.5 * frequency[j] * coords[j])
    return out


def to_subject(pose: KneePose, point, bone: str, atlas: KneeAtlas) -> np.ndarray:
    """A template point carried by ``bone`` ('femur' or 'tibia') into the subject's frame."""
    q = np.asarray(point, float)
    if bone == "tibia":
        centre = atlas.landmarks["flexion_centre"]
        q = pose.tibia_rotation() @ (q - centre) + centre
    p = pose.scale * q
    for _ in range(4):  # invert q = p / scale + warp(p) by fixed-point iteration
        p = pose.scale * (q - np.array([_warp(pose, a, *p) for a in range(3)]))
    return p


def paint_knee(canvas: Canvas, pose: KneePose) -> dict:
    """Fill the canvas with the deformed atlas, draw ligaments and tendons; return subject-frame landmarks."""
    import torch
    import torch.nn.functional as F

    atlas = knee_atlas()
    # Where each voxel comes from, for both bones, on a grid 4x coarser: the map is smooth (affine
    # plus a low-frequency warp), so trilinear upsampling of coordinates loses nothing visible.
    coarse = [np.linspace(axis[0], axis[-1], max(2, (len(axis) + 3) // 4 + 1)) for axis in canvas.axes]
    p = np.stack(np.meshgrid(*coarse, indexing="ij"), -1)
    q = p / pose.scale + np.stack([_warp(pose, a, p[..., 0], p[..., 1], p[..., 2]) for a in range(3)], -1)
    centre = atlas.landmarks["flexion_centre"]
    qt = (q - centre) @ pose.tibia_rotation() + centre  # row vectors: R^T (q - c) + c
    # Soft tissue: the femur's above a plane through the joint line that bisects the flexion angle.
    bisector = rotation("x", -pose.flexion_deg / 2) @ np.array([0.0, 0.0, 1.0])
    side = (q - centre) @ bisector + centre[2]
    index = [(points - atlas.origin) / atlas.spacing for points in (q, qt)]  # atlas voxel units
    channels = np.concatenate([index[0], index[1], side[..., None]], -1)
    field = torch.from_numpy(np.ascontiguousarray(np.moveaxis(channels, -1, 0)[None], dtype=np.float32))
    field = F.interpolate(field, size=canvas.shape, mode="trilinear", align_corners=True)[0].numpy()
    shape = atlas.tissues.shape
    flat_atlas = atlas.tissues.ravel()

    def nearest(first: int) -> np.ndarray:  # nearest atlas voxel, clamped to its border
        flat = np.zeros(canvas.shape, np.int32)
        for axis in range(3):
            coord = field[first + axis]
            np.clip(coord, 0, shape[axis] - 1, out=coord)
            flat *= shape[axis]
            flat += (coord + 0.5).astype(np.int32)
        return flat_atlas[flat]

    from_femur, from_tibia = nearest(0), nearest(3)
    above = field[6] > 0
    labels = np.where(above, from_femur, from_tibia)
    labels = np.where(atlas.tibia_lut[from_tibia], from_tibia, labels)
    labels = np.where(atlas.femur_lut[from_femur], from_femur, labels)
    canvas.labels[...] = labels
    return _draw_soft_structures(canvas, pose, atlas)


def _axes(canvas: Canvas):
    x, y, z = canvas.axes
    return x[:, None, None], y[None, :, None], z[None, None, :]


def _draw_soft_structures(canvas: Canvas, pose: KneePose, atlas: KneeAtlas) -> dict:
    lm = atlas.landmarks
    s = float(np.mean(pose.scale))

    def at(name, bone, offset=(0.0, 0.0, 0.0)):
        return to_subject(pose, lm[name] + np.asarray(offset), bone, atlas)

    soft = ("air", "fat", "muscle", "fluid", "edema", "fat_pad")
    acl = Capsule(tuple(at("acl_femur", "femur")), tuple(at("acl_tibia", "tibia")), 3.5 * s, (1.0, 1.6, 1.0))
    pcl = Capsule(tuple(at("pcl_femur", "femur")), tuple(at("pcl_tibia", "tibia")), 4.5 * s)
    mcl = Capsule(tuple(at("medial_epicondyle", "femur", (-1.5, 0, 0))), tuple(at("mcl_tibia", "tibia", (-1.5, 0, 0))),
                  1.5 * s, (1.0, 5.0, 1.0))
    lcl = Capsule(tuple(at("lateral_epicondyle", "femur", (1.0, -4, -2))), tuple(at("fibular_head", "tibia", (1.0, 0, 0))), 2.3 * s)
    patellar = Capsule(tuple(at("patella_inferior", "femur", (0, 2, 2))), tuple(at("tibial_tuberosity", "tibia", (0, 1, 2))),
                       2.2 * s, (5.0, 1.0, 1.0))
    quad_top = lm["patella_superior"] + np.array([0.0, -8.0, 45.0])
    quadriceps = Capsule(tuple(at("patella_superior", "femur", (0, 0, -3))), tuple(to_subject(pose, quad_top, "femur", atlas)),
                         2.6 * s, (6.0, 1.0, 1.0))
    for name, shape in (("acl", acl), ("pcl", pcl), ("mcl", mcl), ("lcl", lcl), ("patellar_tendon", patellar),
                        ("quadriceps_tendon", quadriceps)):
        canvas.paint(shape, name, only=soft)
    # A thin film of normal joint fluid in the suprapatellar recess.
    pouch = at("femur_anterior_above_patella", "femur", (0, 4, -2))
    canvas.paint(Ellipsoid(tuple(pouch), (18 * s, 1.4, 10 * s)), "fluid", only=("fat", "muscle"))

    landmarks = {"scale": s, "acl": acl, "pcl": pcl, "mcl": mcl, "lcl": lcl, "pouch": pouch,
                 "tibia_rotation": pose.tibia_rotation(), "flexion_deg": pose.flexion_deg}
    for name in ("lateral_condyle", "medial_condyle", "lateral_condyle_cartilage", "medial_condyle_cartilage",
                 "lateral_epicondyle", "medial_epicondyle", "lateral_condyle_posterior", "medial_condyle_posterior",
                 "patella_centre", "patellar_cartilage"):
        landmarks[name] = at(name, "femur")
    for name in ("lateral_plateau", "medial_plateau", "lateral_plateau_posterior", "medial_plateau_posterior"):
        landmarks[name] = at(name, "tibia")
    landmarks["menisci"] = {name: _meniscus(canvas, pose, name, atlas) for name in ("medial_meniscus", "lateral_meniscus")}
    return landmarks


@lru_cache(maxsize=4)
def _meniscus_extent(name: str) -> tuple:
    atlas = knee_atlas()
    from .anatomy import tissue_table

    pts = _points(atlas.tissues == tissue_table("knee").ids[name], atlas.origin, atlas.spacing)
    centre = (pts.min(0) + pts.max(0)) / 2
    radii = (pts.max(0) - pts.min(0)) / 2
    return centre, radii, float(pts[:, 2].min())


def _meniscus(canvas, pose, name, atlas) -> tuple:
    """A meniscus' centre (subject frame), its in-plane radii (mm) and the tibia's rotation."""
    centre, radii, _ = _meniscus_extent(name)
    return to_subject(pose, centre, "tibia", atlas), radii[:2] * np.mean(pose.scale), pose.tibia_rotation()
