"""The joint-centred field-of-view crop of ``prepare`` on a real oblique sagittal DICOM series:
its size and centre, the affine that keeps it, the cache record and the way back to the source grid."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from orthodiff.data.cache import PlaneCache
from orthodiff.data.prepare import (
    check_field_of_view,
    cropped_affine,
    field_of_view_box,
    prepare_cache,
    to_plane_tensor,
    to_source_geometry,
)
from orthodiff.errors import OrthodiffError, ScanError
from orthodiff.io.volume import Volume

FIELD_OF_VIEW = (None, 100.0, 100.0)  # sagittal: every slice, 100 x 100 mm in-plane


@pytest.fixture(scope="module")
def first_echo(knee_dicom_dir) -> Volume:
    """One echo of the real multi-echo series: 256 x 256 x 24, 0.625 mm in-plane, oblique sagittal."""
    from orthodiff.io.dicom import read_dicom_series

    return read_dicom_series(knee_dicom_dir, echo_index=0)


def _patient_mm(affine, voxel) -> np.ndarray:
    return (np.asarray(affine, float) @ np.append(np.asarray(voxel, float), 1.0))[:3]


def _spacing(affine) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def test_crop_has_the_requested_size_and_is_centred(first_echo):
    shape, affine = first_echo.array.shape, first_echo.affine
    start, end = (np.asarray(c) for c in field_of_view_box(shape, affine, "sagittal", FIELD_OF_VIEW))
    spacing = _spacing(affine)
    extent_mm = (end - start) * spacing
    assert (start[2], end[2]) == (0, 24)  # the slice axis is kept whole (null)
    for axis in (0, 1):  # in-plane: 100 mm within one voxel
        assert abs(extent_mm[axis] - 100.0) <= spacing[axis], (axis, extent_mm)
    box_centre = _patient_mm(affine, (start + end - 1) / 2.0)
    series_centre = _patient_mm(affine, (np.asarray(shape) - 1) / 2.0)
    assert np.linalg.norm(box_centre - series_centre) <= spacing.max()


def test_cropped_affine_maps_each_voxel_where_its_source_voxel_is(first_echo):
    # identity-sized plane tensor (no resize), labels (no intensity scaling): every tensor voxel is
    # exactly one source voxel, so its value tells which one it came from
    shape = first_echo.array.shape
    codes = (np.arange(np.prod(shape)) % 251 + 1).reshape(shape).astype(np.float32)
    start, end = (np.asarray(c) for c in field_of_view_box(shape, first_echo.affine, "sagittal", FIELD_OF_VIEW))
    size = (24, *(end - start)[:2])  # (d, h, w) of the crop: slices, then the two in-plane axes
    tensor, tensor_affine = to_plane_tensor(
        Volume(codes, first_echo.affine), "sagittal", size, is_label=True, field_of_view_mm=FIELD_OF_VIEW
    )
    to_source = np.linalg.inv(first_echo.affine) @ tensor_affine
    rng = np.random.default_rng(0)
    for voxel in zip(*(rng.integers(0, n, 50) for n in tensor.shape[1:])):
        source = to_source @ np.append(voxel, 1.0)
        index = np.rint(source[:3]).astype(int)
        assert np.allclose(source[:3], index, atol=1e-3)  # lands on a source voxel centre
        assert np.all(index >= start) and np.all(index < end)  # inside the crop
        assert tensor[(0, *voxel)] == codes[tuple(index)]  # and it is the voxel it came from
    # the recorded crop affine is the source affine moved to the box's first voxel
    np.testing.assert_allclose(_patient_mm(cropped_affine(first_echo.affine, start), (0, 0, 0)),
                               _patient_mm(first_echo.affine, start))


def test_a_label_blob_lands_back_where_it_came_from(first_echo):
    shape = first_echo.array.shape
    start, end = (np.asarray(c) for c in field_of_view_box(shape, first_echo.affine, "sagittal", FIELD_OF_VIEW))
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    spacing = _spacing(first_echo.affine)
    labels = np.zeros(shape, np.uint8)
    inside_centre = start + (end - start) * np.array([0.35, 0.6, 0.5])  # off the crop's centre
    labels[np.linalg.norm((grid - inside_centre) * spacing, axis=-1) < 9.0] = 2
    outside_centre = np.array([10, 10, 12])  # a blob the crop leaves out
    labels[np.linalg.norm((grid - outside_centre) * spacing, axis=-1) < 5.0] = 3

    tensor, tensor_affine = to_plane_tensor(
        Volume(labels, first_echo.affine), "sagittal", (24, 64, 64), is_label=True, field_of_view_mm=FIELD_OF_VIEW
    )
    assert set(np.unique(tensor)) == {0, 2}  # the blob outside the field of view is cropped away
    back = to_source_geometry(tensor, tensor_affine, shape, first_echo.affine, is_label=True, crop_box=(start, end))
    assert back.shape == shape and back.dtype == np.uint8
    outside = np.ones(shape, bool)
    outside[tuple(slice(a, b) for a, b in zip(start, end))] = False
    assert not back[outside].any()  # zeros outside the crop
    came = _patient_mm(first_echo.affine, np.argwhere(labels == 2).mean(axis=0))
    went = _patient_mm(first_echo.affine, np.argwhere(back == 2).mean(axis=0))
    assert np.all(np.abs(np.linalg.inv(first_echo.affine[:3, :3]) @ (went - came)) <= 1.0)  # within one source voxel
    # without the box the same tensor maps to the same place: the crop is in the tensor's affine
    assert np.array_equal(back, to_source_geometry(tensor, tensor_affine, shape, first_echo.affine, is_label=True))


def test_manifest_centre_moves_the_crop_and_outside_is_refused(first_echo):
    shape, affine = first_echo.array.shape, first_echo.affine
    target = np.array([100.0, 90.0, 12.0])  # source voxel indices of the joint's centre
    start, end = (np.asarray(c) for c in field_of_view_box(shape, affine, "sagittal", (None, 50, 50),
                                                           centre_ras=_patient_mm(affine, target)))
    assert np.all(np.abs((start + end - 1)[:2] / 2.0 - target[:2]) <= 0.5)
    with pytest.raises(ScanError, match="joint_centre_ras"):
        field_of_view_box(shape, affine, "sagittal", (None, 50, 50), centre_ras=(500.0, 0.0, 0.0))


def _dicom_manifest(tmp_path, knee_dicom_dir, centre: str = "") -> str:
    row = dict(patient_id="P1", study_id="s1", series_id="s1/sagittal", plane="sagittal", path=str(knee_dicom_dir),
               format="dicom", echo_index=0, joint_centre_ras=centre)
    path = tmp_path / "manifest.parquet"
    pd.DataFrame([row]).to_parquet(path, index=False)
    return str(path)


def test_prepare_records_the_crop_and_refuses_a_cache_cropped_otherwise(tmp_path, knee_dicom_dir, first_echo):
    size = {"sagittal": [8, 32, 32]}
    manifest = _dicom_manifest(tmp_path, knee_dicom_dir)
    result = prepare_cache(manifest, tmp_path / "cache", size, workers=1,
                           field_of_view_mm={"sagittal": list(FIELD_OF_VIEW)})
    assert (result.prepared, len(result.errors)) == (1, 0), result.describe()
    cache = PlaneCache(tmp_path / "cache")
    assert cache.field_of_view_mm == {"sagittal": [None, 100.0, 100.0]}
    geometry = cache.geometry("s1/sagittal")
    expected = field_of_view_box(first_echo.array.shape, first_echo.affine, "sagittal", FIELD_OF_VIEW)
    assert geometry["crop_box"] == expected
    crop_affine = np.asarray(json.loads(cache.index.loc[0, "crop_affine"]))
    np.testing.assert_allclose(crop_affine, cropped_affine(first_echo.affine, expected[0]), atol=1e-5)
    # the plane tensor covers the crop: its in-plane spacing is 100 mm over 32 pixels
    assert np.allclose(_spacing(geometry["tensor_affine"])[1:], 100.0 / 32, atol=0.02)

    cache.check_field_of_view({"sagittal": [None, 100, 100]})
    with pytest.raises(OrthodiffError, match="field_of_view_mm"):
        cache.check_field_of_view({})
    with pytest.raises(OrthodiffError, match="field_of_view_mm"):
        prepare_cache(manifest, tmp_path / "cache", size, workers=1)  # uncropped into the cropped cache

    uncropped = prepare_cache(manifest, tmp_path / "whole", size, workers=1)
    assert uncropped.prepared == 1 and PlaneCache(tmp_path / "whole").geometry("s1/sagittal")["crop_box"] is None


def test_prepare_takes_the_joint_centre_from_the_manifest(tmp_path, knee_dicom_dir, first_echo):
    centre = _patient_mm(first_echo.affine, (90, 150, 12))
    manifest = _dicom_manifest(tmp_path, knee_dicom_dir, centre=",".join(f"{v:.3f}" for v in centre))
    prepare_cache(manifest, tmp_path / "cache", {"sagittal": [8, 32, 32]}, workers=1,
                  field_of_view_mm={"sagittal": [None, 40, 40]})
    start, end = PlaneCache(tmp_path / "cache").geometry("s1/sagittal")["crop_box"]
    assert np.all(np.abs((np.asarray(start) + end - 1)[:2] / 2.0 - (90, 150)) <= 0.5)


@pytest.mark.parametrize(
    "value, where",
    [
        ({"sagittal": [None, 0, 100]}, "data.field_of_view_mm.sagittal"),
        ({"sagittal": [100, 100]}, "data.field_of_view_mm.sagittal"),
        ({"sagittal": "100"}, "data.field_of_view_mm.sagittal"),
        ({"oblique": [None, 100, 100]}, "data.field_of_view_mm key"),
        ([100, 100, 100], "data.field_of_view_mm"),
    ],
)
def test_a_bad_field_of_view_is_one_line_naming_the_field(value, where):
    with pytest.raises(OrthodiffError, match=where) as caught:
        check_field_of_view(value)
    assert "\n" not in str(caught.value)


def test_the_field_of_view_is_a_config_option_off_by_default():
    from orthodiff.config import load_config

    assert load_config().data.field_of_view_mm == {}
    config = load_config(["tiny"], ["data.field_of_view_mm.sagittal=[null,100,100]"])
    assert check_field_of_view(config.data.field_of_view_mm) == {"sagittal": (None, 100.0, 100.0)}


def test_predict_writes_the_segmentation_on_the_source_grid_inside_the_crop(tmp_path_factory, first_echo):
    import torch
    from pipeline_fixtures import tiny_pipeline

    from orthodiff.pipeline.pipeline import OrthoDiffusionPipeline

    pipeline = OrthoDiffusionPipeline.from_pretrained(tiny_pipeline(tmp_path_factory)["pipeline"])
    pipeline.config["preprocessing"]["field_of_view_mm"] = {"sagittal": list(FIELD_OF_VIEW)}

    def everything_is_class_one(features, present, images):
        logits = {}
        for plane, image in images.items():
            scores = torch.zeros((1, len(pipeline.classes) or 2, *image.shape[2:]))
            scores[:, 1] = 1.0
            logits[plane] = scores
        return logits

    pipeline.segmenter = everything_is_class_one
    item = pipeline.predict_study({"sagittal": first_echo}, "crop", explain=False).series["sagittal"]
    start, end = field_of_view_box(first_echo.array.shape, first_echo.affine, "sagittal", FIELD_OF_VIEW)
    assert item.crop_box == (start, end)
    # the pipeline's plane size keeps the central 8 of the 24 slices (data.slab=crop), each over the whole crop
    kept_slices = np.flatnonzero(item.segmentation.any(axis=(0, 1)))
    assert list(kept_slices) == list(range(8, 16))
    expected = np.zeros(first_echo.array.shape, np.uint8)
    expected[start[0]:end[0], start[1]:end[1], 8:16] = 1
    assert np.array_equal(item.segmentation, expected)  # the crop and nothing else, on the source grid


def test_a_preset_takes_the_crop_as_an_override_and_its_pool_and_cache_follow(tmp_path, knee_dicom_dir):
    from orthodiff.bench.data.pretraining import pool_key
    from orthodiff.bench.data.workspace import prepare_planes
    from orthodiff.bench.presets import resolve_preset
    from orthodiff.config import load_config

    preset, _ = resolve_preset("small", ["data.field_of_view_mm.sagittal=[null,100,100]"])
    cropped = load_config(overrides=preset.config)
    plain = load_config(overrides=resolve_preset("small")[0].config)
    assert cropped.data.field_of_view_mm == {"sagittal": [None, 100, 100]}
    assert cropped.data.plane_size == plain.data.plane_size  # the preset's plane size is untouched
    # an uncropped pool keeps the folder it had before crops existed; a cropped one gets its own
    assert pool_key("knee", 2500, 64, plain.data) == "b4592bdd165c283a"
    assert pool_key("knee", 2500, 64, cropped.data) != "b4592bdd165c283a"

    manifest = _dicom_manifest(tmp_path, knee_dicom_dir)
    prepare_cache(manifest, tmp_path / "cache", {"sagittal": [8, 32, 32]}, workers=1)
    config = load_config(overrides=[f"data.manifest={manifest}", f"data.cache={tmp_path / 'cache'}",
                                    "data.plane_size.sagittal=[8,32,32]", "data.field_of_view_mm.sagittal=[null,100,100]"])
    with pytest.raises(OrthodiffError, match="field_of_view_mm"):
        prepare_planes(config)  # the bench never reuses an uncropped cache for a cropped run


def test_finetune_refuses_a_config_whose_crop_is_not_the_caches(tmp_path, knee_dicom_dir):
    from orthodiff.config import load_config
    from orthodiff.finetune.run import run_finetune

    manifest = _dicom_manifest(tmp_path, knee_dicom_dir)
    prepare_cache(manifest, tmp_path / "cache", {"sagittal": [8, 32, 32]}, workers=1,
                  field_of_view_mm={"sagittal": list(FIELD_OF_VIEW)})
    config = load_config(overrides=[f"data.cache={tmp_path / 'cache'}", "data.plane_size.sagittal=[8,32,32]",
                                    f"finetune.output_dir={tmp_path / 'run'}"])
    # a pipeline built from this run would predict on the whole field of view of a model trained on crops
    with pytest.raises(OrthodiffError, match="field_of_view_mm"):
        run_finetune(config)
