"""Atomic writes: a folder is replaced whole or not at all."""

import errno
import os
from pathlib import Path

import pytest

from orthodiff.fileio import atomic_directory


def test_atomic_directory_replaces_the_folder_whole(tmp_path):
    target = tmp_path / "study"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as staging:
        (staging / "new.txt").write_text("new")
        assert not (target / "new.txt").exists()  # nothing visible until the block ends
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["study"]  # no staging or old folder left
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # as the umask allows, not mkdtemp's 0700
    assert (target / "new.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_directory_keeps_the_old_folder_when_writing_fails(tmp_path):
    target = tmp_path / "study"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["study"]


def test_format_json_refuses_damaged_and_foreign_files_in_one_line(tmp_path):
    from orthodiff.errors import OrthodiffError
    from orthodiff.fileio import read_format_json

    damaged, foreign, good = tmp_path / "damaged.json", tmp_path / "foreign.json", tmp_path / "good.json"
    damaged.write_text('{"format": "orthodiff-pipeline", ')
    foreign.write_text('{"format": "something-else", "version": 1}')
    good.write_text('{"format": "orthodiff-pipeline", "version": 1}')
    with pytest.raises(OrthodiffError, match="damaged.json: not valid JSON .*save it again") as info:
        read_format_json(damaged, "orthodiff-pipeline", "pipeline", "save it again")
    assert "\n" not in str(info.value)
    with pytest.raises(OrthodiffError, match="foreign.json: not an orthodiff pipeline \\(format 'something-else'\\)"):
        read_format_json(foreign, "orthodiff-pipeline", "pipeline", "save it again")
    assert read_format_json(good, "orthodiff-pipeline", "pipeline", "save it again")["version"] == 1


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), OSError("[errno 28] Error writing bytes to file: No space left on device")],
    ids=["errno", "pyarrow-message"],
)
def test_full_disk_names_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch, failure):
    import pandas as pd

    from orthodiff.fileio import write_table

    target = tmp_path / "manifest.csv"
    target.write_text("old\n")

    def write_half_then_fail(self, path, *args, **kwargs):
        Path(path).write_text("half")
        raise failure

    monkeypatch.setattr(pd.DataFrame, "to_csv", write_half_then_fail)
    with pytest.raises(OSError) as info:
        write_table(target, pd.DataFrame({"a": [1]}))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert "No space left" in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"] and target.read_text() == "old\n"
