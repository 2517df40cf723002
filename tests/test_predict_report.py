"""The predict report's pictures show the series as acquired: at its own resolution (not the plane
tensor's few pixels), arranged as the plane tensor is, with square pixels."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from pipeline_fixtures import PLANE_SIZE, tiny_pipeline

from orthodiff.pipeline.predict import run_prediction
from orthodiff.pipeline.report import MIN_PIXELS, SourceView, heatmap_png, segmentation_png

GAP = 2  # columns between two slices of a picture, before enlargement


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory)


def _png_size(path: Path) -> tuple[int, int]:
    """(height, width) from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def test_report_pictures_are_at_the_source_resolution(built, knee_dicom_dir, tmp_path):
    import pydicom

    exam = tmp_path / "exam"
    exam.mkdir()
    for path in sorted(knee_dicom_dir.glob("*.dcm")):  # one echo: 24 slices of 256 x 256 pixels
        if int(pydicom.dcmread(path, stop_before_pixels=True).EchoNumbers) == 1:
            (exam / path.name).write_bytes(path.read_bytes())
    run_prediction(built["pipeline"], [exam], tmp_path / "out")
    (study,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    summary = json.loads((study / "prediction.json").read_text())
    entry = summary["series"]["sagittal"]
    assert entry["shape"] == [256, 256, 24] and max(PLANE_SIZE) < 256
    pictures = [entry["segmentation"]["png"]] + [heat["png"] for heat in entry["heatmaps"].values()]
    assert len(pictures) == 3
    for name in pictures:  # three slices of 256 x 256 side by side, 0.625 mm square pixels
        assert _png_size(study / name) == (256, 3 * 256 + 2 * GAP), name
    report = (study / "report.html").read_text()
    assert all(name in report for name in pictures)


def test_the_source_view_is_the_plane_tensor_without_resampling(knee_dicom_dir):
    """Arranged like the plane tensor: prepared at the series' own size, the tensor is the same
    picture as the source view (same orientation, same grey levels up to the [-1, 1] scaling)."""
    from orthodiff.data.prepare import to_plane_tensor
    from orthodiff.io.dicom import read_dicom_series

    volume = read_dicom_series(knee_dicom_dir, echo_index=0)
    tensor, tensor_affine = to_plane_tensor(volume, "sagittal", (24, 256, 256))
    view = SourceView(volume.array, volume.affine, tensor_affine)
    assert view.image.shape == tensor.shape[1:]
    np.testing.assert_allclose(view.image * 2 - 1, tensor[0], atol=1e-3)
    flipped = SourceView(volume.array[::-1], volume.affine @ _flip_first_axis(volume.array.shape[0]), tensor_affine)
    np.testing.assert_allclose(flipped.image, view.image, atol=1e-6)  # the affine decides, not the storage order


def _flip_first_axis(size: int) -> np.ndarray:
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, size - 1
    return flip


def test_anisotropic_pixels_are_drawn_square(tmp_path):
    # source voxels: i 0.5 mm (x), j 1.0 mm (y), k 3 mm (z); the tensor runs d along z, h along y, w along x
    source_affine = np.diag([0.5, 1.0, 3.0, 1.0])
    tensor_affine = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [3, 0, 0, 0], [0, 0, 0, 1]], float)
    image = np.random.default_rng(0).normal(size=(64, 40, 6)).astype(np.float32)
    labels = (image > 1).astype(np.uint8)
    view = SourceView(image, source_affine, tensor_affine)
    assert view.image.shape == (6, 40, 64) and view.aspect == pytest.approx(2.0)
    # 40 rows of 1 mm against 64 columns of 0.5 mm: 80 x 64 square pixels, enlarged to at least MIN_PIXELS rows
    scale = -(-MIN_PIXELS // 80)
    expected = (80 * scale, 3 * 64 * scale + 2 * GAP * scale)
    assert _png_size(segmentation_png(tmp_path / "seg.png", view, labels)) == expected
    assert _png_size(heatmap_png(tmp_path / "heat.png", view, np.clip(image, 0, 1))) == expected
