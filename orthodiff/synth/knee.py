"""Knee anatomy from the real template (see ``template.py``): soft tissues around it, a per-subject
deformation with flexion, and the ligaments and tendons that the template lacks.

What is shared by every subject is built once per process (``knee_atlas``): the template's bones
with a cortex, continued by tapering shafts, wrapped in skin, subcutaneous fat, muscle, Hoffa's and
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
from .tissues import tissue_table

# Template label -> tissue name (template.TEMPLATE_LABELS gives the labels).
_TEMPLATE_TISSUE = {1: "femoral_cartilage", 2: "tibial_cartilage", 3: "tibial_cartilage", 4: "patellar_cartilage",
                    5: "femur", 6: "tibia", 7: "patella", 8: "fibula", 9: "lateral_meniscus", 10: "medial_meniscus"}
FEMUR_GROUP = ("femur", "femur_cortex", "femoral_cartilage", "patella", "patella_cortex", "patellar_cartilage")
TIBIA_GROUP = ("tibia", "tibia_cortex", "fibula", "fibula_cortex", "tibial_cartilage", "medial_meniscus", "lateral_meniscus")
CORTEX_MM = 1.5
PAD_XY_MM, PAD_BELOW_MM, PAD_ABOVE_MM = 45, 70, 60
# Shafts beyond the template narrow smoothly: by up to SHAFT_TAPER_MM per side, most of it within
# SHAFT_TAPER_LENGTH_MM (the metaphysis running into the diaphysis).
SHAFT_TAPER_MM, SHAFT_TAPER_LENGTH_MM = 3.0, 30.0
SKIN_MM, SUBCUT_MM = 2.0, 7.0
FLUID_FILM_MM = 1.4  # half-thickness of the normal film of fluid in the suprapatellar recess


@dataclass(frozen=True)
class KneeAtlas:
    tissues: np.ndarray          # uint8 tissue ids of the knee table, (x, y, z) on a 1 mm grid
    origin: np.ndarray           # anatomical mm of voxel (0, 0, 0)
    spacing: float
    landmarks: dict              # name -> (3,) template-frame point (mm)
    femur_lut: np.ndarray        # bool per tissue id: belongs to the femur group
    tibia_lut: np.ndarray
    fat: int                     # tissue id of fat


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
    # The notch: its walls where it is open behind the condyles, its roof (Blumensaat's line) along it.
    femoral = (labels == 5) | (labels == 1)
    axes = [origin[a] + spacing * np.arange(labels.shape[a]) for a in range(3)]

    def at(axis, value):
        return int(np.argmin(np.abs(axes[axis] - value)))

    open_x = axes[0][~femoral[:, at(1, -5.0), at(2, 20.0)] & (np.abs(axes[0]) < 20)]
    wall_medial, wall_lateral = float(open_x.min()), float(open_x.max())
    notch_x = (wall_medial + wall_lateral) / 2

    def roof(y):
        column = axes[2][femoral[at(0, notch_x), at(1, y), :]]
        return float(column[column > 5].min())

    lm["notch"] = np.array([notch_x, 4.0, roof(4.0)])
    # Cruciates: the ACL from the back of the lateral wall, high, to the anterior intercondylar area;
    # the PCL from the front of the medial wall, under the roof, bowing back and down to the back of
    # the tibia below the plateau.
    lm["acl_femur"] = np.array([wall_lateral - 2, -8.0, roof(4.0) - 4])
    lm["acl_tibia"] = np.array([notch_x, 14.0, 0.0])
    lm["pcl_femur"] = np.array([wall_medial + 2, 8.0, roof(8.0) - 3])
    lm["pcl_bend"] = np.array([wall_medial + 3, -8.0, 12.0])
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

    template = load_template()
    ids = tissue_table("knee").ids
    labels, spacing = template.labels, template.spacing
    landmarks = _landmarks(labels, template.origin, spacing)

    # The template's bones continued as shafts, then its tissues with a cortex on each bone.
    pad_xy, below, above = (int(round(v / spacing)) for v in (PAD_XY_MM, PAD_BELOW_MM, PAD_ABOVE_MM))
    labels = np.pad(labels, ((pad_xy, pad_xy), (pad_xy, pad_xy), (below, above)))
    for value, step in ((6, -1), (8, -1), (5, 1)):
        _extend_shaft(labels, value, step, spacing)
    origin = template.origin - spacing * np.array([pad_xy, pad_xy, below])
    x, y, z = (origin[a] + spacing * np.arange(labels.shape[a]) for a in range(3))
    inner = np.zeros(labels.shape, np.uint8)
    for value, name in _TEMPLATE_TISSUE.items():
        inner[labels == value] = ids[name]
    for value, bone in ((5, "femur"), (6, "tibia"), (7, "patella"), (8, "fibula")):
        box = tuple(slice(max(int(i.min()) - 2, 0), int(i.max()) + 3) for i in np.nonzero(labels == value))
        inside = labels[box] == value
        # Edge padding along z: a shaft running off the grid gets no cortical lid there.
        depth = distance_transform_edt(np.pad(inside, ((1, 1), (1, 1), (0, 0))), sampling=spacing)[1:-1, 1:-1, :]
        inner[box][inside & (depth <= CORTEX_MM)] = ids[f"{bone}_cortex"]

    tissues = np.full(labels.shape, ids["air"], np.uint8)
    _wrap_in_soft_tissue(tissues, labels, x, y, z, ids, landmarks)
    np.copyto(tissues, inner, where=labels > 0)

    n = len(tissue_table("knee").names)
    femur_lut, tibia_lut = np.zeros(n, bool), np.zeros(n, bool)
    femur_lut[[ids[t] for t in FEMUR_GROUP]] = True
    tibia_lut[[ids[t] for t in TIBIA_GROUP]] = True
    return KneeAtlas(tissues, origin, spacing, landmarks, femur_lut, tibia_lut, ids["fat"])


def _extend_shaft(labels, value: int, step: int, spacing: float) -> None:
    """Continue a bone cut by the template's edge (step -1: downwards, +1: upwards), in place.

    The template's last full cross-section, its corners rounded, is carried along the shaft and
    narrowed smoothly (the metaphysis running into the diaphysis).
    """
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    counts = (labels == value).sum(axis=(0, 1))
    present = np.nonzero(counts)[0]
    end = present[0] if step < 0 else present[-1]
    # The last slice that is not thinned by the cut (partial volume of the source's last slices).
    inward = present[::-step]
    full = counts[inward[:8]].max()
    start = next(int(k) for k in inward if counts[k] >= 0.9 * full)
    section = gaussian_filter((labels[:, :, start] == value).astype(np.float32), 1.5 / spacing) > 0.5
    depth = distance_transform_edt(np.pad(section, 1), sampling=spacing)[1:-1, 1:-1]
    k = start
    while 0 <= k + step < labels.shape[2]:
        k += step
        narrowing = SHAFT_TAPER_MM * (1.0 - np.exp(-abs(k - start) * spacing / SHAFT_TAPER_LENGTH_MM))
        plane = labels[:, :, k]
        if (k - end) * step <= 0:  # the template's own thinned slices
            plane[plane == value] = 0
        plane[(depth > narrowing) & (plane == 0)] = value


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
    _intermuscular_septa(tissues, deep, dx, dy, rho, ry, z, ids["fat"])

    # The fat compartments are ellipsoids, so no straight edge shows in any plane: in front of the
    # joint (no muscle between the skin and the patella, its tendon and the capsule), Hoffa's pad
    # behind the patellar tendon, the popliteal fossa behind the condyles, the prefemoral fat.
    Z = z[None, None, :]
    top, bottom = top_patella + 6.0, -30.0
    zm, hz = (top + bottom) / 2, (top - bottom) / 2
    ry_front = ra[None, None, :]
    front = deep & (((dy - 0.35 * ry_front) / (0.8 * ry_front)) ** 2 + (dx / rx[None, None, :]) ** 2
                    + ((Z - zm) / hz) ** 2 < 1)
    tissues[front] = ids["fat"]
    z_low, z_high = -16.0, lm["patella_inferior"][2] + 6
    hoffa = deep & (((dy - 0.45 * ry_front) / (0.45 * ry_front)) ** 2 + (dx / 24.0) ** 2
                    + ((Z - (z_low + z_high) / 2) / ((z_high - z_low) / 2)) ** 2 < 1)
    tissues[hoffa] = ids["fat_pad"]
    back = (yc - ymin)[None, None, :]
    popliteal = deep & ((dx / 14.0) ** 2 + ((dy + back + 8.0) / 16.0) ** 2 + ((Z - 12.0) / 38.0) ** 2 < 1)
    tissues[popliteal] = ids["fat"]
    anterior_femur = lm["femur_anterior_above_patella"]
    pre = deep & ((dx / 26.0) ** 2 + ((Y - anterior_femur[1] - 1.0) / 7.0) ** 2
                  + ((Z - top_patella - 12.0) / 30.0) ** 2 < 1)
    tissues[pre] = ids["fat"]


# Fat planes between muscle groups, as rays from the limb's axis in each axial slice (degrees from
# lateral towards anterior) over a range of heights (mm): in the thigh between the vasti,
# rectus femoris, sartorius and the hamstrings; in the calf between the gastrocnemius heads and
# around the anterior and lateral compartments. Without them a limb's muscle is one flat block.
_SEPTA = ((35.0, 30.0, 200.0), (140.0, 30.0, 200.0), (-60.0, 35.0, 200.0), (-125.0, 35.0, 200.0),
          (-90.0, -200.0, -15.0), (-20.0, -200.0, -30.0), (60.0, -200.0, -30.0), (-160.0, -200.0, -30.0))
SEPTUM_MM = 0.8


def _intermuscular_septa(tissues, deep, dx, dy, rho, ry, z, fat: int) -> None:
    """Thin fat planes through the muscle over their range of heights; plus, in the calf, the plane
    between gastrocnemius and soleus (an arc behind the tibia)."""
    for degrees, z_low, z_high in _SEPTA:
        k = slice(int(np.searchsorted(z, z_low)), int(np.searchsorted(z, z_high)))
        c, s = np.float32(np.cos(np.deg2rad(degrees))), np.float32(np.sin(np.deg2rad(degrees)))
        ex, ey = dx[:, :, k], dy[:, :, k]
        plane = (np.abs(ex * s - ey * c) < SEPTUM_MM) & (ex * c + ey * s > 0) & deep[:, :, k]
        tissues[:, :, k][plane] = fat
    k = slice(0, int(np.searchsorted(z, -35.0)))
    arc = deep[:, :, k] & (dy[:, :, k] < 0) & (np.abs(rho[:, :, k] - 0.62) * ry[:, :, k] < SEPTUM_MM)
    tissues[:, :, k][arc] = fat


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
    # Where each voxel comes from (femur's transform, in atlas voxels), on a grid 4x coarser: the
    # map is smooth (affine plus a low-frequency warp), so trilinear upsampling loses nothing visible.
    coarse = [np.linspace(axis[0], axis[-1], max(2, (len(axis) + 3) // 4 + 1)) for axis in canvas.axes]
    p = np.stack(np.meshgrid(*coarse, indexing="ij"), -1)
    q = p / pose.scale + np.stack([_warp(pose, a, p[..., 0], p[..., 1], p[..., 2]) for a in range(3)], -1)
    centre = atlas.landmarks["flexion_centre"]
    # Soft tissue follows the femur well above the joint line and the tibia well below it, and a
    # blend of the two across a 40 mm band around the plane that bisects the flexion angle: muscle
    # and fat bend with the knee instead of breaking at a seam.
    bisector = rotation("x", -pose.flexion_deg / 2) @ np.array([0.0, 0.0, 1.0])
    weight = np.clip(0.5 + ((q - centre) @ bisector + centre[2]) / 40.0, 0.0, 1.0)
    channels = np.concatenate([(q - atlas.origin) / atlas.spacing, weight[..., None]], -1)
    field = torch.from_numpy(np.ascontiguousarray(np.moveaxis(channels, -1, 0)[None], dtype=np.float32))
    field = F.interpolate(field, size=canvas.shape, mode="trilinear", align_corners=True)[0].numpy()
    femur_index, weight = list(field[:3]), field[3]
    # The tibia's source is an affine function of the femur's: R^T (q - c) + c, in atlas voxels.
    turn = pose.tibia_rotation().T.astype(np.float32)
    c = ((centre - atlas.origin) / atlas.spacing).astype(np.float32)
    rel = [femur_index[a] - c[a] for a in range(3)]
    tibia_index = [turn[a, 0] * rel[0] + turn[a, 1] * rel[1] + turn[a, 2] * rel[2] + c[a] for a in range(3)]
    del rel
    soft_index = [t + weight * (f - t) for f, t in zip(femur_index, tibia_index)]
    shape = atlas.tissues.shape
    flat_atlas = atlas.tissues.ravel()

    def nearest(index) -> np.ndarray:  # nearest atlas voxel, clamped to its border
        flat = np.zeros(canvas.shape, np.int32)
        for axis in range(3):
            coord = index[axis]
            np.clip(coord, 0, shape[axis] - 1, out=coord)
            coord += 0.5
            flat *= shape[axis]
            flat += coord.astype(np.int32)
        return flat_atlas[flat]

    labels = nearest(soft_index)
    from_femur, from_tibia = nearest(femur_index), nearest(tibia_index)
    # Bones and cartilage come only from their own bone's transform; the blend's copies become fat.
    labels = np.where(atlas.femur_lut[labels] | atlas.tibia_lut[labels], np.uint8(atlas.fat), labels)
    labels = np.where(atlas.tibia_lut[from_tibia], from_tibia, labels)
    labels = np.where(atlas.femur_lut[from_femur], from_femur, labels)
    canvas.labels[...] = labels
    return _draw_soft_structures(canvas, pose, atlas)


def _draw_soft_structures(canvas: Canvas, pose: KneePose, atlas: KneeAtlas) -> dict:
    lm = atlas.landmarks
    s = float(np.mean(pose.scale))

    def at(name, bone, offset=(0.0, 0.0, 0.0)):
        return to_subject(pose, lm[name] + np.asarray(offset), bone, atlas)

    soft = ("air", "fat", "muscle", "fluid", "edema", "fat_pad")
    acl = Capsule(tuple(at("acl_femur", "femur")), tuple(at("acl_tibia", "tibia")), 3.5 * s, (1.0, 1.6, 1.0))
    bend = at("pcl_bend", "femur")
    pcl_top = Capsule(tuple(at("pcl_femur", "femur")), tuple(bend), 4.0 * s)
    pcl = Capsule(tuple(bend), tuple(at("pcl_tibia", "tibia")), 4.0 * s)  # the part a tear is drawn on
    mcl = Capsule(tuple(at("medial_epicondyle", "femur", (-1.5, 0, 0))), tuple(at("mcl_tibia", "tibia", (-1.5, 0, 0))),
                  1.5 * s, (1.0, 5.0, 1.0))
    lcl = Capsule(tuple(at("lateral_epicondyle", "femur", (1.0, -4, -2))), tuple(at("fibular_head", "tibia", (1.0, 0, 0))), 2.3 * s)
    patellar = Capsule(tuple(at("patella_inferior", "femur", (0, 2, 2))), tuple(at("tibial_tuberosity", "tibia", (0, 1, 2))),
                       2.2 * s, (5.0, 1.0, 1.0))
    quad_top = lm["patella_superior"] + np.array([0.0, -8.0, 45.0])
    quadriceps = Capsule(tuple(at("patella_superior", "femur", (0, 0, -3))), tuple(to_subject(pose, quad_top, "femur", atlas)),
                         2.6 * s, (6.0, 1.0, 1.0))
    for name, shape in (("acl", acl), ("pcl", pcl_top), ("pcl", pcl), ("mcl", mcl), ("lcl", lcl), ("patellar_tendon", patellar),
                        ("quadriceps_tendon", quadriceps)):
        canvas.paint(shape, name, only=soft)
    # A thin film of normal joint fluid in the suprapatellar recess.
    pouch = at("femur_anterior_above_patella", "femur", (0, 4, -2))
    canvas.paint(Ellipsoid(tuple(pouch), (18 * s, FLUID_FILM_MM, 10 * s)), "fluid", only=("fat", "muscle"))

    landmarks = {"scale": s, "acl": acl, "pcl": pcl, "mcl": mcl, "lcl": lcl, "pouch": pouch,
                 "tibia_rotation": pose.tibia_rotation(), "flexion_deg": pose.flexion_deg}
    for name in ("lateral_condyle", "medial_condyle", "lateral_condyle_cartilage", "medial_condyle_cartilage",
                 "lateral_epicondyle", "medial_epicondyle", "lateral_condyle_posterior", "medial_condyle_posterior",
                 "patella_centre", "patellar_cartilage"):
        landmarks[name] = at(name, "femur")
    for name in ("lateral_plateau", "medial_plateau", "lateral_plateau_posterior", "medial_plateau_posterior"):
        landmarks[name] = at(name, "tibia")
    landmarks["menisci"] = {name: _meniscus(pose, name, atlas) for name in ("medial_meniscus", "lateral_meniscus")}
    return landmarks


@lru_cache(maxsize=4)
def _meniscus_extent(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Centre and half-extent of one meniscus in the atlas (mm)."""
    atlas = knee_atlas()
    pts = _points(atlas.tissues == tissue_table("knee").ids[name], atlas.origin, atlas.spacing)
    return (pts.min(0) + pts.max(0)) / 2, (pts.max(0) - pts.min(0)) / 2


def _meniscus(pose: KneePose, name: str, atlas: KneeAtlas) -> tuple:
    """A meniscus' centre (subject frame), its in-plane radii (mm) and the tibia's rotation."""
    centre, radii = _meniscus_extent(name)
    return to_subject(pose, centre, "tibia", atlas), radii[:2] * np.mean(pose.scale), pose.tibia_rotation()
