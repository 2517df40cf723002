"""Archives as they come from PACS: localizers, derived images, geometry that disagrees between
slices, duplicated files, links and unreadable folders, sequence columns, workers and shards."""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_io_dicom import oblique_affine
from test_scan import write_nifti

from orthodiff.data.manifest import read_manifest
from orthodiff.data.scan import MANIFEST_COLUMNS, scan_archive
from orthodiff.data.sequence import SEQUENCE_COLUMNS, contrast_of, fat_suppressed
from orthodiff.errors import OrthodiffError, ScanError
from orthodiff.io.volume import read_volume_header

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def echo_datasets(knee_dicom_dir: Path) -> list:
    """The 24 slices of echo 1 of the real series, as pydicom datasets (files hold echoes 1-8 per position)."""
    import pydicom

    return [pydicom.dcmread(path) for path in sorted(knee_dicom_dir.iterdir())[0::8]]


def restack(datasets, orientation, step_mm: float, origin=(-40.0, -60.0, 20.0)) -> None:
    """Give the slices one orientation and positions ``step_mm`` apart along its normal (LPS)."""
    normal = np.cross(orientation[:3], orientation[3:])
    for k, dataset in enumerate(datasets):
        dataset.ImageOrientationPatient = [f"{v:g}" for v in orientation]
        dataset.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(origin) + k * step_mm * normal]


def save(datasets, folder: Path, series_uid: str | None = None, **tags) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, dataset in enumerate(datasets):
        if series_uid:
            dataset.SeriesInstanceUID = series_uid
        for keyword, value in tags.items():
            setattr(dataset, keyword, value)
        dataset.InstanceNumber = k + 1
        dataset.save_as(folder / f"IM{k + 1:04d}.dcm")
    return folder


def reasons_for(result, path: Path) -> str:
    return " | ".join(e.reason for e in result.errors if e.path == str(path))


@pytest.fixture
def echo(knee_dicom_dir):
    return lambda: echo_datasets(knee_dicom_dir)


def test_three_plane_localizer_is_refused_and_kept_on_request(echo, tmp_path):
    archive = tmp_path / "archive"
    save(echo(), archive / "exam" / "t2", series_uid="1.2.9.1")  # the diagnostic series
    slices = echo()
    restack(slices[0:8], SAGITTAL, 10.0)
    restack(slices[8:16], CORONAL, 10.0)
    restack(slices[16:24], AXIAL, 10.0)
    loc = save(slices, archive / "exam" / "loc", series_uid="1.2.9.2", SeriesDescription="Loc")
    result = scan_archive(archive, tmp_path / "m.csv", workers=1)
    assert result.manifest["path"].tolist() == [str(archive / "exam" / "t2")]
    text = reasons_for(result, loc)
    assert text.count("multi-plane localizer") == 3 and "--keep-localizers" in text
    assert "echo" not in text  # split by orientation, not taken for echoes

    kept = scan_archive(archive, tmp_path / "k.csv", workers=1, keep_localizers=True).manifest
    parts = kept[kept["path"] == str(loc)].sort_values("plane")
    assert sorted(parts["plane"]) == ["axial", "coronal", "sagittal"]
    assert parts["n_slices"].tolist() == [8, 8, 8]
    assert not parts["series_id"].str.contains("echo").any()
    np.testing.assert_allclose(parts["spacing_slice"], 10.0, atol=1e-3)


def test_mixed_orientation_series_is_split_and_each_part_judged(echo, tmp_path):
    archive = tmp_path / "archive"
    slices = echo()
    restack(slices[:14], SAGITTAL, 3.5)
    restack(slices[14:], CORONAL, 10.0)
    folder = save(slices, archive / "exam" / "mixed")
    result = scan_archive(archive, tmp_path / "m.csv", workers=1)
    frame = result.manifest
    assert frame["plane"].tolist() == ["sagittal"] and frame["n_slices"].tolist() == [14]
    assert frame["series_id"].tolist() == [f"{frame['study_id'].item()}/sagittal"]
    text = reasons_for(result, folder)
    assert "orientation 2 of 2" in text and "localizer" in text and "10 slices" in text
    # The kept part reads back through the manifest: 14 slices of the original pixels.
    from orthodiff.data.manifest import load_series

    volume = load_series(read_manifest(tmp_path / "m.csv").iloc[0])
    assert volume.array.shape == (256, 256, 14)


def test_slices_slightly_off_orientation_are_refused(echo, tmp_path):
    slices = echo()
    restack(slices, SAGITTAL, 4.0)
    tilted = (0.0, 0.9962, -0.0872, 0.0, 0.0872, 0.9962)  # 5 degrees: still sagittal, not one volume
    restack(slices[20:], tilted, 4.0, origin=(40.0, -60.0, 20.0))
    folder = save(slices, tmp_path / "archive" / "exam" / "sag")
    save(echo(), tmp_path / "archive" / "exam" / "ok", series_uid="1.2.9.9")
    result = scan_archive(tmp_path / "archive", tmp_path / "m.csv", workers=1)
    assert "disagree in orientation" in reasons_for(result, folder)


def test_derived_series_are_refused_unless_listed(echo, tmp_path):
    archive = tmp_path / "archive"
    save(echo(), archive / "exam" / "t2", series_uid="1.2.9.1")
    mpr = save(echo(), archive / "exam" / "mpr", series_uid="1.2.9.3", ImageType=["DERIVED", "SECONDARY", "MPR"])
    result = scan_archive(archive, tmp_path / "m.csv", workers=1)
    assert "derived or secondary" in reasons_for(result, mpr)
    assert len(result.manifest) == 1
    (archive / "keep_series.txt").write_text("# reformats we want\n1.2.9.3\n")
    kept = scan_archive(archive, tmp_path / "k.csv", workers=1).manifest
    assert len(kept) == 2 and str(mpr) in set(kept["path"])


def test_mixed_pixel_spacing_is_refused_slice_by_slice(echo, tmp_path):
    slices = echo()
    slices[7].PixelSpacing = ["0.7", "0.7"]
    folder = save(slices, tmp_path / "archive" / "exam" / "t2")
    save(echo(), tmp_path / "archive" / "exam" / "ok", series_uid="1.2.9.9")
    result = scan_archive(tmp_path / "archive", tmp_path / "m.csv", workers=1)
    assert str(folder) not in set(result.manifest["path"])
    text = reasons_for(result, folder)
    assert "PixelSpacing" in text and "IM0008.dcm 0.7x0.7 mm" in text


def test_duplicated_slice_is_named_not_taken_for_a_second_echo(echo, tmp_path):
    folder = save(echo(), tmp_path / "archive" / "exam" / "t2")
    (folder / "IM0005 copy.dcm").write_bytes((folder / "IM0005.dcm").read_bytes())
    save(echo(), tmp_path / "archive" / "exam" / "ok", series_uid="1.2.9.9")
    result = scan_archive(tmp_path / "archive", tmp_path / "m.csv", workers=1)
    text = reasons_for(result, folder)
    assert "duplicated slice" in text and "IM0005 copy.dcm and IM0005.dcm" in text
    assert "echo 2" not in text and "only 1 slice" not in text


def test_sequence_columns_from_dicom_tags(echo, tmp_path):
    archive = tmp_path / "archive"
    save(echo(), archive / "exam" / "pdfs", series_uid="1.2.9.1", SeriesDescription="Sag PD FS", RepetitionTime="3000", EchoTime="30")
    save(echo(), archive / "exam" / "stir", series_uid="1.2.9.2", SeriesDescription="cor", InversionTime="160", ScanOptions=["IR"])
    frame = scan_archive(archive, tmp_path / "m.parquet", workers=1, check_voxels=False).manifest
    assert all(column in frame.columns for column in SEQUENCE_COLUMNS)
    pd_row = frame[frame["path"].str.endswith("pdfs")].iloc[0]
    assert (pd_row.series_description, pd_row.protocol_name) == ("Sag PD FS", "ANONYMIZED")
    assert (pd_row.manufacturer, pd_row.manufacturer_model) == ("GE MEDICAL SYSTEMS", "DISCOVERY MR750")
    assert (pd_row.repetition_time, pd_row.echo_time, pd_row.flip_angle) == (3000.0, 30.0, 90.0)
    assert (pd_row.scanning_sequence, pd_row.sequence_variant, pd_row.acquisition_type) == ("SE", "SK", "2D")
    assert (pd_row.contrast, pd_row.fat_suppressed, pd_row.field_strength) == ("pd", 1.0, 3.0)
    assert np.isnan(pd_row.inversion_time)
    stir_row = frame[frame["path"].str.endswith("stir")].iloc[0]
    assert (stir_row.contrast, stir_row.fat_suppressed, stir_row.inversion_time) == ("stir", 1.0, 160.0)
    assert read_manifest(tmp_path / "m.parquet")["contrast"].tolist() == frame["contrast"].tolist()


def test_nifti_sequence_columns_come_from_the_dcm2niix_sidecar(tmp_path):
    image = write_nifti(tmp_path / "a" / "s1" / "cor_t1.nii.gz", oblique_affine("coronal"))
    write_nifti(tmp_path / "a" / "s1" / "plain.nii.gz", oblique_affine("sagittal"))
    sidecar = {
        "SeriesDescription": "COR T1 TSE", "ProtocolName": "t1_tse_cor", "Manufacturer": "Siemens",
        "ManufacturersModelName": "Skyra", "MagneticFieldStrength": 3, "RepetitionTime": 0.6,
        "EchoTime": 0.012, "FlipAngle": 150, "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"],
        "MRAcquisitionType": "2D", "ScanOptions": "",
    }  # fmt: skip
    (image.parent / "cor_t1.json").write_text(json.dumps(sidecar))
    frame = scan_archive(tmp_path / "a", tmp_path / "m.csv", workers=1).manifest.set_index("plane")
    row = frame.loc["coronal"]
    assert (row.series_description, row.manufacturer, row.manufacturer_model) == ("COR T1 TSE", "Siemens", "Skyra")
    assert (row.repetition_time, row.echo_time, row.flip_angle) == pytest.approx((600.0, 12.0, 150.0))
    assert (row.sequence_variant, row.contrast, row.fat_suppressed, row.field_strength) == ("SK\\SP", "t1", 0.0, 3.0)
    plain = frame.loc["sagittal"]
    assert (plain.series_description, plain.contrast) == ("", "other")
    assert np.isnan(plain.fat_suppressed) and np.isnan(plain.repetition_time)


def test_contrast_rule():
    nan = float("nan")
    assert contrast_of(3000, 30, nan, "") == "pd"
    assert contrast_of(4000, 80, nan, "") == "t2"
    assert contrast_of(500, 12, nan, "") == "t1"
    assert contrast_of(5000, 40, 150, "") == "stir"
    assert contrast_of(5000, 40, nan, "COR TIRM") == "stir"
    assert contrast_of(15, 5, nan, "SAG 3D DESS WE") == "gre"
    assert contrast_of(600, 15, nan, "T2* MEDIC") == "gre"
    assert contrast_of(20, 5, nan, "", scanning_sequence="GR") == "gre"
    assert contrast_of(3000, 30, nan, "AX T2 FS") == "t2"  # the description outranks timing
    assert contrast_of(nan, nan, nan, "") == "other"
    assert fat_suppressed("FAST_GEMS\\FS", "") == 1.0
    assert fat_suppressed(None, "sag_pd_fatsat") == 1.0 and fat_suppressed(None, "PDFS SAG") == 1.0
    assert fat_suppressed("FAST_GEMS", "sag pd") == 0.0
    assert np.isnan(fat_suppressed(None, "sag pd"))


def test_scan_command_prints_contrast_by_plane(echo, tmp_path):
    from typer.testing import CliRunner

    from orthodiff.cli import app

    save(echo(), tmp_path / "arch" / "exam" / "pd", series_uid="1.2.9.1", SeriesDescription="PD FS", RepetitionTime="3000", EchoTime="30")
    result = CliRunner().invoke(app, ["scan", str(tmp_path / "arch"), "--out", str(tmp_path / "m.csv"), "--headers-only", "--workers", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.startswith("contrast"))
    assert header.split() == ["contrast", "sagittal", "coronal", "axial", "total"]
    assert next(line for line in lines if line.startswith("pd ")).split() == ["pd", "1", "0", "0", "1"]
    assert next(line for line in lines if line.strip().startswith("pd fs")).split() == ["pd", "fs", "1", "0", "0", "1"]


def test_symlinked_folders_are_followed_once_and_broken_links_reported(tmp_path):
    archive = tmp_path / "archive"
    write_nifti(archive / "P1" / "visit" / "sag.nii.gz", oblique_affine("sagittal"))
    outside = tmp_path / "elsewhere" / "visit"
    write_nifti(outside / "cor.nii.gz", oblique_affine("coronal"))
    (archive / "P2").mkdir()
    os.symlink(outside, archive / "P2" / "visit")  # a study folder that is a link
    os.symlink(archive / "P1", archive / "P1" / "visit" / "loop")  # a link to its own parent
    os.symlink(tmp_path / "gone", archive / "P3")  # a dangling link
    result = scan_archive(archive, tmp_path / "m.csv", workers=1)
    assert sorted(result.manifest["path"]) == [str(archive / "P1" / "visit" / "sag.nii.gz"), str(archive / "P2" / "visit" / "cor.nii.gz")]
    assert "scanned already" in reasons_for(result, archive / "P1" / "visit" / "loop")
    assert "broken symbolic link" in reasons_for(result, archive / "P3")


def test_unreadable_folders_and_files_are_reported_with_the_real_reason(echo, tmp_path, monkeypatch):
    archive = tmp_path / "archive"
    write_nifti(archive / "P1" / "s1" / "ok.nii.gz", oblique_affine("sagittal"))
    locked = archive / "P2" / "s2"
    write_nifti(locked / "hidden.nii.gz", oblique_affine("sagittal"))
    dicom = save(echo()[:4], archive / "P3" / "s3")
    denied_file = dicom / "IM0002.dcm"
    real_scandir, real_open = os.scandir, builtins.open

    def scandir(path="."):
        if Path(path) == locked:  # chmod 000 cannot stop root, so the denial is simulated
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file) == denied_file:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(builtins, "open", fake_open)
    result = scan_archive(archive, tmp_path / "m.csv", workers=1)
    assert "folder cannot be entered: permission denied" in reasons_for(result, locked)
    assert "permission denied" in reasons_for(result, denied_file)
    assert "corrupt" not in reasons_for(result, denied_file)


def test_vanished_file_is_not_called_corrupt(tmp_path):
    with pytest.raises(ScanError) as error:
        read_volume_header(tmp_path / "gone.nii.gz")
    assert "vanished" in str(error.value) and "corrupt" not in str(error.value)


def test_workers_are_validated_and_give_the_same_manifest(tmp_path):
    from orthodiff.synth import synthesize_archive

    archive = tmp_path / "archive"
    synthesize_archive(archive, joint="knee", studies=3, seed=5, fmt="dicom", workers=1, matrix=32, progress=False)
    one = scan_archive(archive, tmp_path / "one.parquet", workers=1)
    two = scan_archive(archive, tmp_path / "two.parquet", workers=2)
    pd.testing.assert_frame_equal(one.manifest, two.manifest)
    for bad in (0, -3):
        with pytest.raises(OrthodiffError, match="--workers"):
            scan_archive(archive, tmp_path / "bad.parquet", workers=bad)
    assert list(one.manifest.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS


def test_shards_cover_the_archive_once_and_merge_to_the_whole_scan(tmp_path):
    from typer.testing import CliRunner

    from orthodiff.cli import app
    from orthodiff.synth import synthesize_archive

    archive = tmp_path / "archive"
    synthesize_archive(archive, joint="knee", studies=5, seed=2, fmt="nifti", workers=1, matrix=32, progress=False)
    # Two patients' exams both named "visit1" land in different shards: the merge must keep them apart.
    write_nifti(archive / "zz1" / "visit1" / "ax.nii.gz", oblique_affine("axial"))
    write_nifti(archive / "zz2" / "visit1" / "ax.nii.gz", oblique_affine("axial"), seed=1)
    (archive / "broken.nii.gz").write_bytes(b"not a nifti")
    whole = scan_archive(archive, tmp_path / "whole.parquet", workers=1)
    runner = CliRunner()
    for index in (1, 2, 3):
        shard = runner.invoke(app, ["scan", str(archive), "--out", str(tmp_path / f"m.shard{index}.parquet"), "--shard", f"{index}/3", "--workers", "1"])
        assert shard.exit_code == 0, shard.output
    parts = [read_manifest(tmp_path / f"m.shard{index}.parquet") for index in (1, 2, 3)]
    assert sum(len(part) for part in parts) == len(whole.manifest)
    assert all(len(part) for part in parts)
    merged = runner.invoke(app, ["scan", "--merge", *[str(tmp_path / f"m.shard{i}.parquet") for i in (1, 2, 3)], "--out", str(tmp_path / "m.parquet")])
    assert merged.exit_code == 0, merged.output
    frame = read_manifest(tmp_path / "m.parquet")
    key = ["series_id", "study_id", "patient_id", "path", "plane", "contrast", "study_key"]
    assert frame[key].equals(whole.manifest[key])  # same rows in the same order
    assert {"zz1/visit1", "zz2/visit1"} <= set(frame["study_id"])
    errors = pd.read_csv(tmp_path / "m.errors.csv")
    assert errors["path"].tolist() == [str(archive / "broken.nii.gz"), str(tmp_path / "m.parquet")]
    assert "'visit1' names different studies" in errors["reason"].iloc[1]
    bad = runner.invoke(app, ["scan", str(archive), "--out", str(tmp_path / "x.parquet"), "--shard", "4/3"])
    assert bad.exit_code != 0 and "--shard 4/3" in str(bad.exception)
    # More shards than top-level folders: the empty ones still write a manifest the merge joins.
    empty = runner.invoke(app, ["scan", str(archive), "--out", str(tmp_path / "e.parquet"), "--shard", "40/40", "--workers", "1"])
    assert empty.exit_code == 0, empty.output
    assert read_manifest(tmp_path / "e.parquet").empty


def test_scan_command_refuses_a_bad_worker_count_in_one_line(tmp_path, capsys):
    from orthodiff.cli import main

    write_nifti(tmp_path / "arch" / "s1" / "a.nii.gz", oblique_affine("sagittal"))
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as exit_info:
            main(["scan", str(tmp_path / "arch"), "--out", str(tmp_path / "m.csv"), "--workers", bad])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and f"--workers {bad}" in error
    assert not (tmp_path / "m.csv").exists()
