"""``orthodiff prepare``: every manifest series -> a plane tensor (1, D, H, W), cached on disk.

Orientation convention of a plane tensor (d, h, w): d runs across slices, h down the rows and
w along the columns of an image shown with ``imshow(tensor[0, d])``, as a radiologist reads it:

=========  ==================  =================  ==================  ========
plane      d (slices) toward   h (rows) toward    w (columns) toward  axcodes
=========  ==================  =================  ==================  ========
sagittal   patient right       inferior           posterior           RIP
coronal    anterior            inferior           patient left        AIL
axial      superior            posterior          patient left        SPL
=========  ==================  =================  ==================  ========

So the first row is superior (sagittal, coronal) or anterior (axial), the first column is
anterior (sagittal) or the patient's right (coronal, axial). Reorientation only permutes and
flips voxel axes (MONAI ``Orientation``); in-plane is then resized to H x W, slices are cropped
or padded around the centre to D (optionally resampled first to ``slice_spacing`` mm), and image
intensities are scaled from the 0.5th-99.5th percentiles to [-1, 1] and clipped. With
``slab="fit"`` the slices are instead resampled so the whole acquired slab becomes D slices.

``field_of_view_mm`` (``data.field_of_view_mm``) first crops each series to a physical field of view
(d, h, w) mm centred on the joint: on the series' centre, where technologists centre the joint, or on
a manifest's ``joint_centre_ras`` column (RAS mm). The crop happens on the source voxel grid with
MONAI ``SpatialCrop``, so the plane tensor's affine keeps it and outputs map back to the source grid;
the cache records the box (source voxel indices) and the cropped affine.

Each cached series records the size, modification time and a hash of every byte of its source
(``source_stamp``); a rerun prepares again any series whose source changed, and says so, and any
whose tensor file is incomplete. A series that fails where it once succeeded loses its old tensor
and record, so no later stage reads them. Each record also holds the sha256 of its tensor file
(``image_sha256``, a column of the index): feature stores record it to notice a tensor prepared again.
One run at a time writes a cache folder: a second run waits for the first (``orthodiff.locks``).
"""

from __future__ import annotations

import json
import numbers
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OrthodiffError, ScanError
from ..fileio import (
    atomic_path,
    disk_full_errno,
    npy_is_complete,
    read_json,
    safe_filename,
    sha256_file,
    write_json,
    write_table,
)
from ..io.volume import Volume
from ..locks import exclusive
from ..planes import PLANES, check_plane
from .fingerprint import data_fingerprint
from .source_stamp import comparable, source_stamp
from .workers import one_thread_worker

CACHE_FORMAT_VERSION = 1
PLANE_AXCODES = {"sagittal": "RIP", "coronal": "AIL", "axial": "SPL"}
# The RAS world axis that the slice normal of each plane follows (x: L-R, y: P-A, z: I-S).
_SLICE_WORLD_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
_WORLD_AXIS_NAME = ("left-right", "posterior-anterior", "inferior-superior")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # the affines are voxel -> RAS
MIN_SLICES = 3
MIN_IN_PLANE = 16
INTENSITY_PERCENTILES = (0.5, 99.5)
INDEX_FLUSH_EVERY = 200  # rewrite index.parquet this often, so an interrupted run keeps its progress
ERROR_COLUMNS = ["series_id", "path", "reason"]
SLABS = ("crop", "fit")
CENTRE_COLUMN = "joint_centre_ras"  # optional manifest column: the joint's centre "x,y,z" in RAS mm
_RAS_AXIS_OF_CODE = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


# --------------------------------------------------------------------------- pure transforms


def check_plane_size(plane_size: dict, planes=PLANES, source: str = "data.plane_size") -> dict:
    """``{plane: (D, H, W)}`` with positive ints; every plane in ``planes`` must have one."""
    if not hasattr(plane_size, "items"):
        raise OrthodiffError(f"{source}: expected a mapping plane -> [D, H, W], got {plane_size!r}")
    for plane in planes:
        if plane not in plane_size:
            raise OrthodiffError(f"{source}: no size for plane {plane!r}; give {source}.{plane}=[D,H,W]")
    checked = {}
    for plane, size in plane_size.items():
        check_plane(plane, f"{source} key")
        checked[plane] = _check_size(size, f"{source}.{plane}")
    return checked


def _check_size(size, source: str) -> tuple[int, int, int]:
    from ..config import check_plane_size_entry

    return check_plane_size_entry(size, source)


def check_field_of_view(field_of_view, source: str = "data.field_of_view_mm") -> dict:
    """``{plane: (d, h, w)}`` in mm, each a positive number or None (that axis whole); None or an
    empty mapping means no crop. Planes not named keep their whole field of view."""
    if field_of_view is None:
        return {}
    if not hasattr(field_of_view, "items"):
        raise OrthodiffError(
            f"{source}: expected a mapping plane -> [D, H, W] mm, got {field_of_view!r}; e.g. {source}.sagittal=[null,100,100]"
        )
    checked = {}
    for plane, extent in field_of_view.items():
        check_plane(plane, f"{source} key")
        if extent is not None:
            checked[plane] = _check_extent(extent, f"{source}.{plane}")
    return checked


def _check_extent(extent, source: str) -> tuple:
    wrong = OrthodiffError(
        f"{source}: expected [D, H, W] in mm, each a positive number or null (keep that axis whole), got {extent!r}; "
        f"e.g. {source}=[null,100,100]"
    )
    if isinstance(extent, (str, bytes)) or not hasattr(extent, "__len__") or len(extent) != 3:
        raise wrong
    values = []
    for value in extent:
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise wrong
        if value is not None and not (np.isfinite(value) and value > 0):
            raise wrong
        values.append(None if value is None else float(value))
    return tuple(values)


def field_of_view_box(shape, affine, plane: str, extent_mm, centre_ras=None) -> tuple[tuple, tuple]:
    """The crop of ``extent_mm`` (d, h, w of the plane tensor, mm; None keeps an axis whole) as
    ``(start, end)`` source voxel indices, end exclusive, one per source voxel axis.

    Centred on the series' centre, or on ``centre_ras`` (RAS mm). Near the series' edge the box
    shifts inward so it keeps its physical size; an extent wider than the series keeps that axis whole.
    """
    import nibabel.orientations as nio

    shape = tuple(int(n) for n in shape[:3])
    affine = np.asarray(affine, dtype=np.float64)
    world_axis_of_voxel_axis = nio.io_orientation(affine)[:, 0]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    centre = (np.asarray(shape) - 1) / 2.0
    if centre_ras is not None:
        centre = (np.linalg.inv(affine) @ np.append(np.asarray(centre_ras, dtype=np.float64), 1.0))[:3]
        if np.any(centre < -0.5) or np.any(centre > np.asarray(shape) - 0.5):
            raise ScanError(
                f"the joint centre {list(np.round(centre_ras, 1))} (RAS mm) lies outside the series; "
                f"fix the manifest's {CENTRE_COLUMN} column"
            )
    start, end = [0, 0, 0], list(shape)
    for millimetres, code in zip(extent_mm, PLANE_AXCODES[plane]):
        if millimetres is None:
            continue
        axis = int(np.flatnonzero(world_axis_of_voxel_axis == _RAS_AXIS_OF_CODE[code])[0])
        count = min(shape[axis], max(1, int(np.floor(millimetres / spacing[axis] + 0.5))))
        first = int(np.floor(centre[axis] - (count - 1) / 2.0 + 0.5))
        start[axis] = min(max(first, 0), shape[axis] - count)
        end[axis] = start[axis] + count
    return tuple(start), tuple(end)


def cropped_affine(source_affine, crop_start) -> np.ndarray:
    """The affine of the cropped grid: its voxel 0 is source voxel ``crop_start``."""
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(crop_start, dtype=np.float64)
    return np.asarray(source_affine, dtype=np.float64) @ shift


def joint_centre(row) -> tuple | None:
    """The manifest row's joint centre (RAS mm) from ``joint_centre_ras`` ("x,y,z"); None when absent."""
    value = row.get(CENTRE_COLUMN) if hasattr(row, "get") else None
    if value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip()):
        return None
    try:
        parts = value.replace(",", " ").split() if isinstance(value, str) else list(value)
        centre = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        centre = ()
    if len(centre) != 3 or not np.all(np.isfinite(centre)):
        raise ScanError(f"manifest column {CENTRE_COLUMN}={value!r}: expected the joint centre as \"x,y,z\" in RAS mm")
    return centre


def _check_volume(array: np.ndarray, affine: np.ndarray, plane: str, is_label: bool) -> None:
    """Raise ScanError with one reason when the volume cannot make a meaningful plane tensor."""
    if array.ndim != 3:
        raise ScanError(f"volume has {array.ndim} dimensions {array.shape}; expected a 3D series")
    rows, cols, slices = array.shape
    if slices < MIN_SLICES:
        raise ScanError(
            f"only {slices} slice(s); a plane tensor needs at least {MIN_SLICES} (a 2D image or localizer?)"
        )
    if min(rows, cols) < MIN_IN_PLANE:
        raise ScanError(
            f"in-plane size {rows} x {cols} is below {MIN_IN_PLANE} x {MIN_IN_PLANE} pixels; not a usable series"
        )
    finite = np.isfinite(array)
    if not finite.all():
        raise ScanError(f"{int(array.size - finite.sum())} NaN/Inf voxels; the file is damaged or badly converted")
    if is_label:
        if array.min() < 0 or array.max() > 255 or not np.array_equal(array, np.rint(array)):
            raise ScanError("segmentation holds values that are not integer labels 0..255")
    elif array.min() == array.max():
        raise ScanError(f"constant image (every voxel is {float(array.flat[0]):g}); nothing to learn from it")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ScanError("the affine (voxel -> RAS) is degenerate; the file carries no usable geometry")
    import nibabel.orientations as nio

    slice_axis = int(nio.io_orientation(affine)[2, 0])
    if slice_axis != _SLICE_WORLD_AXIS[plane]:
        raise ScanError(
            f"slices run {_WORLD_AXIS_NAME[slice_axis]} by the file's geometry, which is not a {plane} series; "
            "fix the manifest's plane column or the file's affine"
        )


def to_plane_tensor(
    volume: Volume,
    plane: str,
    size,
    is_label: bool = False,
    slice_spacing: float | None = None,
    slab: str = "crop",
    field_of_view_mm=None,
    centre_ras=None,
) -> tuple[np.ndarray, np.ndarray]:
    """A series as a plane tensor (1, D, H, W) and its affine (tensor voxel (d, h, w) -> RAS mm).

    Images come back float32 in [-1, 1]; labels uint8 (nearest neighbour). ``slice_spacing`` (mm),
    when given, first resamples the slice axis to that thickness (useful for thin-slice 3D scans);
    without it the source slices are kept and cropped or padded around the centre to D.
    ``slab="fit"`` resamples across slices instead, so the whole slab becomes D slices and
    nothing at its edges is cut off. ``field_of_view_mm`` (d, h, w) first crops the series to that
    physical field of view around its centre or ``centre_ras`` (see ``field_of_view_box``).
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import (
        CenterSpatialCrop,
        Orientation,
        Resize,
        ScaleIntensityRange,
        SpatialCrop,
        SpatialPad,
    )

    check_plane(plane)
    depth, height, width = _check_size(size, "plane size")
    array = np.asarray(volume.array)
    if array.ndim == 4 and array.shape[3] == 1:  # NIfTI (x, y, z, 1)
        array = array[..., 0]
    affine = np.asarray(volume.affine, dtype=np.float64)
    _check_volume(array, affine, plane, is_label)

    tensor = MetaTensor(torch.as_tensor(array, dtype=torch.float32)[None], affine=torch.as_tensor(affine))
    if field_of_view_mm is not None:
        start, end = field_of_view_box(array.shape, affine, plane, _check_extent(field_of_view_mm, "field_of_view_mm"),
                                       centre_ras)
        tensor = SpatialCrop(roi_start=start, roi_end=end)(tensor)  # the crop stays in the affine
    # slice axis first, in-plane axes in the documented anatomical directions (permute and flip only)
    tensor = Orientation(axcodes=PLANE_AXCODES[plane], labels=_RAS_LABELS)(tensor)
    n_slices = tensor.shape[1]
    if check_slab(slab, slice_spacing) == "fit":
        n_slices = depth
    elif slice_spacing:
        thickness = float(np.linalg.norm(np.asarray(tensor.affine)[:3, 0]))
        n_slices = max(1, int(round(n_slices * thickness / float(slice_spacing))))
    resize = Resize(
        spatial_size=(n_slices, height, width),
        mode="nearest-exact" if is_label else "trilinear",
        anti_aliasing=not is_label,
    )
    crop = CenterSpatialCrop(roi_size=(depth, height, width))
    oriented = tensor
    tensor = crop(resize(tensor))
    if is_label:
        _restore_lost_labels(oriented, tensor, crop, Resize(spatial_size=resize.spatial_size, mode="area"))
    else:
        tensor = _normalise(tensor, ScaleIntensityRange)
    tensor = SpatialPad(spatial_size=(depth, height, width), method="symmetric", value=0 if is_label else -1)(tensor)

    tensor_affine = np.asarray(tensor.affine, dtype=np.float64)
    out = tensor.as_tensor().numpy()
    out = np.rint(out).astype(np.uint8) if is_label else out.astype(np.float32, copy=False)
    return out, tensor_affine


def check_slab(slab: str, slice_spacing=None) -> str:
    """``data.slab``: crop or fit; fit decides the slice spacing itself, so it excludes slice_spacing."""
    if slab not in SLABS:
        raise OrthodiffError(f"data.slab={slab!r}: use crop (the central D slices) or fit (the whole slab as D slices)")
    if slab == "fit" and slice_spacing:
        raise OrthodiffError(
            f"data.slab=fit resamples the whole slab to D slices, so data.slice_spacing={slice_spacing} cannot apply; "
            "set data.slice_spacing=null or data.slab=crop"
        )
    return slab


def _restore_lost_labels(oriented, resized, crop, area_resize) -> None:
    """Put back, in place, labels that nearest neighbour dropped from the kept slices.

    A structure thinner than the new pixel can fall between the sampled points; it returns where
    its area-weighted fraction is at least half its peak. Labels outside the kept slices stay out.
    """
    lost = np.flatnonzero((_label_counts(oriented) > 0) & (_label_counts(resized) == 0))
    for label in lost[lost > 0]:
        fraction = crop(area_resize((oriented.as_tensor() == float(label)).float())).as_tensor()
        peak = float(fraction.max())
        if peak > 0:
            resized.as_tensor()[fraction >= 0.5 * peak] = float(label)


def _label_counts(tensor) -> np.ndarray:
    """Voxels per label 0..255 (bincount is far faster than unique on big label maps)."""
    return np.bincount(tensor.as_tensor().numpy().astype(np.uint8).ravel(), minlength=256)


def _normalise(tensor, scale_intensity_range):
    """Percentile window -> [-1, 1], clipped; min-max when the window is empty (sparse images)."""
    values = tensor.as_tensor().numpy()
    low, high = np.percentile(values, INTENSITY_PERCENTILES)
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        raise ScanError("constant image in the kept slices; nothing to learn from it")
    return scale_intensity_range(a_min=float(low), a_max=float(high), b_min=-1.0, b_max=1.0, clip=True)(tensor)


def to_source_geometry(
    array: np.ndarray,
    tensor_affine,
    source_shape,
    source_affine,
    is_label: bool,
    fill: float = 0.0,
    crop_box=None,
) -> np.ndarray:
    """Map a plane-tensor array (D, H, W) back onto the series' original voxel grid.

    Labels use nearest neighbour (uint8 kept), images linear; source voxels outside the plane
    tensor get ``fill``. ``crop_box`` ((start, end) source voxel indices, as the cache records a
    field-of-view crop) maps onto the crop alone and leaves every voxel outside it at ``fill``.
    """
    from scipy.ndimage import affine_transform

    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise OrthodiffError(f"to_source_geometry: expected an array (D, H, W), got shape {array.shape}")
    source_shape = tuple(int(v) for v in source_shape)
    if crop_box is not None:
        start, end = (np.asarray(corner, dtype=int) for corner in crop_box)
        inner = to_source_geometry(array, tensor_affine, end - start, cropped_affine(source_affine, start), is_label, fill)
        whole = np.full(source_shape, fill, dtype=inner.dtype)
        whole[tuple(slice(a, b) for a, b in zip(start, end))] = inner
        return whole
    # source voxel -> RAS -> plane-tensor voxel
    to_tensor = np.linalg.inv(np.asarray(tensor_affine, float)) @ np.asarray(source_affine, float)
    matrix, offset = to_tensor[:3, :3], to_tensor[:3, 3]
    # A tensor voxel covers +-0.5 around its centre; source voxels beyond every one of them get
    # ``fill``. For nearest neighbour, scipy's grid-constant mode draws exactly that border.
    if is_label:
        return affine_transform(
            array, matrix, offset, output_shape=source_shape, order=0, mode="grid-constant", cval=fill
        )
    values = array.astype(np.float32, copy=False)
    out = affine_transform(values, matrix, offset, output_shape=source_shape, order=1, mode="nearest")
    extent = np.ones(array.shape, np.uint8)
    inside = affine_transform(extent, matrix, offset, output_shape=source_shape, order=0, mode="grid-constant", cval=0)
    out[inside == 0] = fill
    return out


# --------------------------------------------------------------------------- the cache


@dataclass
class PrepareResult:
    out: Path
    total: int
    prepared: int
    skipped: int
    errors: list = field(default_factory=list)
    changed: list = field(default_factory=list)  # series prepared again because their source changed
    notes: list = field(default_factory=list)

    def describe(self) -> str:
        text = (
            f"Prepared {self.prepared} of {self.total} series into {self.out}; "
            f"{self.skipped} were already done and skipped; {len(self.errors)} failed"
        )
        if self.changed:
            text += (
                f"; {len(self.changed)} had a changed source and were prepared again "
                f"(first: {self.changed[0]})"
            )
        if self.notes:
            text += "; " + "; ".join(self.notes)
        if self.errors:
            first = self.errors[0]
            text += f" (listed in {self.out / 'errors.csv'}; first: {first['series_id']}: {first['reason']})"
        return text + f". Index: {self.out / 'index.parquet'}."


def prepare_cache(
    manifest,
    out,
    plane_size: dict,
    workers: int = 0,
    slice_spacing: float | None = None,
    slab: str = "crop",
    shard=None,
    selection=None,
    field_of_view_mm=None,
) -> PrepareResult:
    """Prepare every series of ``manifest`` (path or DataFrame) into the cache folder ``out``.

    Resumable: a series whose files are complete and whose source is unchanged is skipped. One
    bad series becomes a row of ``errors.csv``; the rest goes on. ``shard`` ("I/N") prepares
    only that shard's series into ``out/shards/I-of-N`` (see ``shards``). A full disk stops the
    run with one line; what was finished stays, and nothing is left half-written.
    ``selection`` (``data.series``) keeps the series that pass its filters; every candidate of a
    plane is prepared, so later stages may prefer another one without preparing again.
    ``field_of_view_mm`` (``data.field_of_view_mm``) crops each plane's series to a joint-centred field
    of view first; None or {} keeps the whole field of view.
    """
    import pandas as pd

    from .manifest import REQUIRED_COLUMNS, read_manifest

    out = Path(out)
    if isinstance(manifest, pd.DataFrame):
        frame, manifest_path = manifest.copy(), ""
        missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
        if missing:
            raise OrthodiffError(f"manifest lacks columns {missing}; write it with `orthodiff scan`")
        frame["series_id"] = frame["series_id"].astype(str)
    else:
        frame, manifest_path = read_manifest(manifest), str(Path(manifest).resolve())
    fingerprint = data_fingerprint(frame)  # of the whole manifest, as splits record it
    frame = _selected(frame, selection, manifest_path or "the manifest")
    unknown = sorted(set(frame["plane"]) - set(PLANES))
    if unknown:
        raise OrthodiffError(f"{manifest_path or 'manifest'}: unknown plane(s) {unknown}; use {', '.join(PLANES)}")
    sizes = check_plane_size(plane_size, planes=sorted(set(frame["plane"])))
    if slice_spacing is not None and not float(slice_spacing) > 0:
        raise OrthodiffError(f"slice_spacing={slice_spacing!r}: must be a positive number of mm (or None)")
    check_slab(slab, slice_spacing)
    field_of_view = check_field_of_view(field_of_view_mm)
    if int(workers) < 0:
        raise OrthodiffError(f"workers={workers}: must be at least 1 (0: every core)")
    shard_info = None
    if shard is not None:
        from .shards import parse_shard, shard_folder, shard_rows

        index, count = parse_shard(shard)
        frame, out, shard_info = shard_rows(frame, index, count), shard_folder(out, index, count), [index, count]
    settings = {
        "slice_spacing": slice_spacing,
        "slab": slab,
        # None when off, so caches made before this setting read as uncropped
        "field_of_view_mm": {plane: list(extent) for plane, extent in sorted(field_of_view.items())} or None,
    }
    try:
        with exclusive(out, "prepare", "prepare"):
            return _prepare_into(out, frame, sizes, settings, workers, manifest_path, fingerprint, shard_info)
    except OSError as exc:
        if disk_full_errno(exc) is not None:
            raise OrthodiffError(_disk_full(out)) from None
        raise


def _disk_full(out: Path) -> str:
    return (
        f"{out}: the disk is full (no space left while writing the cache); free space there or prepare into "
        "another folder with --out, then rerun: finished series are kept and nothing half-written remains"
    )


def _prepare_into(out: Path, frame, sizes, settings, workers, manifest_path, fingerprint, shard_info) -> PrepareResult:
    import pandas as pd

    notes = _write_cache_json(out, sizes, manifest_path, settings, fingerprint, shard_info)
    records, tasks, changed = {}, [], []
    for row in frame.to_dict("records"):
        done, stale = _finished_record(out, row)
        if done is not None:
            records[row["series_id"]] = done
            continue
        if stale:
            changed.append(row["series_id"])
        tasks.append({"row": row, "out": str(out), "size": sizes[row["plane"]], **settings})
    skipped = len(records)

    errors = []
    for count, result in enumerate(_run(tasks, workers), start=1):
        if "disk_full" in result:
            try:  # keep the finished series findable; this write may fail on the full disk too
                _write_index(out, frame, records)
            except OSError:
                pass
            raise OrthodiffError(_disk_full(out))
        if "reason" in result:
            errors.append(result)
            _forget_series(out, result["series_id"])
        else:
            records[result["series_id"]] = result
        if count % INDEX_FLUSH_EVERY == 0:
            _write_index(out, frame, records)
    errors.sort(key=lambda e: e["series_id"])
    write_table(out / "errors.csv", pd.DataFrame(errors, columns=ERROR_COLUMNS))
    _write_index(out, frame, records)
    result = PrepareResult(
        out=out,
        total=len(frame),
        prepared=len(records) - skipped,
        skipped=skipped,
        errors=errors,
        changed=sorted(changed),
        notes=notes,
    )
    if errors and not records:
        raise OrthodiffError(_nothing_prepared(result))
    return result


def _nothing_prepared(result: PrepareResult) -> str:
    first = result.errors[0]
    return (
        f"{result.out}: every one of the {result.total} series failed, so nothing was prepared (listed in "
        f"{result.out / 'errors.csv'}; first: {first['series_id']}: {first['reason']}); "
        "fix the sources, the manifest or the data.* settings and run prepare again"
    )


def _forget_series(out: Path, series_id: str) -> None:
    """Remove what an earlier run prepared of a series that now fails: its record first (so it no
    longer reads as done), then its tensors."""
    name = safe_filename(series_id)
    (out / "records" / f"{name}.json").unlink(missing_ok=True)
    for folder in ("images", "segs"):
        (out / folder / f"{name}.npy").unlink(missing_ok=True)


def _selected(frame, selection, where: str):
    from .selection import filter_series, require_rows

    chosen = filter_series(frame, selection)
    require_rows(frame, chosen, selection, where)
    return chosen


def _write_cache_json(out: Path, sizes: dict, manifest_path: str, settings: dict, fingerprint: str, shard) -> list:
    """Write cache.json; refuse a cache made with other settings; notes for the summary."""
    meta_path = out / "cache.json"
    wanted = {plane: list(size) for plane, size in sizes.items()}
    notes = []
    if meta_path.exists():
        existing = read_json(meta_path)
        if existing.get("plane_size") != wanted:
            raise OrthodiffError(
                f"{out}: this cache was prepared at plane_size {existing.get('plane_size')}, not {wanted}; "
                "prepare into a new folder (--out NEW_CACHE) or delete this one"
            )
        for key, value in settings.items():
            have = existing.get(key, "crop" if key == "slab" else None)  # caches before data.slab cropped
            if have != value:
                raise OrthodiffError(
                    f"{out}: this cache was prepared with {key}={have}, not {value}; "
                    "prepare into a new folder (--out NEW_CACHE) or delete this one"
                )
        if existing.get("manifest_fingerprint") not in (None, fingerprint):
            notes.append(
                f"the cache was prepared from another manifest before ({existing.get('manifest') or 'unknown'}); "
                "its index now follows this one, so split this manifest again"
            )
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "plane_size": wanted,
        **settings,
        "orientation": PLANE_AXCODES,
        "intensity_percentiles": list(INTENSITY_PERCENTILES),
        "manifest": manifest_path,
        "manifest_fingerprint": fingerprint,
    }
    if shard is not None:
        meta["shard"] = list(shard)
    write_json(meta_path, meta)
    return notes


def _seg_path(row) -> str:
    """The row's segmentation path, "" when none (a CSV manifest reads empty cells as NaN)."""
    seg = row.get("seg_path")
    return seg if isinstance(seg, str) else ""


def _stamps(row) -> dict:
    """Source stamps of the row's image (and segmentation); OSError when a source is unreadable."""
    stamps = {"source": source_stamp(row["path"])}
    if _seg_path(row):
        stamps["seg_source"] = source_stamp(_seg_path(row))
    return stamps


def _finished_record(out: Path, row) -> tuple[dict | None, bool]:
    """(the saved record, False) when the series is done from this same, unchanged source;
    (None, True) when it was done from a source that has changed since; else (None, False)."""
    record_path = out / "records" / f"{safe_filename(row['series_id'])}.json"
    if not record_path.exists():
        return None, False
    try:
        record = read_json(record_path)
    except (OSError, ValueError):
        return None, False
    same_source = record.get("path") == str(row["path"]) and record.get("seg_path", "") == _seg_path(row)
    files = [record.get("image", "")] + ([record["seg"]] if record.get("seg") else [])
    if not (same_source and all(name and npy_is_complete(out / name) for name in files)):
        return None, False
    if not comparable(record.get("source")):  # unstamped, or stamped another way: cannot tell, so prepare again
        return None, False
    try:
        unchanged = all(record.get(key) == value for key, value in _stamps(row).items())
    except OSError:
        unchanged = False
    return (record, False) if unchanged else (None, True)


def _run(tasks: list, workers: int):
    """Yield one result per task, in completion order, on ``workers`` processes (0: every core)."""
    workers = int(workers) or os.cpu_count() or 1
    workers = min(workers, len(tasks))
    progress = _progress(len(tasks))
    if workers <= 1:
        for task in tasks:
            yield _prepare_series(task)
            progress.update()
    else:
        import multiprocessing

        import monai.transforms  # noqa: F401  imported once here, inherited by forked workers

        # fork (as torch's DataLoader does on Linux) starts workers at once; spawn elsewhere
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=one_thread_worker, initargs=(os.getpid(),)
        )
        futures = []
        try:
            futures = [pool.submit(_prepare_series, task) for task in tasks]
            for future in as_completed(futures):
                yield future.result()
                progress.update()
        finally:  # stopped early (full disk, Ctrl-C): drop the queued series, do not wait for them
            pool.shutdown(wait=True, cancel_futures=True)
    progress.close()


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="prepare", unit="series", disable=None, leave=False)


def _prepare_series(task: dict) -> dict:
    """Prepare one series; its record, ``{series_id, path, reason}`` when it fails, or
    ``{disk_full}`` when the cache's disk is full (which stops the run)."""
    row, out = task["row"], Path(task["out"])
    try:
        extent = (task.get("field_of_view_mm") or {}).get(row["plane"])
        return _prepare_series_or_raise(
            row, out, task["size"], task["slice_spacing"], task.get("slab", "crop"), field_of_view_mm=extent
        )
    except OrthodiffError as exc:
        return {"series_id": row["series_id"], "path": str(row["path"]), "reason": _one_line(exc)}
    except OSError as exc:
        if disk_full_errno(exc) is not None:
            return {"disk_full": str(out)}
        reason = f"unexpected {type(exc).__name__} while preparing: {exc}"
        return {"series_id": row["series_id"], "path": str(row["path"]), "reason": _one_line(reason)}
    except Exception as exc:  # a reader or transform failing on odd data must not stop the run
        reason = f"unexpected {type(exc).__name__} while preparing: {exc}"
        return {"series_id": row["series_id"], "path": str(row["path"]), "reason": _one_line(reason)}


def _prepare_series_or_raise(row: dict, out: Path, size, slice_spacing, slab: str = "crop", field_of_view_mm=None) -> dict:
    from ..io.volume import read_volume
    from .manifest import load_series

    plane = row["plane"]
    try:
        stamps = _stamps(row)  # before reading: a source replaced meanwhile is caught next run
    except OSError as exc:
        raise ScanError(f"cannot read the source ({exc.strerror or exc}); check that it exists and is readable") from None
    volume = load_series(row)
    centre = joint_centre(row) if field_of_view_mm is not None else None
    crop = {"field_of_view_mm": field_of_view_mm, "centre_ras": centre}
    image, tensor_affine = to_plane_tensor(volume, plane, size, slice_spacing=slice_spacing, slab=slab, **crop)
    name = safe_filename(row["series_id"])
    record = {
        "series_id": row["series_id"],
        "path": str(row["path"]),
        "seg_path": _seg_path(row),
        **stamps,
        "image": f"images/{name}.npy",
        "seg": "",
        "source_shape": json.dumps([int(v) for v in volume.array.shape]),
        "source_affine": json.dumps(np.round(volume.affine, 6).tolist()),
        "tensor_affine": json.dumps(np.round(tensor_affine, 6).tolist()),
        "tensor_spacing": json.dumps(np.round(np.linalg.norm(tensor_affine[:3, :3], axis=0), 6).tolist()),
        **_crop_record(volume, plane, field_of_view_mm, centre),
    }
    seg = None
    if _seg_path(row):
        label_volume = read_volume(row["seg_path"])
        if label_volume.array.shape != volume.array.shape:
            raise ScanError(
                f"segmentation {row['seg_path']} has shape {label_volume.array.shape}, "
                f"the image {volume.array.shape}; they must share one voxel grid"
            )
        if not np.allclose(label_volume.affine, volume.affine, atol=1e-2):
            raise ScanError(
                f"segmentation {row['seg_path']} has another affine than its image; resample it onto the image"
            )
        try:
            seg, _ = to_plane_tensor(
                Volume(label_volume.array, volume.affine), plane, size, is_label=True, slice_spacing=slice_spacing,
                slab=slab, **crop,
            )
        except ScanError as exc:
            raise ScanError(f"segmentation {row['seg_path']}: {exc}") from exc
        record["seg"] = f"segs/{name}.npy"
    record["image_sha256"] = _save_npy(out / record["image"], image.astype(np.float16))
    if seg is not None:
        record["seg_sha256"] = _save_npy(out / record["seg"], seg)
    write_json(out / "records" / f"{name}.json", record)  # last: its presence marks the series done
    return record


def _crop_record(volume: Volume, plane: str, field_of_view_mm, centre) -> dict:
    """The crop box (source voxel indices [start, end)) and the cropped grid's affine; "" when uncropped."""
    if field_of_view_mm is None:
        return {"crop_box": "", "crop_affine": ""}
    start, end = field_of_view_box(np.shape(volume.array), volume.affine, plane, field_of_view_mm, centre)
    return {
        "crop_box": json.dumps([list(start), list(end)]),
        "crop_affine": json.dumps(np.round(cropped_affine(volume.affine, start), 6).tolist()),
    }


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Write ``array`` atomically; the sha256 of the file written."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array))
        return sha256_file(tmp)


def _one_line(exc) -> str:
    return re.sub(r"\s+", " ", str(exc)).strip()


def _write_index(out: Path, frame, records: dict) -> None:
    """index.parquet: manifest columns of the prepared series joined with their cache records."""
    import pandas as pd

    geometry_columns = [
        "image", "seg", "source_shape", "source_affine", "tensor_affine", "tensor_spacing", "crop_box", "crop_affine",
        "image_sha256",
    ]
    done = frame[frame["series_id"].isin(records)].copy()
    record_frame = pd.DataFrame(  # records written before crops were recorded lack the crop: uncropped
        [{key: records[sid].get(key, "") for key in ["series_id"] + geometry_columns} for sid in done["series_id"]],
        columns=["series_id"] + geometry_columns,
    )
    index = done.merge(record_frame, on="series_id", how="left")
    first = ["series_id", "study_id", "patient_id", "plane", "image", "seg"]
    rest = [c for c in index.columns if c not in first and c not in geometry_columns]
    index = index[first + rest + geometry_columns[2:]].sort_values("series_id").reset_index(drop=True)
    write_table(out / "index.parquet", index)
