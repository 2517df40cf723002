"""DICOM folders: echo splitting, slice order, voxel->RAS geometry, damaged files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from orthodiff.errors import ScanError
from orthodiff.io.dicom import (
    index_dicom_files,
    index_dicom_folder,
    looks_like_dicom,
    read_dicom_series,
    read_dicom_volume,
)
from orthodiff.planes import plane_from_affine

LPS = np.diag([-1.0, -1.0, 1.0])
FIXTURE_ECHO_TIMES = [6.312, 12.624, 18.936, 25.248, 31.56, 37.872, 44.184, 50.496]


def write_dicom_series(
    folder: Path,
    array: np.ndarray,
    affine: np.ndarray,
    series_uid: str = "1.2.3.1",
    echo_time: float | None = 20.0,
    first_instance: int = 1,
    image_type=("ORIGINAL", "PRIMARY", "M"),
    slope: float = 1.0,
    intercept: float = 0.0,
    suffix: str = ".dcm",
    tags: dict | None = None,
) -> list[Path]:
    """Write ``array`` (i = columns, j = rows, k = slices) as one DICOM file per slice with the
    geometry of ``affine`` (voxel -> RAS). Stored values are (array - intercept) / slope."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.eye(4)
    lps[:3, :] = LPS @ affine[:3, :]
    row_cosine = lps[:3, 0] / np.linalg.norm(lps[:3, 0])
    column_cosine = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    stored = np.round((array - intercept) / slope).astype(np.int16)
    paths = []
    for k in range(array.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.{first_instance + k}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.ImageType = list(image_type)
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = "1.2.3"
        ds.InstanceNumber = first_instance + k
        ds.ImagePositionPatient = [f"{value:.6f}" for value in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [f"{value:.6f}" for value in (*row_cosine, *column_cosine)]
        ds.PixelSpacing = [f"{np.linalg.norm(lps[:3, 1]):.6f}", f"{np.linalg.norm(lps[:3, 0]):.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(lps[:3, 2]):.3f}"
        if echo_time is not None:
            ds.EchoTime = f"{echo_time:g}"
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.Rows, ds.Columns = array.shape[1], array.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        for keyword, value in (tags or {}).items():
            setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"IM{first_instance + k:04d}{suffix}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def oblique_affine(plane: str, spacing=(0.5, 0.6, 3.0), degrees: float = 12.0, origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """A voxel->RAS affine whose slice normal lies near the plane's patient axis, tilted."""
    base = {
        "sagittal": [[0, 1, 0], [0, 0, -1], [-1, 0, 0]],
        "coronal": [[-1, 0, 0], [0, 0, -1], [0, -1, 0]],
        "axial": [[-1, 0, 0], [0, -1, 0], [0, 0, 1]],
    }[plane]
    angle = np.deg2rad(degrees)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    twist = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = twist @ tilt @ np.asarray(base, float).T @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def test_fixture_reads_as_eight_sagittal_echo_volumes(knee_dicom_dir):
    volumes, problems = index_dicom_folder(knee_dicom_dir)
    assert problems == []
    assert len(volumes) == 8
    assert [v.echo_index for v in volumes] == list(range(8))
    np.testing.assert_allclose([v.echo_time for v in volumes], FIXTURE_ECHO_TIMES)
    for volume in volumes:
        assert volume.shape == (256, 256, 24)  # (cols, rows, slices): 24 slices of 256 x 256
        assert plane_from_affine(volume.affine) == "sagittal"
        spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
        # 3 mm thick slices with a 1 mm gap: the step between positions is 4 mm.
        np.testing.assert_allclose(spacing, [0.625, 0.625, 4.0], atol=1e-3)
        normal = volume.affine[:3, 2] / np.linalg.norm(volume.affine[:3, 2])
        # README: about (-0.989, -0.025, 0.144) in DICOM LPS, i.e. (0.989, 0.025, 0.144) in RAS.
        np.testing.assert_allclose(normal, [0.989, 0.025, 0.144], atol=2e-3)
    assert len({path for v in volumes for path in v.files}) == 192


def test_fixture_geometry_and_voxels_match_simpleitk(knee_dicom_dir):
    import SimpleITK as sitk

    volumes, _ = index_dicom_folder(knee_dicom_dir)
    first = volumes[0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(path) for path in first.files])
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    image = reader.Execute()
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    expected = np.eye(4)
    expected[:3, :3] = LPS @ direction @ np.diag(image.GetSpacing())
    expected[:3, 3] = LPS @ np.asarray(image.GetOrigin())
    np.testing.assert_allclose(first.affine, expected, atol=1e-3)
    volume = read_dicom_volume(first)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def test_read_dicom_series_picks_an_echo_and_refuses_to_guess(knee_dicom_dir):
    last = read_dicom_series(knee_dicom_dir, echo_index=7)
    assert last.array.shape == (256, 256, 24) and last.array.dtype == np.float32
    assert last.meta["echo_time"] == pytest.approx(50.496)
    first = read_dicom_series(knee_dicom_dir, series_uid="2.25.104491756213133361843376561617585069749", echo_index=0)
    assert first.array.mean() > last.array.mean()  # T2 decay: the first echo is brighter
    with pytest.raises(ScanError, match="holds 8 volumes"):
        read_dicom_series(knee_dicom_dir)


def test_round_trip_of_an_oblique_axial_series_with_rescale(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 500, size=(12, 10, 5)).astype(np.float32) * 2 - 10
    affine = oblique_affine("axial")
    written = write_dicom_series(tmp_path / "ax", array, affine, slope=2.0, intercept=-10.0, suffix="")
    # Slice order must come from positions, not from file names.
    for path in written[:2]:
        path.rename(path.with_name("z" + path.name))
    volume = read_dicom_series(tmp_path / "ax")
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(volume.array, array)
    assert plane_from_affine(volume.affine) == "axial"
    assert volume.meta["echo_index"] == -1


def test_repeated_positions_split_into_separate_contrasts(tmp_path):
    affine = oblique_affine("coronal")
    first = np.full((8, 8, 4), 100.0) + np.arange(4)
    second = np.full((8, 8, 4), 300.0) + np.arange(4)
    write_dicom_series(tmp_path / "cor", first, affine, echo_time=None, first_instance=1)
    write_dicom_series(tmp_path / "cor", second, affine, echo_time=None, first_instance=5)
    volumes, problems = index_dicom_folder(tmp_path / "cor")
    assert problems == []
    assert [v.echo_index for v in volumes] == [0, 1]
    np.testing.assert_array_equal(read_dicom_volume(volumes[0]).array, first)
    np.testing.assert_array_equal(read_dicom_volume(volumes[1]).array, second)


def test_truncated_file_drops_only_its_echo(knee_dicom_dir, tmp_path):
    folder = tmp_path / "mese"
    folder.mkdir()
    volumes, _ = index_dicom_folder(knee_dicom_dir)
    for path in volumes[0].files + volumes[1].files:
        shutil.copyfile(path, folder / path.name)
    victim = folder / volumes[1].files[5].name
    victim.write_bytes(victim.read_bytes()[:40000])
    kept, problems = index_dicom_folder(folder)
    assert [v.echo_time for v in kept] == [pytest.approx(6.312)]
    reasons = {path.name: reason for path, reason in problems}
    assert "truncated" in reasons[victim.name]
    assert any(victim.name in reason and "echo 2" in reason for reason in reasons.values())


def test_localizer_is_indexed_for_the_scan_to_judge_and_too_few_slices_are_problems(tmp_path):
    affine = oblique_affine("sagittal")
    write_dicom_series(tmp_path / "loc", np.ones((8, 8, 3)) * np.arange(3), affine, series_uid="9.1", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_dicom_series(tmp_path / "two", np.ones((8, 8, 2)) * np.arange(2), affine, series_uid="9.2")
    volumes, problems = index_dicom_files(sorted((tmp_path / "loc").iterdir()) + sorted((tmp_path / "two").iterdir()))
    # The reader indexes a localizer (so one kept on purpose can be read); the scan refuses it.
    assert [v.series_uid for v in volumes] == ["9.1"] and "LOCALIZER" in volumes[0].image_type
    text = " | ".join(reason for _, reason in problems)
    assert "only 2 slice" in text


def test_dicom_detection_by_preamble_or_header(tmp_path, knee_dicom_dir):
    original = sorted(knee_dicom_dir.iterdir())[0]
    no_suffix = tmp_path / "IM0001"
    shutil.copyfile(original, no_suffix)
    notes = tmp_path / "notes"
    notes.write_text("not an image\n" * 20)
    assert looks_like_dicom(no_suffix)
    assert not looks_like_dicom(notes)


def test_uncompressed_pixels_read_from_their_bytes_equal_pydicom(knee_dicom_dir, tmp_path):
    import pydicom

    from orthodiff.io.dicom import _native_pixels

    dataset = pydicom.dcmread(sorted(knee_dicom_dir.iterdir())[0])  # big-endian, signed 16 bit
    np.testing.assert_array_equal(_native_pixels(dataset), dataset.pixel_array)
    written = write_dicom_series(tmp_path / "le", np.arange(6 * 5 * 3).reshape(6, 5, 3) - 20.0, oblique_affine("axial"))
    little = pydicom.dcmread(written[1])
    np.testing.assert_array_equal(_native_pixels(little), little.pixel_array)
    dataset.BitsStored = 12  # values beyond the stored bits are pydicom's to mask: no shortcut
    assert _native_pixels(dataset) is None
