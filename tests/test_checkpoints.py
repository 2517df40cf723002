"""Training checkpoints: safetensors + JSON state, no unpickling, fallback past damaged ones."""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from orthodiff.errors import OrthodiffError
from orthodiff.training.checkpoints import damage, list_checkpoints
from orthodiff.training.pretrain import run_pretraining
from orthodiff.training.state_files import load_state, save_state

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_fixtures import one_thread, tiny_config, write_fixture_cache  # noqa: E402

RUN = ("pretrain.plane=sagittal", "pretrain.max_steps=4", "pretrain.checkpoint_every=2")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_fixture_cache(tmp_path_factory.mktemp("cache"), patients=4, planes=["sagittal"])


class _Payload:
    """Unpickling this creates the marker file: proof that a loader ran code from the folder."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_state_round_trip_keeps_types_exactly(tmp_path):
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2)}},
        "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "foreach": None, "params": [0]}],
        "numpy": ("MT19937", np.arange(5, dtype=np.uint32), 2, 0, 0.0),
        "inf": float("inf"),
    }
    save_state(tmp_path, "s", state)
    back = load_state(tmp_path, "s")
    assert list(back["state"]) == [0] and torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["numpy"][1].dtype == np.uint32 and back["numpy"][0] == "MT19937"
    assert back["inf"] == float("inf")


def test_resume_never_unpickles_a_planted_file(cache, tmp_path, capsys):
    run_pretraining(tiny_config(cache, tmp_path, *RUN[:2], "pretrain.max_steps=2"))
    (step, folder), = list_checkpoints(tmp_path / "sagittal" / "checkpoints")
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.bin"))
    marker = tmp_path / "code-ran"
    for name in ("random_states_0.pkl", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"):
        (folder / name).write_bytes(pickle.dumps(_Payload(marker)))
    run_pretraining(tiny_config(cache, tmp_path, *RUN))
    assert "resumed from" in capsys.readouterr().out
    assert not marker.exists(), "a pickle in the checkpoint folder was loaded"
    assert [s for s, _ in list_checkpoints(tmp_path / "sagittal" / "checkpoints")] == [2, 4]


def test_damaged_latest_falls_back_to_intact_and_matches(cache, tmp_path, capsys):
    run_pretraining(tiny_config(cache, tmp_path, *RUN))
    expected = load_file(str(tmp_path / "denoisers" / "sagittal" / "model.safetensors"))
    checkpoints = tmp_path / "sagittal" / "checkpoints"
    latest = checkpoints / "step-000004" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated, as by a full disk
    assert "model.safetensors is 100 bytes" in damage(latest.parent)
    capsys.readouterr()

    run_pretraining(tiny_config(cache, tmp_path, *RUN))
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "resumed from" in line)
    assert "step-000002" in line and "skipped step-000004 is damaged (model.safetensors is 100 bytes" in line
    again = load_file(str(tmp_path / "denoisers" / "sagittal" / "model.safetensors"))
    assert expected.keys() == again.keys() and all(torch.equal(expected[k], again[k]) for k in expected)
    assert damage(checkpoints / "step-000004") is None


def test_all_damaged_is_one_line(cache, tmp_path):
    run_pretraining(tiny_config(cache, tmp_path, *RUN))
    for _, folder in list_checkpoints(tmp_path / "sagittal" / "checkpoints"):
        (folder / "ema.json").write_text("{ not json")
    with pytest.raises(OrthodiffError, match=r"no intact checkpoint to resume from \(step-000004 is damaged .*ema.json"):
        run_pretraining(tiny_config(cache, tmp_path, *RUN, "pretrain.max_steps=6"))
    # run.json itself unreadable: still one line, no traceback
    for _, folder in list_checkpoints(tmp_path / "sagittal" / "checkpoints"):
        (folder / "run.json").write_text("")
    with pytest.raises(OrthodiffError, match=r"run.json is unreadable"):
        run_pretraining(tiny_config(cache, tmp_path, *RUN, "pretrain.max_steps=6"))
    shutil.rmtree(tmp_path / "sagittal" / "checkpoints")
