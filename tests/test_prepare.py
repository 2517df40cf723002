"""orthodiff prepare: plane tensors, their orientation and geometry, the resumable cache."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from orthodiff.data.cache import PlaneCache
from orthodiff.data.prepare import PLANE_AXCODES, prepare_cache, to_plane_tensor, to_source_geometry
from orthodiff.errors import OrthodiffError, ScanError
from orthodiff.fileio import safe_filename
from orthodiff.io.volume import Volume, read_volume

SIZE = {"sagittal": [8, 32, 32], "coronal": [8, 32, 32], "axial": [8, 32, 32]}


def _rotation(degrees: float) -> np.ndarray:
    """A small oblique tilt about the RAS axis (1, 1, 1), as scanners prescribe."""
    axis = np.ones(3) / np.sqrt(3)
    angle = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


# voxel axes (i, j, k) -> signed RAS unit directions; k is the slice axis. Flips on purpose, so
# the test proves that reorientation (not the file's own order) puts the marker in place.
_DIRECTIONS = {
    "sagittal": [(0, 1, 0), (0, 0, 1), (-1, 0, 0)],  # i anterior, j superior, k toward left
    "coronal": [(1, 0, 0), (0, 0, 1), (0, -1, 0)],  # i right, j superior, k toward posterior
    "axial": [(-1, 0, 0), (0, 1, 0), (0, 0, -1)],  # i left, j anterior, k toward inferior
}


def _oriented_volume(plane: str, shape=(40, 36, 12), spacing=(0.5, 0.5, 3.0), seed=0) -> tuple[Volume, np.ndarray]:
    """Noise with a bright block in the superior-anterior-right corner; returns the block's mask too."""
    directions = np.array(_DIRECTIONS[plane], float).T  # columns = voxel axes
    affine = np.eye(4)
    affine[:3, :3] = _rotation(4.0) @ directions @ np.diag(spacing)
    affine[:3, 3] = (10.0, -20.0, 30.0)
    array = np.random.default_rng(seed).uniform(0, 100, shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    # for each voxel axis, the end that lies toward R, A or S
    ends = [
        slice(n - extent, n) if d.sum() > 0 else slice(0, extent)
        for n, d, extent in zip(shape, directions.T, (6, 6, 3))
    ]
    mask[tuple(ends)] = True
    array[mask] = 1000.0
    return Volume(array, affine), mask


@pytest.mark.parametrize("plane", ["sagittal", "coronal", "axial"])
def test_marker_lands_in_documented_corner(tmp_path, plane):
    volume, mask = _oriented_volume(plane)
    path = tmp_path / f"{plane}.nii.gz"
    nib.save(nib.Nifti1Image(volume.array, volume.affine), str(path))
    volume = read_volume(path)

    tensor, tensor_affine = to_plane_tensor(volume, plane, (12, 32, 32))
    assert tensor.shape == (1, 12, 32, 32) and tensor.dtype == np.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0 and tensor.max() == 1.0
    bright = np.argwhere(tensor[0] > 0.9)
    # RIP / AIL / SPL: last slices are R / A / S, first rows superior (anterior for axial),
    # first columns anterior (sagittal) or patient right (coronal, axial) -> the marker sits at (D-1, 0, 0).
    assert bright[:, 0].min() >= 12 - 3 - 1, bright[:, 0]
    assert bright[:, 1].max() < 32 * 6 / 36 + 2
    assert bright[:, 2].max() < 32 * 6 / 36 + 2

    # tensor_affine maps the marker to the same RAS position as the source affine does
    source_centre = (volume.affine @ np.append(np.argwhere(mask).mean(0), 1))[:3]
    tensor_centre = (tensor_affine @ np.append(bright.mean(0), 1))[:3]
    assert np.linalg.norm(source_centre - tensor_centre) < 2.5


def test_documented_axcodes():
    assert PLANE_AXCODES == {"sagittal": "RIP", "coronal": "AIL", "axial": "SPL"}


def test_slices_cropped_and_padded_around_centre():
    volume, _ = _oriented_volume("axial", shape=(32, 32, 10))
    volume.array[:, :, :] = np.arange(10, dtype=np.float32)[None, None, :] + 1  # intensity = slice number
    cropped, _ = to_plane_tensor(volume, "axial", (4, 16, 16))
    # the central slices 3..6 are kept; k runs inferior here, so the superior-first tensor reverses them
    means = cropped[0].mean(axis=(1, 2))
    np.testing.assert_allclose(np.diff(means), np.diff(means)[0], atol=0.01)  # equal steps
    assert np.diff(means)[0] < 0
    padded, _ = to_plane_tensor(volume, "axial", (14, 16, 16))
    assert np.all(padded[0, :2] == -1.0) and np.all(padded[0, -2:] == -1.0)
    assert np.all(padded[0, 2:-2].max(axis=(1, 2)) > -1.0)


@pytest.mark.parametrize(
    "array, reason",
    [
        (np.where(np.eye(32)[:, :, None] > 0, np.inf, 1.0).repeat(8, 2).astype(np.float32), "256 NaN/Inf"),
        (np.full((32, 32, 8), 7.0, np.float32), "constant image"),
        (np.ones((32, 32, 2), np.float32), "at least 3"),
        (np.ones((8, 32, 8), np.float32), "in-plane size"),
    ],
)
def test_bad_volumes_raise_one_reason(array, reason):
    with pytest.raises(ScanError, match=reason):
        to_plane_tensor(Volume(array, np.diag([0.5, 0.5, 3.0, 1.0])), "axial", (4, 16, 16))


def test_plane_that_contradicts_geometry_is_an_error():
    volume, _ = _oriented_volume("sagittal")
    with pytest.raises(ScanError, match="not a axial series"):
        to_plane_tensor(volume, "axial", (4, 16, 16))


def test_real_knee_labelmap_keeps_labels_and_maps_back(knee_labelmap_path):
    source = read_volume(knee_labelmap_path)
    labels = source.array.astype(np.uint8)
    # thin-slice 3D scan: resample slices to 3.5 mm so 32 of them span the knee
    small, _ = to_plane_tensor(source, "sagittal", (32, 96, 96), is_label=True, slice_spacing=3.5)
    assert small.dtype == np.uint8 and small.shape == (1, 32, 96, 96)
    assert set(np.unique(small)) == set(range(11))

    # near the source's own slice count the round trip recovers the bones
    tensor, tensor_affine = to_plane_tensor(source, "sagittal", (160, 192, 192), is_label=True)
    back = to_source_geometry(tensor[0], tensor_affine, labels.shape, source.affine, is_label=True)
    assert back.shape == labels.shape and back.dtype == np.uint8
    for label in (5, 6, 7):  # femur, tibia, patella
        dice = 2 * np.sum((back == label) & (labels == label)) / (np.sum(back == label) + np.sum(labels == label))
        assert dice > 0.9, (label, dice)


def test_to_source_geometry_images_linear():
    volume, _ = _oriented_volume("coronal", shape=(32, 32, 8))
    volume.array[:] = np.linspace(0, 100, 32, dtype=np.float32)[:, None, None]  # smooth ramp
    tensor, tensor_affine = to_plane_tensor(volume, "coronal", (8, 32, 32))
    back = to_source_geometry(tensor[0], tensor_affine, volume.array.shape, volume.affine, is_label=False)
    expected = volume.array / 50.0 - 1.0  # the percentile window of a uniform ramp is nearly its range
    assert back.dtype == np.float32
    assert np.abs(back[2:-2] - expected[2:-2]).max() < 0.1


# --------------------------------------------------------------------------- the cache


def _write_manifest(tmp_path) -> tuple:
    """Two patients with good series (one with a segmentation) and three broken series."""
    rows = []

    def add(patient, study, plane, path, seg_path=""):
        rows.append(
            dict(
                patient_id=patient,
                study_id=study,
                series_id=f"{study}/{plane}",
                plane=plane,
                path=str(path),
                format="nifti",
                seg_path=str(seg_path),
                site="A",
                field_strength=3.0,
                age=40.0,
                sex="F",
                height=170.0,
                weight=70.0,
                label_acl=1.0,
            )
        )

    for n, (patient, study) in enumerate([("P1", "s1"), ("P2", "s2")]):
        for plane in ("sagittal", "coronal"):
            volume, mask = _oriented_volume(plane, shape=(24, 24, 6), seed=n)
            path = tmp_path / "archive" / study / f"{plane}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume.array, volume.affine), str(path))
            seg_path = ""
            if plane == "sagittal":
                seg_path = path.with_name("sagittal_seg.nii.gz")
                nib.save(nib.Nifti1Image(mask.astype(np.uint8) * 3, volume.affine), str(seg_path))
            add(patient, study, plane, path, seg_path)
    broken = tmp_path / "archive" / "bad"
    broken.mkdir()
    volume, _ = _oriented_volume("axial", shape=(24, 24, 6))
    nan = volume.array.copy()
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, volume.affine), str(broken / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.full_like(volume.array, 5.0), volume.affine), str(broken / "constant.nii.gz"))
    nib.save(nib.Nifti1Image(volume.array, volume.affine), str(broken / "truncated.nii"))
    data = (broken / "truncated.nii").read_bytes()
    (broken / "truncated.nii").write_bytes(data[: len(data) // 2])
    for name in ("nan", "constant"):
        add("P3", "s3", "axial", broken / f"{name}.nii.gz")
        rows[-1]["series_id"] = f"s3/{name}"
    add("P3", "s3", "axial", broken / "truncated.nii")
    rows[-1]["series_id"] = "s3/truncated"
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(manifest, index=False)
    return manifest, rows


def test_prepare_cache_errors_resume_and_size_change(tmp_path):
    manifest, rows = _write_manifest(tmp_path)
    cache_dir = tmp_path / "cache"
    result = prepare_cache(manifest, cache_dir, SIZE, workers=1)
    assert (result.prepared, result.skipped, len(result.errors)) == (4, 0, 3)
    assert "3 failed" in result.describe() and "errors.csv" in result.describe()

    errors = pd.read_csv(cache_dir / "errors.csv").set_index("series_id")
    assert list(errors.columns) == ["path", "reason"]
    assert "NaN/Inf" in errors.loc["s3/nan", "reason"]
    assert "constant image" in errors.loc["s3/constant", "reason"]
    assert (
        "truncated.nii" in errors.loc["s3/truncated", "reason"]
        and "corrupt or truncated" in errors.loc["s3/truncated", "reason"]
    )

    meta = json.loads((cache_dir / "cache.json").read_text())
    assert meta["format_version"] == 1 and meta["plane_size"] == SIZE
    cache = PlaneCache(cache_dir)
    assert sorted(cache.index["series_id"]) == ["s1/coronal", "s1/sagittal", "s2/coronal", "s2/sagittal"]
    for column in (
        "study_id",
        "patient_id",
        "plane",
        "image",
        "seg",
        "label_acl",
        "age",
        "source_shape",
        "source_affine",
        "tensor_affine",
    ):
        assert column in cache.index.columns, column
    image = cache.image("s1/sagittal")
    assert isinstance(image, np.memmap) and image.dtype == np.float16 and image.shape == (1, 8, 32, 32)
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    seg = cache.seg("s1/sagittal")
    assert seg.dtype == np.uint8 and seg.shape == (1, 8, 32, 32) and set(np.unique(seg)) == {0, 3}
    assert cache.seg("s1/coronal") is None
    assert (cache_dir / "images" / f"{safe_filename('s1/sagittal')}.npy").exists()
    geometry = cache.geometry("s1/sagittal")
    assert geometry["source_shape"] == (24, 24, 6) and geometry["tensor_affine"].shape == (4, 4)

    # resume: nothing finished is redone; a removed file is
    mtimes = {p.name: p.stat().st_mtime_ns for p in (cache_dir / "images").iterdir()}
    (cache_dir / "images" / f"{safe_filename('s2/coronal')}.npy").unlink()
    again = prepare_cache(manifest, cache_dir, SIZE, workers=1)
    assert (again.prepared, again.skipped, len(again.errors)) == (1, 3, 3)
    for path in (cache_dir / "images").iterdir():
        if path.name != f"{safe_filename('s2/coronal')}.npy":
            assert path.stat().st_mtime_ns == mtimes[path.name]
    assert len(PlaneCache(cache_dir).index) == 4

    with pytest.raises(OrthodiffError, match="new folder"):
        prepare_cache(manifest, cache_dir, {**SIZE, "axial": [4, 32, 32]}, workers=1)
    with pytest.raises(OrthodiffError, match="plane size"):
        cache.check_plane_size({"sagittal": (16, 64, 64)})
    cache.check_plane_size({"sagittal": (8, 32, 32)})


def test_prepare_parallel_matches_serial(tmp_path):
    manifest, _ = _write_manifest(tmp_path)
    serial = prepare_cache(manifest, tmp_path / "serial", SIZE, workers=1)
    parallel = prepare_cache(manifest, tmp_path / "parallel", SIZE, workers=2)
    assert (parallel.prepared, len(parallel.errors)) == (serial.prepared, len(serial.errors))
    a, b = PlaneCache(tmp_path / "serial"), PlaneCache(tmp_path / "parallel")
    for series_id in a.index["series_id"]:
        np.testing.assert_array_equal(np.asarray(a.image(series_id)), np.asarray(b.image(series_id)))


def test_bad_plane_size_is_one_line_error(tmp_path):
    manifest, _ = _write_manifest(tmp_path)
    with pytest.raises(OrthodiffError, match="data.plane_size.coronal"):
        prepare_cache(
            manifest, tmp_path / "cache", {"sagittal": [8, 32, 32], "coronal": [8, 0, 32], "axial": [8, 32, 32]}
        )


def test_interrupted_run_keeps_progress(tmp_path, monkeypatch):
    import orthodiff.data.prepare as prepare_module

    manifest, _ = _write_manifest(tmp_path)
    real = prepare_module._prepare_series
    calls = []

    def interrupt_third(task):
        calls.append(task["row"]["series_id"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(prepare_module, "INDEX_FLUSH_EVERY", 1)
    monkeypatch.setattr(prepare_module, "_prepare_series", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(manifest, tmp_path / "cache", SIZE, workers=1)
    assert len(PlaneCache(tmp_path / "cache").index) == 2  # flushed before the interruption
    monkeypatch.setattr(prepare_module, "_prepare_series", real)
    resumed = prepare_cache(manifest, tmp_path / "cache", SIZE, workers=1)
    assert (resumed.skipped, resumed.prepared) == (2, 2)


def test_thin_label_survives_downsampling():
    labels = np.zeros((64, 64, 6), np.float32)
    labels[10:50, 10:50, :] = 1
    labels[6, 8:56, :] = 2  # 1 px thin; flipped R->L it is column 57, between the sampled 54 and 58
    labels[40:42, 40:42, 0] = 3  # only in the first slice, which the crop to 4 slices drops
    volume = Volume(labels, np.diag([0.5, 0.5, 3.0, 1.0]))
    tensor, _ = to_plane_tensor(volume, "axial", (4, 16, 16), is_label=True)
    assert set(np.unique(tensor)) == {0, 1, 2}
    assert (tensor == 2).sum() >= 4 * 10  # a line across the image on every kept slice
