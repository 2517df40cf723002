"""What a scan must never do quietly: read a mirrored volume, drop a hidden series, merge half an
archive or two archives, stop the run for one damaged file, leave a half manifest on a full disk."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import pytest
from test_io_dicom import oblique_affine
from test_scan import write_itk, write_nifti
from test_scan_archives import echo_datasets, reasons_for, save

from orthodiff.data.scan import scan_archive
from orthodiff.errors import OrthodiffError, ScanError
from orthodiff.io.dicom import read_dicom_series
from orthodiff.io.volume import read_volume

# --- voxel sizes that would turn the image around ---------------------------------------------


def test_dicom_series_with_a_non_positive_pixel_spacing_is_refused_and_the_rest_kept(knee_dicom_dir, tmp_path):
    archive = tmp_path / "archive"
    save(echo_datasets(knee_dicom_dir)[:6], archive / "P1" / "good")
    bad = save(echo_datasets(knee_dicom_dir)[:6], archive / "P2" / "bad", series_uid="1.2.3.4",
               PixelSpacing=["-0.625", "0.625"])
    # The slice axis comes from positions: a negative SpacingBetweenSlices, as some scanners write, is kept.
    odd = save(echo_datasets(knee_dicom_dir)[:6], archive / "P3" / "odd", series_uid="1.2.3.5",
               SpacingBetweenSlices="-4", SliceThickness="0")
    result = scan_archive(archive, tmp_path / "m.csv", workers=1)
    assert sorted(result.manifest["path"].tolist()) == [str(archive / "P1" / "good"), str(odd)]
    reason = reasons_for(result, bad)
    assert "PixelSpacing -0.625" in reason and "IM0001.dcm is not a positive number of mm" in reason
    assert "mirrored" in reason
    with pytest.raises(ScanError, match="PixelSpacing"):  # prepare and predict read through the same index
        read_dicom_series(bad)


def set_pixdim(path: Path, axis: int, value: float) -> Path:
    """Write ``value`` into pixdim[axis] of a NIfTI-1 file as stored (nibabel's writer would fix it)."""
    raw = bytearray(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())
    raw[76 + 4 * axis : 80 + 4 * axis] = struct.pack("<f", value)
    path.write_bytes(gzip.compress(bytes(raw)) if path.suffix == ".gz" else bytes(raw))
    return path


def test_nifti_and_metaimage_with_non_positive_voxel_sizes_are_refused(tmp_path):
    archive = tmp_path / "archive"
    good = write_nifti(archive / "s1" / "good.nii.gz", oblique_affine("sagittal"))
    negative = set_pixdim(write_nifti(archive / "s2" / "negative.nii.gz", oblique_affine("coronal")), 1, -0.5)
    zero = set_pixdim(write_nifti(archive / "s3" / "zero.nii", oblique_affine("axial")), 3, 0.0)
    mha = write_itk(archive / "s4" / "flipped.mha", oblique_affine("sagittal"))
    mha.write_bytes(mha.read_bytes().replace(b"ElementSpacing = ", b"ElementSpacing = -", 1))
    result = scan_archive(archive, tmp_path / "m.csv", workers=1)
    assert result.manifest["path"].tolist() == [str(good)]
    assert "NIfTI pixdim (-0.5 " in reasons_for(result, negative)
    assert "NIfTI pixdim (0.5 0.6 0) is not a positive voxel size" in reasons_for(result, zero)  # nibabel reads 1 mm
    assert "spacing (-0.5 " in reasons_for(result, mha)
    for path in (negative, zero, mha):
        with pytest.raises(ScanError, match="mirrored or flat"):
            read_volume(path)


# --- hidden files and folders -------------------------------------------------------------------


def test_hidden_entries_holding_scans_are_reported_and_system_files_stay_silent(knee_dicom_dir, tmp_path):
    archive = tmp_path / "archive"
    good = write_nifti(archive / "P1" / "visit" / "sag.nii.gz", oblique_affine("sagittal"))
    hidden_file = write_nifti(archive / "P1" / "visit" / ".cor.nii.gz", oblique_affine("coronal"))
    write_nifti(archive / ".exam2" / "visit" / "ax.nii.gz", oblique_affine("axial"))
    (archive / "P2").mkdir()
    shutil.copyfile(sorted(knee_dicom_dir.iterdir())[0], archive / "P2" / ".IM0001")  # a DICOM slice by its preamble
    (archive / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (archive / "P1" / "visit" / "._sag.nii.gz").write_bytes(b"\x00\x05\x16\x07" + bytes(80))  # macOS AppleDouble
    (archive / ".Trash").mkdir()
    (archive / ".Trash" / "notes.txt").write_text("nothing to scan")
    result = scan_archive(archive, tmp_path / "m.csv", workers=1)
    assert result.manifest["path"].tolist() == [str(good)]
    assert sorted(Path(problem.path).name for problem in result.errors) == [".IM0001", ".cor.nii.gz", ".exam2"]
    assert "hidden file holds a readable scan but was skipped because its name starts with '.'" in reasons_for(result, hidden_file)
    assert "hidden folder holds a readable scan (.exam2/visit/ax.nii.gz)" in reasons_for(result, archive / ".exam2")
    assert ".exam2" in result.describe()  # the summary names it too

    shards = [scan_archive(archive, tmp_path / f"s{i}.csv", workers=1, shard=(i, 2)) for i in (1, 2)]
    assert [sum(Path(p.path).name == ".exam2" for p in shard.errors) for shard in shards] == [1, 0]


# --- merging shards -----------------------------------------------------------------------------


def small_archive(root: Path, patients: int = 3) -> Path:
    for index in range(patients):
        write_nifti(root / f"P{index}" / "visit" / "sag.nii.gz", oblique_affine("sagittal"), seed=index)
    return root


def test_merge_refuses_a_missing_shard_and_shards_of_other_archives_in_one_line(tmp_path):
    from orthodiff.data.scan_merge import merge_scan_shards

    archive, other = small_archive(tmp_path / "archive"), small_archive(tmp_path / "other")
    first, second = (scan_archive(archive, tmp_path / f"a{i}.parquet", workers=1, shard=(i, 2)).manifest_path for i in (1, 2))
    foreign = scan_archive(other, tmp_path / "b2.parquet", workers=1, shard=(2, 2)).manifest_path

    def refusal(manifests) -> str:
        with pytest.raises(OrthodiffError) as info:
            merge_scan_shards(manifests, tmp_path / "m.parquet")
        assert "\n" not in str(info.value) and not (tmp_path / "m.parquet").exists()
        return str(info.value)

    assert f"shard(s) 2/2 of {archive} missing; scan each with `orthodiff scan {archive} --shard 2/2" in refusal([first])
    mixed = refusal([first, foreign])
    assert f"different archives ({archive} in a1.parquet, {other} in b2.parquet)" in mixed
    assert "given twice" in refusal([first, first])
    assert len(merge_scan_shards([first, second], tmp_path / "whole.parquet").manifest) == 3

    write_nifti(archive / "P00" / "visit" / "sag.nii.gz", oblique_affine("sagittal"))  # shifts the shares
    rescanned = scan_archive(archive, tmp_path / "a2new.parquet", workers=1, shard=(2, 2)).manifest_path
    assert f"{archive} changed between shards" in refusal([first, rescanned])
    scan_archive(archive, first, workers=1)  # a whole scan written over a shard's manifest is no shard
    assert "a1.shard.json: shard record not found" in refusal([first, second])


# --- a full disk --------------------------------------------------------------------------------


def test_full_disk_while_writing_the_manifest_is_one_line_and_leaves_no_half_file(tmp_path, monkeypatch, capsys):
    import errno

    import pandas as pd

    from orthodiff.cli import main

    archive = small_archive(tmp_path / "archive", patients=1)
    out = tmp_path / "runs" / "manifest.parquet"

    def full_disk(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PAR1 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        main(["scan", str(archive), "--out", str(out), "--workers", "1"])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "no space left" in error and str(out) in error
    assert sorted(p.name for p in out.parent.iterdir()) == ["manifest.errors.csv"]  # no manifest, no temporary file
