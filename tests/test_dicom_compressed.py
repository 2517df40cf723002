"""Compressed DICOM: the real series re-encoded in each lossless transfer syntax reads voxel for voxel."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from orthodiff.data.scan import scan_archive
from orthodiff.errors import ScanError
from orthodiff.io.dicom import index_dicom_folder, read_dicom_series

SYNTAXES = ["RLELossless", "JPEG2000Lossless", "JPEGLSLossless"]


def first_echo_files(knee_dicom_dir: Path) -> list[Path]:
    """The 24 files of echo 1 (the fixture stores echoes 1-8 of each position in name order)."""
    return sorted(knee_dicom_dir.iterdir())[0::8]


def encode_series(files: list[Path], folder: Path, syntax_name: str) -> None:
    """Write ``files`` re-encoded in ``syntax_name`` (the fixture is big-endian: re-encode little)."""
    import pydicom
    import pydicom.uid

    syntax = getattr(pydicom.uid, syntax_name)
    folder.mkdir(parents=True)
    for path in files:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
        for _ in dataset:  # decode every element from the big-endian source
            pass
        dataset.compress(syntax, pixels.astype(pixels.dtype.newbyteorder("<")))
        dataset.set_original_encoding(False, True)
        dataset.save_as(folder / path.name)
        assert pydicom.dcmread(folder / path.name, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax


def test_every_common_compressed_syntax_has_a_decoder():
    """JPEG baseline/extended/lossless (GE's Process 14 SV1), JPEG-LS, JPEG 2000 and RLE: pydicom
    finds an installed decoder for each (no encoder exists for some, so not all are round-tripped)."""
    import pydicom.uid
    from pydicom.pixels import get_decoder

    names = [
        "JPEGBaseline8Bit", "JPEGExtended12Bit", "JPEGLossless", "JPEGLosslessSV1",
        "JPEGLSLossless", "JPEGLSNearLossless", "JPEG2000Lossless", "JPEG2000", "RLELossless",
    ]  # fmt: skip
    missing = [name for name in names if not get_decoder(getattr(pydicom.uid, name)).is_available]
    assert missing == []


@pytest.mark.parametrize("syntax_name", SYNTAXES)
def test_compressed_series_reads_equal_to_the_uncompressed_one(knee_dicom_dir, tmp_path, syntax_name):
    files = first_echo_files(knee_dicom_dir)
    plain = tmp_path / "plain"
    plain.mkdir()
    for path in files:
        shutil.copyfile(path, plain / path.name)
    encode_series(files, tmp_path / syntax_name, syntax_name)
    expected = read_dicom_series(plain)
    decoded = read_dicom_series(tmp_path / syntax_name)
    assert decoded.array.shape == (256, 256, 24)
    np.testing.assert_array_equal(decoded.array, expected.array)
    np.testing.assert_allclose(decoded.affine, expected.affine)


def test_scan_accepts_a_compressed_series_with_full_voxel_check(knee_dicom_dir, tmp_path):
    files = first_echo_files(knee_dicom_dir)[:12]
    encode_series(files, tmp_path / "archive" / "exam" / "j2k", "JPEG2000Lossless")
    volumes, problems = index_dicom_folder(tmp_path / "archive" / "exam" / "j2k")
    assert problems == [] and len(volumes) == 1
    result = scan_archive(tmp_path / "archive", tmp_path / "m.csv", workers=1)
    assert result.errors == []
    assert result.manifest["n_slices"].tolist() == [12]


def damage_rle_frame(path: Path) -> None:
    """Point the second RLE segment into the middle of the first, as one flipped header byte does."""
    import struct

    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    dataset = pydicom.dcmread(path)
    frame = bytearray(next(generate_frames(dataset.PixelData, number_of_frames=1)))
    first, second = struct.unpack("<2I", frame[4:12])
    frame[8:12] = struct.pack("<I", (first + second) // 2)
    dataset.PixelData = encapsulate([bytes(frame)])
    dataset.save_as(path)


def test_a_panicking_decoder_costs_only_the_damaged_series(knee_dicom_dir, tmp_path):
    import pydicom

    files = first_echo_files(knee_dicom_dir)[:6]
    archive = tmp_path / "archive"
    encode_series(files, archive / "good" / "rle", "RLELossless")
    encode_series(files, archive / "bad" / "rle", "RLELossless")
    damaged = sorted((archive / "bad" / "rle").iterdir())[2]
    damage_rle_frame(damaged)
    with pytest.raises(BaseException) as panic:  # pylibjpeg-rle panics: not an Exception
        _ = pydicom.dcmread(damaged).pixel_array
    assert not isinstance(panic.value, Exception)

    with pytest.raises(ScanError, match=f"{damaged.name}: DICOM pixel data .*cannot be decoded .*decoder crashed"):
        read_dicom_series(archive / "bad" / "rle")
    result = scan_archive(archive, tmp_path / "m.csv", workers=1)
    assert result.manifest["path"].tolist() == [str(archive / "good" / "rle")]
    reasons = [problem.reason for problem in result.errors if problem.path == str(archive / "bad" / "rle")]
    assert len(reasons) == 1 and damaged.name in reasons[0] and "re-export it" in reasons[0]
