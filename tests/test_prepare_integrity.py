"""prepare: changed sources, full disk, bounded file names, shards, slab fitting, --workers, kill -9."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from orthodiff.cli import main as cli_main
from orthodiff.data.cache import PlaneCache
from orthodiff.data.prepare import prepare_cache, to_plane_tensor
from orthodiff.data.shards import merge_shards, shard_of
from orthodiff.errors import OrthodiffError
from orthodiff.fileio import safe_filename
from orthodiff.io.volume import Volume

SIZE = {"sagittal": [6, 16, 16]}


def _series(path: Path, seed: int, shape=(20, 20, 8)) -> Path:
    """A sagittal NIfTI (slices along L-R) of smooth noise."""
    rng = np.random.default_rng(seed)
    affine = np.array([[0, 0, -3.0, 0], [0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 0, 1]])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(rng.uniform(0, 100, shape).astype(np.float32), affine), str(path))
    return path


def _manifest(tmp_path: Path, ids: list[str], name="manifest.parquet", source=None) -> Path:
    rows = []
    for n, study in enumerate(ids):
        path = source or _series(tmp_path / "archive" / f"{n}.nii.gz", seed=n)
        rows.append(dict(patient_id=f"P{n}", study_id=study, series_id=f"{study}/sagittal", plane="sagittal",
                         path=str(path), format="nifti"))
    manifest = tmp_path / name
    pd.DataFrame(rows).to_parquet(manifest, index=False)
    return manifest


def test_replaced_source_is_prepared_again_and_reported(tmp_path):
    manifest = _manifest(tmp_path, ["a", "b"])
    prepare_cache(manifest, tmp_path / "cache", SIZE, workers=1)
    before = np.asarray(PlaneCache(tmp_path / "cache").image("a/sagittal")).copy()
    source = Path(pd.read_parquet(manifest)["path"][0])
    stat = source.stat()
    _series(source, seed=99)  # another scan under the same name, same size and time stamp
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.stat().st_size == stat.st_size

    again = prepare_cache(manifest, tmp_path / "cache", SIZE, workers=1)
    assert (again.prepared, again.skipped) == (1, 1)
    assert again.changed == ["a/sagittal"] and "1 had a changed source and were prepared again" in again.describe()
    after = np.asarray(PlaneCache(tmp_path / "cache").image("a/sagittal"))
    assert not np.array_equal(before, after)
    record = json.loads((tmp_path / "cache" / "records" / f"{safe_filename('a/sagittal')}.json").read_text())
    assert record["source"]["bytes"] == stat.st_size and len(record["source"]["sha256"]) == 64
    assert prepare_cache(manifest, tmp_path / "cache", SIZE, workers=1).skipped == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch, workers):
    manifest = _manifest(tmp_path, ["a", "b", "c", "d", "e", "f"])
    real_save = np.save
    calls = []

    def save_until_full(handle, array, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:
            handle.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(handle, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_until_full)
    cache = tmp_path / "cache"
    with pytest.raises(OrthodiffError, match=rf"{cache}: the disk is full .*free space there or prepare into another folder"):
        prepare_cache(manifest, cache, SIZE, workers=workers)
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]
    finished = list((cache / "records").glob("*.json"))  # one per process got through, complete
    assert 1 <= len(finished) <= workers
    for record in finished:
        assert np.load(cache / json.loads(record.read_text())["image"]).shape == (1, 6, 16, 16)
    monkeypatch.setattr(np, "save", real_save)
    resumed = prepare_cache(manifest, cache, SIZE, workers=1)
    assert (resumed.skipped, resumed.prepared, len(resumed.errors)) == (len(finished), 6 - len(finished), 0)


def test_long_unicode_ids_get_bounded_distinct_names(tmp_path):
    long_a, long_b = "膝" * 120 + "a", "膝" * 120 + "b"
    ids = [long_a, long_b, "a b", "a?b", "a_b"]
    names = [safe_filename(f"{i}/sagittal") for i in ids]
    assert len(set(names)) == len(names) and max(len(n.encode()) for n in names) <= 200
    assert safe_filename("plain-id_1.0") == "plain-id_1.0"
    manifest = _manifest(tmp_path, ids)
    result = prepare_cache(manifest, tmp_path / "cache", SIZE, workers=1)
    assert (result.prepared, len(result.errors)) == (5, 0), result.describe()
    cache = PlaneCache(tmp_path / "cache")
    assert len({cache.index.set_index("series_id").loc[f"{i}/sagittal", "image"] for i in ids}) == 5


def test_shards_prepare_apart_and_merge_into_the_whole(tmp_path):
    ids = [f"s{n}" for n in range(8)]
    manifest = _manifest(tmp_path, ids)
    whole = prepare_cache(manifest, tmp_path / "whole", SIZE, workers=1)
    assert {shard_of(f"{i}/sagittal", 3) for i in ids} == {1, 2, 3}
    parts = [prepare_cache(manifest, tmp_path / "sharded", SIZE, workers=1, shard=f"{k}/3") for k in (1, 3)]
    with pytest.raises(OrthodiffError, match=r"shard 2/3 is missing or unfinished"):
        merge_shards(manifest, tmp_path / "sharded")
    parts.append(prepare_cache(manifest, tmp_path / "sharded", SIZE, workers=1, shard="2/3"))
    assert sum(p.total for p in parts) == whole.total == 8
    cli_main(["prepare", str(manifest), "--out", str(tmp_path / "sharded"), "--merge"])
    merged, reference = PlaneCache(tmp_path / "sharded"), PlaneCache(tmp_path / "whole")
    assert sorted(merged.index["series_id"]) == sorted(reference.index["series_id"])
    assert merged.fingerprint == reference.fingerprint
    for series_id in reference.index["series_id"]:
        np.testing.assert_array_equal(np.asarray(merged.image(series_id)), np.asarray(reference.image(series_id)))
    with pytest.raises(OrthodiffError, match=r"shard 1/3 was prepared from another manifest than the manifest"):
        merge_shards(pd.read_parquet(manifest).iloc[:7], tmp_path / "sharded")
    # a plain run on the merged cache finds everything done
    assert prepare_cache(manifest, tmp_path / "sharded", SIZE, workers=1).skipped == 8
    with pytest.raises(OrthodiffError, match=r"--shard '0/3': expected I/N|--shard 0/3: I must be between 1 and N"):
        prepare_cache(manifest, tmp_path / "sharded", SIZE, workers=1, shard="0/3")


def test_fit_keeps_an_outer_slice_lesion_that_crop_drops(tmp_path):
    labels = np.zeros((32, 32, 24), np.float32)
    labels[8:24, 8:24, :] = 1
    labels[12:16, 12:16, 1] = 2  # a lesion in the second of 24 slices
    volume = Volume(labels, np.diag([0.5, 0.5, 3.0, 1.0]))
    cropped, _ = to_plane_tensor(volume, "axial", (8, 16, 16), is_label=True)
    fitted, affine = to_plane_tensor(volume, "axial", (8, 16, 16), is_label=True, slab="fit")
    assert 2 not in np.unique(cropped) and 2 in np.unique(fitted)
    assert np.isclose(np.linalg.norm(affine[:3, 0]), 3.0 * 24 / 8)  # 8 slices span the whole slab
    image = np.random.default_rng(0).uniform(0, 10, (32, 32, 24)).astype(np.float32)
    fitted_image, image_affine = to_plane_tensor(Volume(image, volume.affine), "axial", (8, 16, 16), slab="fit")
    assert fitted_image.shape == (1, 8, 16, 16) and np.allclose(image_affine, affine)

    manifest = _manifest(tmp_path, ["a"])
    prepare_cache(manifest, tmp_path / "cache", SIZE, workers=1, slab="fit")
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["slab"] == "fit"
    with pytest.raises(OrthodiffError, match=r"prepared with slab=fit, not crop"):
        prepare_cache(manifest, tmp_path / "cache", SIZE, workers=1)
    with pytest.raises(OrthodiffError, match=r"data.slab='middle'"):
        prepare_cache(manifest, tmp_path / "other", SIZE, workers=1, slab="middle")


@pytest.mark.parametrize("command", [["prepare", "M", "--out", "C"], ["synth", "OUT"]])
def test_workers_below_one_is_one_line(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*command, "--workers", "-3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "orthodiff: error: --workers -3: must be a positive number of processes; omit it to use every core"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _kill_and_wait_for(process, workers: list[int], seconds: float) -> None:
    """kill -9 the parent, then assert that every worker is gone within ``seconds``."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not [pid for pid in workers if _alive(pid)], "pool workers outlived their killed parent"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_kill_9_of_prepare_leaves_no_worker(tmp_path):
    source = _series(tmp_path / "big.nii.gz", seed=0, shape=(160, 160, 40))
    manifest = _manifest(tmp_path, [f"s{n}" for n in range(400)], source=source)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "orthodiff", "prepare", str(manifest), "--out", str(tmp_path / "cache"),
         "--workers", "2", "data.plane_size.sagittal=[8,64,64]"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        workers = []
        while time.monotonic() < deadline and len(workers) < 2:
            assert process.poll() is None, "prepare ended before its workers started"
            workers = [pid for pid in _children(process.pid) if _alive(pid)]
            time.sleep(0.1)
        assert len(workers) >= 2, workers
        time.sleep(1.0)
        _kill_and_wait_for(process, workers, seconds=15)
    finally:
        if process.poll() is None:
            process.kill()


def test_folder_stamp_notices_replaced_added_and_removed_files(tmp_path):
    from orthodiff.data.source_stamp import source_stamp

    folder = tmp_path / "series"
    folder.mkdir()
    for n in range(3):
        (folder / f"{n}.dcm").write_bytes(bytes([n]) * 1000)
    first = source_stamp(folder)
    assert first["bytes"] == 3000
    stat = (folder / "0.dcm").stat()
    (folder / "0.dcm").write_bytes(b"\xff" * 1000)  # same size and time stamp, other content
    os.utime(folder / "0.dcm", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source_stamp(folder)["sha256"] != first["sha256"]
    (folder / "3.dcm").write_bytes(b"x")
    assert source_stamp(folder)["bytes"] == 3001
    (folder / "3.dcm").unlink()
    (folder / "1.dcm").unlink()
    assert source_stamp(folder)["bytes"] == 2000


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_pool_workers_of_any_command_exit_with_their_killed_parent(tmp_path):
    """The initializer every orthodiff process pool uses (prepare, process_map, the bench's cells):
    a worker busy with a long task exits once its parent is killed."""
    script = (
        "import os, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "import multiprocessing\n"
        "from orthodiff.data.workers import one_thread_worker\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "                               initializer=one_thread_worker, initargs=(os.getpid(),))\n"
        "    pool.submit(time.sleep, 300)\n"
        "    time.sleep(300)\n"
    )
    (tmp_path / "parent.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        workers = []
        while time.monotonic() < deadline and not workers:
            workers = [pid for pid in _children(process.pid) if _alive(pid)]
            time.sleep(0.2)
        assert workers, "the pool never started a worker"
        time.sleep(3.0)  # the worker is importing torch or sleeping in its task
        _kill_and_wait_for(process, workers, seconds=30)
    finally:
        if process.poll() is None:
            process.kill()
