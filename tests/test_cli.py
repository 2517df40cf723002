import errno
import os
import re
import subprocess
import sys

import pytest

from orthodiff.cli import main
from orthodiff.config import load_config


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "orthodiff", *args], capture_output=True, text=True, timeout=60)


def test_help_lists_every_stage():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("synth", "scan", "prepare", "split", "pretrain", "extract", "finetune", "evaluate", "demo", "predict"):
        assert command in result.stdout


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys; from orthodiff.cli import app; "
        "heavy = [m for m in ('torch', 'monai', 'diffusers', 'timm') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == ""


def test_bad_override_is_one_line_on_stderr_with_status_2():
    result = run_cli("pretrain", "pretrain.no_such_key=1")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "pretrain.no_such_key" in lines[0]


USAGE_ERRORS = {
    "unknown option": ["--no-such-option"],
    "unknown command": ["no-such-command"],
    "missing argument": ["scan"],
    "value of the wrong type": ["synth", "archive", "--studies", "abc"],
}


@pytest.mark.parametrize("argv", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_a_usage_error_is_the_usage_and_one_error_line_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert lines[0].startswith("Usage:") and len(lines) <= 3
    assert lines[-1].startswith("Error:")


def test_a_usage_error_from_the_installed_command_has_no_traceback():
    result = run_cli("synth", "archive", "--studies", "abc")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for '--studies': Input should be a valid integer, unable to parse string as an integer"
    )


def test_help_of_config_option_states_the_preset_rule():
    result = subprocess.run([sys.executable, "-m", "orthodiff", "pretrain", "--help"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0
    assert "is always a preset" in result.stdout and "write ./NAME" in result.stdout


def test_an_interrupted_command_says_so_with_status_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("orthodiff.data.splits.make_splits", interrupted)
    with pytest.raises(SystemExit) as info:
        main(["split", "manifest.parquet", "--out", "splits.json"])
    assert info.value.code == 130
    assert capsys.readouterr().err.strip() == "orthodiff: interrupted"


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota exceeded")])
def test_a_full_disk_is_one_line_naming_the_path_with_status_1(code, words, monkeypatch, capsys, tmp_path):
    def disk_full(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "splits.json"))

    monkeypatch.setattr("orthodiff.data.splits.make_splits", disk_full)
    with pytest.raises(SystemExit) as info:
        main(["split", "manifest.parquet", "--out", str(tmp_path / "splits.json")])
    assert info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"orthodiff: error: {words} at {tmp_path / 'splits.json'}; free space and run again"
    ]


def test_predict_on_a_full_disk_names_the_study_folder_and_leaves_no_half_of_it(monkeypatch, capsys,
                                                                                tmp_path_factory, tmp_path):
    from pipeline_fixtures import tiny_pipeline

    from orthodiff.pipeline import predict

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a failed write() does: no file named

    built = tiny_pipeline(tmp_path_factory)
    series = sorted((built["archive"] / "P0001" / "knee-0001").glob("*al.nii.gz"))
    capsys.readouterr()  # what building the session's pipeline printed
    monkeypatch.setattr(predict, "write_json", disk_full)  # prediction.json, after the pictures and segmentations
    out = tmp_path / "predictions"
    with pytest.raises(SystemExit) as info:
        main(["predict", str(built["pipeline"]), *map(str, series), "--out", str(out), "--no-heatmaps"])
    assert info.value.code == 1
    [line] = capsys.readouterr().err.splitlines()
    folder = re.escape(str(out / "knee-0001"))
    assert re.fullmatch(rf"orthodiff: error: no space left on device at {folder}\S*; free space and run again", line)
    left = [path.name for path in out.iterdir()]
    assert not [name for name in left if "knee-0001" in name], left  # neither the study folder nor its staging
    assert not [name for name in left if name.endswith(".csv")], left  # no errors.csv listing a full disk


def test_demo_folder_named_like_a_preset_reads_the_presets(monkeypatch, tmp_path):
    from orthodiff.demo import QUICK, _demo_config, make_demo_folder

    monkeypatch.chdir(tmp_path)  # `orthodiff demo --out demo` outside the checkout
    config = _demo_config(make_demo_folder("demo"), QUICK, seed=0)
    assert config.data.archive == "demo/archive"
    assert config.data.plane_size["sagittal"] == load_config(["demo", "demo-quick"]).data.plane_size["sagittal"]


def test_demo_out_that_is_a_file_is_one_line(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder\n")
    with pytest.raises(SystemExit) as info:
        main(["demo", "--quick", "--out", str(taken)])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"orthodiff: error: --out {taken}: is a file, not a folder; give a folder for the demo's run"
    ]
