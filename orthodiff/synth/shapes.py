"""Signed-distance primitives and a label canvas that paints them inside their bounding boxes.

Anatomy is drawn in an anatomical frame in millimetres: x lateral, y anterior, z superior, with
the joint centre at the origin. Each shape knows its bounding box, so painting touches only the
voxels near it; that keeps a whole joint under a tenth of a second on one core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class Shape:
    """A solid given by an (approximately) signed distance in mm: negative inside."""

    def bbox(self) -> np.ndarray:  # (2, 3): min corner, max corner
        raise NotImplementedError

    def sdf(self, x, y, z) -> np.ndarray:
        raise NotImplementedError

    def __or__(self, other: Shape) -> Shape:
        return Union(self, other)

    def __sub__(self, other: Shape) -> Shape:
        return Difference(self, other)


def _local(x, y, z, center, rotation):
    """Coordinates relative to ``center`` in the shape's own axes (rows of ``rotation``)."""
    px, py, pz = x - center[0], y - center[1], z - center[2]
    if rotation is None:
        return px, py, pz
    r = rotation
    return (r[0, 0] * px + r[0, 1] * py + r[0, 2] * pz,
            r[1, 0] * px + r[1, 1] * py + r[1, 2] * pz,
            r[2, 0] * px + r[2, 1] * py + r[2, 2] * pz)


def rotation(axis: str, degrees: float) -> np.ndarray:
    """Rotation matrix about x, y or z."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


@dataclass
class Ellipsoid(Shape):
    center: tuple
    radii: tuple
    rot: np.ndarray | None = None  # rows: the ellipsoid's axes in anatomical coordinates

    def bbox(self):
        c, r = np.asarray(self.center, float), np.asarray(self.radii, float)
        reach = r.max() if self.rot is not None else r
        return np.stack([c - reach, c + reach])

    def sdf(self, x, y, z):
        px, py, pz = _local(x, y, z, self.center, self.rot)
        rx, ry, rz = self.radii
        k0 = np.sqrt((px / rx) ** 2 + (py / ry) ** 2 + (pz / rz) ** 2)
        k1 = np.sqrt((px / rx**2) ** 2 + (py / ry**2) ** 2 + (pz / rz**2) ** 2)
        # Quilez's ellipsoid bound: close to the true distance near the surface.
        return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


@dataclass
class Capsule(Shape):
    """A tube of ``radius`` around segment a-b; ``squash`` stretches the cross-section per axis."""

    a: tuple
    b: tuple
    radius: float
    squash: tuple = (1.0, 1.0, 1.0)

    def bbox(self):
        a, b = np.asarray(self.a, float), np.asarray(self.b, float)
        reach = self.radius * np.asarray(self.squash, float)
        return np.stack([np.minimum(a, b) - reach, np.maximum(a, b) + reach])

    def sdf(self, x, y, z):
        s = np.asarray(self.squash, float)
        a, b = np.asarray(self.a, float) / s, np.asarray(self.b, float) / s
        px, py, pz = x / s[0] - a[0], y / s[1] - a[1], z / s[2] - a[2]
        ab = b - a
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
        d = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
        return (d - self.radius) * s.min()

    def point(self, t: float) -> np.ndarray:
        a, b = np.asarray(self.a, float), np.asarray(self.b, float)
        return a + t * (b - a)


@dataclass
class ZCylinder(Shape):
    """An elliptic cylinder along z from z0 to z1 (limbs, shafts): its distance is cheap, mostly 2D."""

    center: tuple  # (x, y)
    radii: tuple   # (rx, ry)
    z0: float
    z1: float

    def bbox(self):
        (cx, cy), (rx, ry) = self.center, self.radii
        return np.asarray([[cx - rx, cy - ry, self.z0], [cx + rx, cy + ry, self.z1]], float)

    def sdf(self, x, y, z):
        (cx, cy), (rx, ry) = self.center, self.radii
        px, py = x - cx, y - cy
        k0 = np.sqrt((px / rx) ** 2 + (py / ry) ** 2)
        k1 = np.sqrt((px / rx**2) ** 2 + (py / ry**2) ** 2)
        flat = k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)
        return np.maximum(flat, np.maximum(self.z0 - z, z - self.z1))


@dataclass
class Box(Shape):
    center: tuple
    half: tuple
    rot: np.ndarray | None = None

    def bbox(self):
        c, h = np.asarray(self.center, float), np.asarray(self.half, float)
        reach = np.linalg.norm(h) if self.rot is not None else h
        return np.stack([c - reach, c + reach])

    def sdf(self, x, y, z):
        px, py, pz = _local(x, y, z, self.center, self.rot)
        qx, qy, qz = np.abs(px) - self.half[0], np.abs(py) - self.half[1], np.abs(pz) - self.half[2]
        outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2 + np.maximum(qz, 0) ** 2)
        inside = np.minimum(np.maximum(np.maximum(qx, qy), qz), 0)
        return outside + inside


class Union(Shape):
    def __init__(self, *parts: Shape):
        self.parts = parts

    def bbox(self):
        boxes = np.stack([p.bbox() for p in self.parts])
        return np.stack([boxes[:, 0].min(0), boxes[:, 1].max(0)])

    def sdf(self, x, y, z):
        d = self.parts[0].sdf(x, y, z)
        for part in self.parts[1:]:
            d = np.minimum(d, part.sdf(x, y, z))
        return d


class Difference(Shape):
    def __init__(self, keep: Shape, remove: Shape):
        self.keep, self.remove = keep, remove

    def bbox(self):
        return self.keep.bbox()

    def sdf(self, x, y, z):
        return np.maximum(self.keep.sdf(x, y, z), -self.remove.sdf(x, y, z))


class Canvas:
    """A uint8 tissue-label volume on an isotropic grid centred on the anatomical origin."""

    def __init__(self, shape: tuple[int, int, int], spacing: float, tissue_ids: dict[str, int]):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = float(spacing)
        self.ids = tissue_ids
        self.labels = np.zeros(self.shape, np.uint8)
        self.axes = [((np.arange(n) - (n - 1) / 2.0) * self.spacing).astype(np.float32) for n in self.shape]

    def index_to_anatomy(self) -> np.ndarray:
        """4x4 affine from voxel index to anatomical mm."""
        affine = np.eye(4)
        affine[:3, :3] *= self.spacing
        affine[:3, 3] = [-(n - 1) / 2.0 * self.spacing for n in self.shape]
        return affine

    def _window(self, bbox: np.ndarray, margin: float):
        slices = []
        for axis, coords in enumerate(self.axes):
            lo = np.searchsorted(coords, bbox[0, axis] - margin)
            hi = np.searchsorted(coords, bbox[1, axis] + margin, side="right")
            slices.append(slice(int(lo), int(max(hi, lo))))
        x = self.axes[0][slices[0]][:, None, None]
        y = self.axes[1][slices[1]][None, :, None]
        z = self.axes[2][slices[2]][None, None, :]
        return tuple(slices), x, y, z

    def paint(self, shape: Shape, tissue: str, *, inside: float = 0.0, band: tuple | None = None,
              only: tuple[str, ...] | None = None, where=None) -> int:
        """Set ``tissue`` where the shape's distance is below ``inside`` (or within ``band``).

        ``only`` limits painting to voxels that currently hold one of those tissues; ``where`` is
        an extra mask function of (x, y, z). Returns the number of voxels painted.
        """
        lo, hi = band if band else (-np.inf, inside)
        return self.paint_layers(shape, [(tissue, lo, hi, only, where)])[0]

    def paint_layers(self, shape: Shape, layers: list[tuple]) -> list[int]:
        """Paint several distance bands of one shape, computing its distance once.

        Each layer is (tissue, lo, hi, only, where); layers are painted in order.
        """
        margin = max(max(layer[2] for layer in layers), 0.0) + self.spacing
        window, x, y, z = self._window(shape.bbox(), margin)
        view = self.labels[window]
        if view.size == 0:
            return [0] * len(layers)
        d = np.broadcast_to(shape.sdf(x, y, z), view.shape)
        painted = []
        for tissue, lo, hi, only, where in layers:
            mask = (d < hi) if lo == -np.inf else (d >= lo) & (d < hi)
            painted.append(self._apply(view, mask, tissue, only, where, x, y, z))
        return painted

    def paint_mask(self, bbox, fn, tissue: str, only: tuple[str, ...] | None = None) -> int:
        """Paint where ``fn(x, y, z)`` is true inside ``bbox`` (for shapes without a distance)."""
        window, x, y, z = self._window(np.asarray(bbox, float), self.spacing)
        view = self.labels[window]
        if view.size == 0:
            return 0
        return self._apply(view, np.broadcast_to(fn(x, y, z), view.shape), tissue, only, None, x, y, z)

    def _apply(self, view, mask, tissue, only, where, x, y, z) -> int:
        if where is not None:
            mask = mask & np.broadcast_to(where(x, y, z), view.shape)
        if only is not None:
            mask = mask & np.isin(view, [self.ids[name] for name in only])
        view[mask] = self.ids[tissue]
        return int(mask.sum())

    def replace(self, old: tuple[str, ...], new: str) -> int:
        """Turn every voxel of the ``old`` tissues into ``new`` (e.g. to move a bone)."""
        mask = np.isin(self.labels, [self.ids[name] for name in old])
        self.labels[mask] = self.ids[new]
        return int(mask.sum())

    def count(self, tissue: str) -> int:
        return int((self.labels == self.ids[tissue]).sum())
