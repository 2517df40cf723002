import subprocess
import sys


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
