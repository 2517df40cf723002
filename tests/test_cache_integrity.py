"""Caches and stores that are never stale, never half written, never raced: content-hashed sources,
feature stores tied to the cache's tensors, locks on concurrent runs, truncated files, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from test_prepare_integrity import SIZE, _manifest, _series
from tiny_archive import one_torch_thread, shared_tiny_project, tiny_config  # noqa: F401 (autouse fixture)

from orthodiff.cli import main as cli_main
from orthodiff.data.cache import PlaneCache
from orthodiff.data.prepare import prepare_cache
from orthodiff.errors import OrthodiffError
from orthodiff.fileio import safe_filename
from orthodiff.locks import exclusive


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------- source stamps


def _one_echo(folder: Path, shared_data: Path) -> Path:
    """The first echo (24 slice positions) of the real multi-echo DICOM series, copied into ``folder``."""
    folder.mkdir(parents=True)
    for instance in range(1, 193, 8):  # echoes are interleaved: instances 1, 9, 17, ... are echo 1
        name = f"E3655S8I{instance:03d}.MR.dcm"
        shutil.copy2(shared_data / "knee_mese_t2_dicom" / name, folder / name)
    return folder


def test_same_size_rewrite_of_middle_dicom_files_is_prepared_again(tmp_path, shared_data):
    from orthodiff.data.scan import scan_archive

    series = _one_echo(tmp_path / "archive" / "knee", shared_data)
    manifest = tmp_path / "manifest.parquet"
    scan_archive(tmp_path / "archive", manifest, workers=1)
    size = {"sagittal": [4, 32, 32]}
    prepare_cache(manifest, tmp_path / "cache", size, workers=1)
    series_id = PlaneCache(tmp_path / "cache").index["series_id"][0]
    before = np.asarray(PlaneCache(tmp_path / "cache").image(series_id)).copy()

    files = sorted(series.iterdir())
    for file in files[10:14]:  # the four middle slices, which the 4-slice tensor keeps
        stat, data = file.stat(), bytearray(file.read_bytes())
        pixels = np.frombuffer(bytes(data[-2 * 256 * 256:]), np.uint16)
        data[-2 * 256 * 256:] = pixels[::-1].tobytes()  # the image flipped: same bytes, same size
        file.write_bytes(bytes(data))
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert file.stat().st_size == stat.st_size

    again = prepare_cache(manifest, tmp_path / "cache", size, workers=1)
    assert (again.prepared, again.skipped, again.changed) == (1, 0, [series_id])
    assert not np.array_equal(before, np.asarray(PlaneCache(tmp_path / "cache").image(series_id)))
    assert prepare_cache(manifest, tmp_path / "cache", size, workers=1).skipped == 1


def test_stamp_of_an_older_scheme_prepares_again_without_claiming_a_changed_source(tmp_path):
    manifest = _manifest(tmp_path, ["a"])
    prepare_cache(manifest, tmp_path / "cache", SIZE, workers=1)
    record_path = tmp_path / "cache" / "records" / f"{safe_filename('a/sagittal')}.json"
    record = json.loads(record_path.read_text())
    del record["source"]["scheme"]
    record_path.write_text(json.dumps(record))
    again = prepare_cache(manifest, tmp_path / "cache", SIZE, workers=1)
    assert (again.prepared, again.changed) == (1, [])


# ------------------------------------------------------------------------- prepare's lock


def _prepare_in_thread(manifest: Path, out: Path, results: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(prepare_cache(manifest, out, SIZE, workers=1)))
    thread.start()
    return thread


def test_second_prepare_into_one_folder_waits_and_reports_what_it_did(tmp_path, capsys):
    manifest = _manifest(tmp_path, ["a", "b", "c", "d"])
    cache, results = tmp_path / "cache", []
    with exclusive(cache, "prepare", "prepare"):  # another run holds the cache
        waiting = _prepare_in_thread(manifest, cache, results)
        time.sleep(1.5)
        assert waiting.is_alive() and not (cache / "cache.json").exists() and not results
    waiting.join(timeout=120)
    assert results and (results[0].prepared, results[0].skipped) == (4, 0)
    assert f"another prepare is writing {cache}; waiting for it to finish" in capsys.readouterr().err

    # two runs at once: one prepares everything, the other finds it done; both say so truly
    shutil.rmtree(cache)
    results = []
    threads = [_prepare_in_thread(manifest, cache, results) for _ in range(2)]
    for thread in threads:
        thread.join(timeout=120)
    assert sorted((r.prepared, r.skipped) for r in results) == [(0, 4), (4, 0)]
    assert len(PlaneCache(cache)) == 4


# ------------------------------------------------------------------------- failures and damage


def test_series_that_now_fails_loses_its_old_tensor_and_record(tmp_path):
    manifest = _manifest(tmp_path, ["a", "b"])
    cache = tmp_path / "cache"
    prepare_cache(manifest, cache, SIZE, workers=1)
    name = safe_filename("a/sagittal")
    assert (cache / "images" / f"{name}.npy").exists()
    source = Path(pd.read_parquet(manifest)["path"][0])
    nib.save(nib.Nifti1Image(np.ones((20, 20, 1), np.float32), np.eye(4)), str(source))  # a 2D image now

    again = prepare_cache(manifest, cache, SIZE, workers=1)
    assert [e["series_id"] for e in again.errors] == ["a/sagittal"] and again.skipped == 1
    assert not (cache / "records" / f"{name}.json").exists() and not (cache / "images" / f"{name}.npy").exists()
    assert list(PlaneCache(cache).index["series_id"]) == ["b/sagittal"]


def test_every_series_failing_is_an_error_and_one_bad_among_good_is_not(tmp_path, capsys):
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 1), np.float32), np.eye(4)), str(flat))
    all_bad = _manifest(tmp_path, ["a", "b"], name="bad.parquet", source=flat)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["prepare", str(all_bad), "--out", str(tmp_path / "bad"), "--workers", "1",
                  "data.plane_size.sagittal=[6,16,16]"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "every one of the 2 series failed, so nothing was prepared" in err
    assert len(pd.read_csv(tmp_path / "bad" / "errors.csv")) == 2

    frame = pd.concat([pd.read_parquet(_manifest(tmp_path, ["good"])), pd.read_parquet(all_bad).iloc[:1]])
    frame.to_parquet(tmp_path / "mixed.parquet", index=False)
    cli_main(["prepare", str(tmp_path / "mixed.parquet"), "--out", str(tmp_path / "mixed"), "--workers", "1",
              "data.plane_size.sagittal=[6,16,16]"])
    assert "Prepared 1 of 2 series" in capsys.readouterr().out


def test_plane_size_out_of_bounds_is_one_line_naming_the_field(tmp_path, capsys):
    manifest = _manifest(tmp_path, ["a"])
    for value in ("[8,1e9,32]", "[8,16.5,16]", "[0,16,16]", "[8,16]"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["prepare", str(manifest), "--out", str(tmp_path / "cache"), f"data.plane_size.sagittal={value}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("orthodiff: error: data.plane_size.sagittal: expected")
    assert not (tmp_path / "cache" / "index.parquet").exists()


def test_image_given_as_manifest_is_one_line(tmp_path, capsys):
    image = _series(tmp_path / "scan.nii.gz", seed=0)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["prepare", str(image), "--out", str(tmp_path / "cache")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"orthodiff: error: {image}: not a manifest (a .parquet or .csv table written by `orthodiff scan`); "
        "for images, scan their folder first: `orthodiff scan ARCHIVE --out manifest.parquet`"
    )


def test_truncated_cache_tensor_is_one_line_for_pretrain_and_prepared_again(tmp_path):
    from orthodiff.config import load_config
    from orthodiff.training.pretrain import open_plane_dataset

    manifest = _manifest(tmp_path, ["a", "b"])
    cache = tmp_path / "cache"
    prepare_cache(manifest, cache, SIZE, workers=1)
    tensor = cache / "images" / f"{safe_filename('b/sagittal')}.npy"
    _truncate(tensor)
    cfg = load_config([], [f"data.cache={cache}", f"data.splits={tmp_path / 'none.json'}",
                           "data.plane_size.sagittal=[6,16,16]"])
    with pytest.raises(OrthodiffError) as info:
        open_plane_dataset(cfg, "sagittal")
    assert _one_line(info).startswith(f"{tensor}: this cache tensor is truncated or damaged; run `orthodiff prepare")
    with pytest.raises(OrthodiffError, match="this cache tensor is truncated or damaged"):
        PlaneCache(cache).image("b/sagittal")

    again = prepare_cache(manifest, cache, SIZE, workers=1)
    assert (again.prepared, again.skipped, again.changed) == (1, 1, [])
    assert len(open_plane_dataset(cfg, "sagittal")) == 2


# ------------------------------------------------------------------------- feature stores


@pytest.fixture
def own_project(tmp_path, tmp_path_factory):
    """A small project of its own (its sources get rewritten), with the shared project's denoisers."""
    from tiny_archive import build_tiny_project

    project = build_tiny_project(tmp_path / "project", studies=8)
    project["pretrained"] = shared_tiny_project(tmp_path_factory)["pretrained"]
    return project


def test_store_is_extracted_again_when_prepare_made_a_studys_tensor_anew(own_project, tmp_path):
    from orthodiff.features.store import FeatureStore, run_extraction

    cfg = tiny_config(own_project, tmp_path)
    store = FeatureStore(run_extraction(cfg))
    rows = store.rows("sagittal")
    changed, kept = rows["series_id"][0], rows["series_id"][1]
    before = np.asarray(store.array("sagittal", "mid", "100")).copy()

    cache = PlaneCache(own_project["cache"])
    source = Path(cache.index.set_index("series_id").loc[changed, "path"])
    stat = source.stat()
    image = nib.load(str(source))
    flipped = np.ascontiguousarray(np.asarray(image.dataobj)[::-1])
    nib.save(nib.Nifti1Image(flipped, image.affine, image.header), str(source))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = prepare_cache(own_project["manifest"], own_project["cache"], own_project["plane_size"], workers=1)
    assert again.changed == [changed]

    store = FeatureStore(run_extraction(cfg))
    after = np.asarray(store.array("sagittal", "mid", "100"))
    assert not np.allclose(before[0], after[0]) and np.array_equal(before[1], after[1])
    digests = dict(zip(store.index["series_id"], store.index["cache_sha256"]))
    assert digests[changed] == PlaneCache(own_project["cache"]).content_digest(changed) and kept in digests


def test_truncated_feature_file_is_one_line_for_finetune_and_extracted_again(project, tmp_path):
    from orthodiff.features.store import FeatureStore, feature_file, run_extraction

    cfg = tiny_config(project, tmp_path)
    path = run_extraction(cfg)
    target = path / feature_file("axial", "mid", "100")
    whole = target.read_bytes()
    _truncate(target)
    with pytest.raises(OrthodiffError) as info:
        FeatureStore(path).array("axial", "mid", "100")
    assert _one_line(info).startswith(f"{target}: this feature file is truncated or damaged; run `orthodiff extract`")
    run_extraction(cfg)
    assert target.read_bytes() == whole


def test_truncated_denoiser_weights_are_one_line(project, tmp_path):
    from orthodiff.features.store import run_extraction

    pretrained = tmp_path / "pretrain"
    shutil.copytree(project["pretrained"], pretrained)
    weights = pretrained / "denoisers" / "sagittal" / "model.safetensors"
    _truncate(weights)
    cfg = tiny_config(project, tmp_path, f"finetune.pretrained={pretrained}")
    with pytest.raises(OrthodiffError) as info:
        run_extraction(cfg)
    message = _one_line(info)
    assert message.startswith(f"{weights}: not a readable safetensors file") and "run `orthodiff pretrain` again" in message


def test_two_extractions_into_one_store_write_it_once(project, tmp_path, monkeypatch):
    import orthodiff.features.extractor as extractor_module
    import orthodiff.features.store as store_module

    cfg = tiny_config(project, tmp_path)
    out = Path(cfg.features.output_dir)
    extractors = []

    class CountedExtractor(extractor_module.FeatureExtractor):  # one per plane extracted
        def __init__(self, *args, **kwargs):
            extractors.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(extractor_module, "FeatureExtractor", CountedExtractor)
    from diffusers import DDIMScheduler, DDPMScheduler  # noqa: F401  diffusers' lazy imports are not thread-safe
    paths, failures = [], []

    def run():
        try:
            paths.append(store_module.run_extraction(cfg))
        except Exception as exc:  # noqa: BLE001  a crash of either run is what this test looks for
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures and paths == [out, out] and len(extractors) == 3  # three planes, extracted once
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert len(store_module.FeatureStore(out).rows("sagittal")) > 0


def test_feature_arrays_of_one_target_get_distinct_temporary_files(tmp_path):
    from orthodiff.features.store import _open_arrays, feature_file

    class Extractor:
        def feature_keys(self):
            return [("mid", "100")]

    class Denoiser:
        def feature_shape(self, block):
            return (2, 2, 2, 2)

    first = _open_arrays(tmp_path, "axial", Extractor(), Denoiser(), 3, np.float16)
    second = _open_arrays(tmp_path, "axial", Extractor(), Denoiser(), 3, np.float16)
    with first as one:
        with second as two:
            one[("mid", "100")][:] = 1
            two[("mid", "100")][:] = 2
    assert first.temps != second.temps
    assert np.load(tmp_path / feature_file("axial", "mid", "100")).min() == 1  # the last one renamed wins, whole


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    return shared_tiny_project(tmp_path_factory)
