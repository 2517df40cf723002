"""`orthodiff pretrain`: two-process training, exact resume, learning, tracking and bad input.

Every run is a tiny denoiser (base 8, multipliers 1,2) on 8 x 16 x 16 volumes of a cache written
to the prepare contract by tests/pretrain_fixtures.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orthodiff.cli import main as cli_main
from orthodiff.errors import OrthodiffError
from orthodiff.models.denoiser import Denoiser
from orthodiff.models.diffusion import denoising_loss, make_noise_scheduler
from orthodiff.training import pretrain
from orthodiff.training.checkpoints import list_checkpoints
from orthodiff.training.pretrain import initial_denoiser, run_pretraining
from orthodiff.training.sampling import StepSeededBatchSampler, derived_seed
from orthodiff.training.tracking import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_fixtures import (  # noqa: E402
    one_thread,
    preempt_after_checkpoint,
    read_wandb_history,
    tiny_config,
    write_fixture_cache,
    write_splits,
)

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_fixture_cache(tmp_path_factory.mktemp("cache"), patients=6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weights(path: Path) -> dict:
    return load_file(str(path))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)


def _differ(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[n], b[n], rtol=0, atol=1e-7) for n in a)


@pytest.mark.slow
def test_two_cpu_processes_train_in_sync(cache, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(SCRIPTS / "pretrain_two_ranks.py"), str(cache), str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        info = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert info == {"distributed_type": "DistributedType.MULTI_CPU", "num_processes": 2}

    rank0, rank1 = _weights(tmp_path / "rank-0.safetensors"), _weights(tmp_path / "rank-1.safetensors")
    _assert_same(rank0, rank1)

    # One checkpoint per saved step, written by the main process only (RNG state from both ranks).
    checkpoints = list_checkpoints(tmp_path / "sagittal" / "checkpoints")
    assert [step for step, _ in checkpoints] == [2, 4]
    for _, path in checkpoints:
        assert len(list(path.glob("model*.safetensors"))) == 1
        assert sorted(p.name for p in path.glob("rng-*.json")) == ["rng-0.json", "rng-1.json"]
        assert not list(path.glob("*.pkl")) and not list(path.glob("*.bin"))
    assert not list((tmp_path / "sagittal" / "checkpoints").glob(".*"))
    assert [r["step"] for r in read_metrics(tmp_path / "sagittal" / "metrics.jsonl")] == [1, 2, 3, 4]
    _assert_same(_weights(checkpoints[-1][1] / "model.safetensors"), rank0)

    ema = _weights(tmp_path / "denoisers" / "sagittal" / "model.safetensors")
    cfg = tiny_config(cache, tmp_path)
    initial = {k: v.detach() for k, v in initial_denoiser(cfg, "sagittal").state_dict().items()}
    assert _differ(ema, rank0), "EMA weights equal the raw weights"
    assert _differ(ema, initial), "EMA weights equal the initial weights"
    assert _differ(rank0, initial), "training did not change the weights"

    # Their checkpoint is not resumed by one process: its batches, noise and LR schedule were the two ranks'.
    with pytest.raises(OrthodiffError, match=r"^checkpoint \S+step-000004 was written by 2 processes, this run has 1: "
                                             r"resume with 2 processes, or start a new output folder"):
        run_pretraining(tiny_config(cache, tmp_path, "pretrain.max_steps=6"))


def test_resume_continues_exactly(cache, tmp_path, monkeypatch):
    overrides = ("pretrain.max_steps=3", "pretrain.checkpoint_every=2", "pretrain.gradient_accumulation_steps=2")
    run_pretraining(tiny_config(cache, tmp_path / "straight", *overrides))

    # Stop the second run right after its step-2 checkpoint, then start it again.
    resumed_cfg = tiny_config(cache, tmp_path / "resumed", *overrides)
    preempt_after_checkpoint(monkeypatch, resumed_cfg, step=2)
    assert not (tmp_path / "resumed" / "denoisers").exists()
    run_pretraining(resumed_cfg)

    for run in ("straight", "resumed"):
        assert [s for s, _ in list_checkpoints(tmp_path / run / "sagittal" / "checkpoints")] == [2, 3]
    straight_metrics = read_metrics(tmp_path / "straight" / "sagittal" / "metrics.jsonl")
    resumed_metrics = read_metrics(tmp_path / "resumed" / "sagittal" / "metrics.jsonl")
    assert [m["step"] for m in resumed_metrics] == [1, 2, 3]
    assert [m["loss"] for m in resumed_metrics] == [m["loss"] for m in straight_metrics]
    for relative in ("sagittal/checkpoints/step-000003/model.safetensors", "denoisers/sagittal/model.safetensors"):
        _assert_same(_weights(tmp_path / "resumed" / relative), _weights(tmp_path / "straight" / relative))


def test_killed_run_resumes_with_the_uninterrupted_metrics_log(cache, tmp_path, monkeypatch):
    """Killed (think kill -9) after a checkpoint and a logged step past it: the rows past the checkpoint are
    redone, and each row's loss, which averages the steps since the previous row, is the uninterrupted run's."""
    overrides = ("pretrain.max_steps=6", "pretrain.checkpoint_every=3", "pretrain.log_every=2")
    run_pretraining(tiny_config(cache, tmp_path / "straight", *overrides))
    original = pretrain._Loop.train_step

    def killed_at_step_5(loop, batches):
        if loop.progress.step == 4:
            raise KeyboardInterrupt("killed")
        return original(loop, batches)

    monkeypatch.setattr(pretrain._Loop, "train_step", killed_at_step_5)
    resumed_cfg = tiny_config(cache, tmp_path / "resumed", *overrides)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(resumed_cfg)
    metrics_path = tmp_path / "resumed" / "sagittal" / "metrics.jsonl"
    assert [row["step"] for row in read_metrics(metrics_path)] == [2, 4]  # step 4 was logged after checkpoint 3
    monkeypatch.setattr(pretrain._Loop, "train_step", original)
    run_pretraining(resumed_cfg)

    straight = read_metrics(tmp_path / "straight" / "sagittal" / "metrics.jsonl")
    resumed = read_metrics(metrics_path)
    assert [row["step"] for row in resumed] == [2, 4, 6]
    for a, b in zip(straight, resumed):
        assert {k: v for k, v in a.items() if k != "volumes_per_s"} == {k: v for k, v in b.items() if k != "volumes_per_s"}


def test_full_disk_while_checkpointing_leaves_no_temporary_folder(cache, tmp_path, monkeypatch):
    import errno

    from orthodiff.training import checkpoints

    original = checkpoints.save_state

    def disk_full_at_step_2(folder, name, state):
        if name == "optimizer" and "step-000002" in str(folder):  # after the RNG, window and model files
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "optimizer.safetensors"))
        return original(folder, name, state)

    monkeypatch.setattr(checkpoints, "save_state", disk_full_at_step_2)
    with pytest.raises(OSError) as full:
        run_pretraining(tiny_config(cache, tmp_path, "pretrain.max_steps=3", "pretrain.checkpoint_every=1"))
    assert full.value.errno == errno.ENOSPC
    folder = tmp_path / "sagittal" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001"]
    assert checkpoints.damage(folder / "step-000001") is None


def test_checkpoint_of_another_process_count_is_refused_in_one_line(cache, tmp_path):
    from orthodiff.fileio import read_json, write_json

    cfg = tiny_config(cache, tmp_path, "pretrain.max_steps=1", "pretrain.checkpoint_every=1")
    run_pretraining(cfg)
    run_file = tmp_path / "sagittal" / "checkpoints" / "step-000001" / "run.json"
    assert read_json(run_file)["world_size"] == 1
    write_json(run_file, {**read_json(run_file), "world_size": 2})
    with pytest.raises(OrthodiffError) as refused:
        run_pretraining(tiny_config(cache, tmp_path, "pretrain.max_steps=2"))
    assert str(refused.value) == (
        f"checkpoint {run_file.parent} was written by 2 processes, this run has 1: resume with 2 processes, or start "
        "a new output folder (pretrain.output_dir, or pretrain.resume=false to start over there)")
    assert read_metrics(tmp_path / "sagittal" / "metrics.jsonl")[-1]["step"] == 1  # nothing trained


@pytest.mark.slow
def test_loss_falls_on_held_out_synthetic_knees(tmp_path):
    """The real path: orthodiff synth -> scan -> prepare, then pretraining on train+val patients."""
    from orthodiff.data.cache import PlaneCache
    from orthodiff.data.prepare import prepare_cache
    from orthodiff.data.scan import scan_archive
    from orthodiff.synth import synthesize_archive

    synthesize_archive(tmp_path / "archive", studies=12, seed=0, matrix=32, workers=1, progress=False)
    scan_archive(tmp_path / "archive", tmp_path / "manifest.parquet")
    size = {plane: [8, 16, 16] for plane in ("sagittal", "coronal", "axial")}
    prepare_cache(tmp_path / "manifest.parquet", tmp_path / "cache", plane_size=size, workers=1)
    cache = PlaneCache(tmp_path / "cache")
    patients = sorted(cache.index["patient_id"].unique())
    held_out = patients[-2:]
    splits = write_splits(tmp_path / "splits.json", patients[:-3], patients[-3:-2], held_out)
    cfg = tiny_config(
        cache.root, tmp_path / "run", f"data.splits={splits}", "pretrain.max_steps=16", "pretrain.batch_size=4",
        "pretrain.learning_rate=4e-3", "pretrain.warmup_steps=2", "pretrain.checkpoint_every=16", "pretrain.log_every=8",
    )
    outputs = run_pretraining(cfg)

    series = cache.series("sagittal", held_out)["series_id"]
    assert len(series) >= 1
    volumes = torch.stack([torch.from_numpy(cache.image(s).astype("float32")) for s in series])
    clean = volumes.repeat_interleave(4, dim=0)
    timesteps = torch.tensor([100, 300, 500, 700] * len(series))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(123))
    scheduler = make_noise_scheduler(cfg.diffusion)
    with torch.no_grad():
        before = denoising_loss(initial_denoiser(cfg, "sagittal").eval(), scheduler, clean, timesteps, noise).item()
        after = denoising_loss(Denoiser.from_pretrained(outputs["sagittal"], plane="sagittal"), scheduler, clean, timesteps, noise).item()
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
def test_cli_writes_offline_wandb_run_with_metrics(cache, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # the run dir must still land in output_dir
    cfg = tiny_config(cache, tmp_path)
    cli_main([
        "pretrain", "-c", "tiny", f"data.cache={cache}", f"data.splits={cfg.data.splits}",
        *(f"data.plane_size.{p}=[8,16,16]" for p in ("sagittal", "coronal", "axial")),
        "model.base_channels=8", "model.channel_mult=[1,2]", "model.attention_levels=[false,true]",
        "model.num_head_channels=8", "model.norm_num_groups=8", f"pretrain.output_dir={tmp_path}",
        "plane=sagittal", "max_steps=2", "log_every=1", "preview_every=2", "preview_count=2", "tracker=wandb",
        "diffusion.sample_steps=3",
    ])
    assert os.environ["WANDB_MODE"] == "offline"
    runs = list((tmp_path / "sagittal" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = read_wandb_history(next(runs[0].glob("run-*.wandb")))
    logged = read_metrics(tmp_path / "sagittal" / "metrics.jsonl")
    assert [row["_step"] for row in history] == [1, 2]
    for row, record in zip(history, logged):
        assert row["train/loss"] == pytest.approx(record["loss"])
        assert row["train/lr"] == pytest.approx(record["lr"])
        assert {"train/grad_norm", "train/volumes_per_s"} <= set(row)
    assert history[-1]["preview/_type"] == "image-file"
    assert (runs[0] / "files" / history[-1]["preview/path"]).stat().st_size > 1000
    assert (tmp_path / "sagittal" / "previews" / "step-000002.png").stat().st_size > 1000
    assert (tmp_path / "config.yaml").exists()
    assert Denoiser.from_pretrained(tmp_path / "denoisers" / "sagittal").plane == "sagittal"


def test_bad_input_fails_before_training(cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pretrain", "-c", "tiny", "pretrain.nope=1"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "key pretrain.nope does not exist" in message and message.count("\n") == 1
    with pytest.raises(OrthodiffError, match="pretrain.plane='oblique'"):
        run_pretraining(tiny_config(cache, tmp_path, "pretrain.plane=oblique"))
    with pytest.raises(OrthodiffError, match=r"prepared at plane size \[8, 16, 16\] for sagittal, but \[8, 32, 32\]"):
        run_pretraining(tiny_config(cache, tmp_path, "data.plane_size.sagittal=[8,32,32]"))
    sagittal_only = write_fixture_cache(tmp_path / "sagittal-only", patients=2, planes=["sagittal"])
    with pytest.raises(OrthodiffError, match="no prepared coronal series"):
        run_pretraining(tiny_config(sagittal_only, tmp_path, "pretrain.plane=coronal"))
    with pytest.raises(OrthodiffError, match=r"prepared with data.slab=crop, but data.slab=fit was asked"):
        run_pretraining(tiny_config(cache, tmp_path, "data.slab=fit"))
    with pytest.raises(OrthodiffError, match="pretrain.tracker='mlflow'"):
        run_pretraining(tiny_config(cache, tmp_path, "pretrain.tracker=mlflow"))
    assert not (tmp_path / "sagittal").exists() and not (tmp_path / "config.yaml").exists()

    # A checkpoint of another model configuration is refused before any step.
    run_pretraining(tiny_config(cache, tmp_path, "pretrain.max_steps=1", "pretrain.checkpoint_every=1"))
    with pytest.raises(OrthodiffError, match="another model .*base_channels 8 in the checkpoint vs 16 now"):
        run_pretraining(tiny_config(cache, tmp_path, "model.base_channels=16", "model.norm_num_groups=8"))
    assert [s for s, _ in list_checkpoints(tmp_path / "sagittal" / "checkpoints")] == [1]


def test_nan_loss_stops_with_intact_checkpoint(tmp_path):
    cache = write_fixture_cache(tmp_path / "cache", patients=6, planes=["sagittal"], nan_patient="P0004")
    cfg = tiny_config(cache, tmp_path / "run", "pretrain.max_steps=6", "pretrain.checkpoint_every=1")
    # Which step first draws the NaN volume (series sorted by id, so P0004 is item 3).
    sampler = StepSeededBatchSampler(6, cfg.pretrain.batch_size, seed=derived_seed(cfg.seed, 0))
    bad_step = next(m for m in range(100) if 3 in sampler.batch(m)) + 1
    assert 1 < bad_step <= 6, "fixture seed no longer puts the NaN volume after step 1"

    with pytest.raises(OrthodiffError, match=rf"pretrain sagittal: loss is nan at step {bad_step}; stopped without saving"):
        run_pretraining(cfg)
    checkpoints = list_checkpoints(tmp_path / "run" / "sagittal" / "checkpoints")
    assert [s for s, _ in checkpoints] == list(range(max(1, bad_step - cfg.pretrain.keep_checkpoints), bad_step))
    for _, path in checkpoints:
        assert all(torch.isfinite(t).all() for t in _weights(path / "model.safetensors").values())
    assert not (tmp_path / "run" / "denoisers").exists()


def test_all_planes_train_in_turn_and_load_together(cache, tmp_path):
    from orthodiff.models.denoiser import load_denoisers

    overrides = ("pretrain.plane=all", "pretrain.max_steps=1", "diffusion.prediction_type=v_prediction", "diffusion.min_snr_gamma=5")
    outputs = run_pretraining(tiny_config(cache, tmp_path, *overrides))
    assert list(outputs) == ["sagittal", "coronal", "axial"]
    for plane in outputs:
        assert 0 < read_metrics(tmp_path / plane / "metrics.jsonl")[-1]["loss"] < 10
    denoisers = load_denoisers(tmp_path / "denoisers")
    assert all(d.diffusion.prediction_type == "v_prediction" and d.diffusion.min_snr_gamma == 5 for d in denoisers.values())
    assert {plane: d.plane for plane, d in denoisers.items()} == {p: p for p in outputs}
    first = {p: next(iter(d.state_dict().values())) for p, d in denoisers.items()}
    assert not torch.equal(first["sagittal"], first["coronal"])  # each plane has its own start


def test_splits_of_another_manifest_stop_pretraining(tmp_path):
    """A splits file made from another manifest would train on the few patients both share."""
    from orthodiff.data.cache import PlaneCache
    from orthodiff.data.fingerprint import data_fingerprint
    from orthodiff.data.splits import make_splits
    from orthodiff.fileio import read_json, write_json

    cache_dir = write_fixture_cache(tmp_path / "cache", patients=6, planes=["sagittal"])
    index = PlaneCache(cache_dir).index
    meta = read_json(cache_dir / "cache.json")
    write_json(cache_dir / "cache.json", {**meta, "manifest": "all.parquet", "manifest_fingerprint": data_fingerprint(index)})
    other = make_splits(index[index["patient_id"] != "P0006"], tmp_path / "other.json", val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(OrthodiffError, match=r"other.json .* and .*cache.json \(manifest all.parquet\) come from different manifests"):
        run_pretraining(tiny_config(cache_dir, tmp_path / "run", f"data.splits={other.path}"))
    assert not (tmp_path / "run" / "sagittal").exists()
    same = make_splits(index, tmp_path / "same.json", val_fraction=0.2, test_fraction=0.2)
    run_pretraining(tiny_config(cache_dir, tmp_path / "run", f"data.splits={same.path}", "pretrain.max_steps=1"))


def _fake_gpu(monkeypatch, capability):
    """A CUDA device of ``capability`` as torch.cuda reports it (bf16 emulated below 8.0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capability[0] >= 8 or including_emulation)


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16"), (None, "no")])
def test_auto_precision_is_bf16_only_where_the_gpu_computes_it(monkeypatch, capability, expected):
    """V100 (7.0) and T4 (7.5) only emulate bf16: auto takes fp16 there, for pretraining and fine-tuning alike."""
    import accelerate

    from orthodiff.config import load_config
    from orthodiff.finetune.endtoend import make_accelerator

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    _fake_gpu(monkeypatch, capability)
    assert pretrain.resolve_mixed_precision("auto") == expected
    asked = {}
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: asked.update(kwargs))
    make_accelerator(load_config([], []))
    assert asked["mixed_precision"] == expected


def test_precision_asked_by_the_launcher_wins_in_both_stages(monkeypatch):
    import accelerate

    from orthodiff.config import load_config
    from orthodiff.finetune.endtoend import make_accelerator

    _fake_gpu(monkeypatch, (7, 0))
    asked = {}
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: asked.update(kwargs))
    for launched, expected in (("bf16", "bf16"), ("fp16", "fp16"), ("no", "fp16")):  # 'no': the launcher's default
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
        make_accelerator(load_config([], []))
        assert pretrain.resolve_mixed_precision("auto") == asked["mixed_precision"] == expected
    assert pretrain.resolve_mixed_precision("no") == "no"
    with pytest.raises(OrthodiffError, match="finetune.mixed_precision='fp8': use one of auto, no, fp16, bf16"):
        make_accelerator(load_config([], ["finetune.mixed_precision=fp8"]))


def test_first_non_finite_value_is_kept_on_the_device_until_read():
    """The loop notes losses and gradient norms without waiting for the device; a read names the first bad one."""
    from types import SimpleNamespace

    watch = pretrain.FiniteWatch(torch.device("cpu"))
    one_process = SimpleNamespace(gather=lambda tensor: tensor)
    watch.note(torch.tensor(0.5), "loss", 1)
    watch.note(torch.tensor(2.0), "gradient norm", 1)
    assert watch.first_on_any_process(one_process) is None
    watch.note(torch.tensor(float("inf")), "gradient norm", 3)
    watch.note(torch.tensor(float("nan")), "loss", 4)
    assert watch.first_on_any_process(one_process) == ("gradient norm", float("inf"), 3)
    two_processes = SimpleNamespace(gather=lambda tensor: torch.cat([tensor, torch.tensor([[2.0, 0.0, float("nan")]])]))
    what, value, step = watch.first_on_any_process(two_processes)
    assert (what, step) == ("loss", 2) and value != value


def test_slurm_script_passes_overrides_whole_and_cpus_to_srun(tmp_path):
    """pretrain/slurm_pretrain.sh under stand-ins for scontrol, srun and accelerate: the launcher gets
    every override as one argument (spaces and quotes kept), srun the job's CPUs, and SLURM writes the
    log where it exists before the job starts."""
    import stat

    script = Path(__file__).parents[1] / "pretrain" / "slurm_pretrain.sh"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        # a node list longer than a pipe buffer: a reader that stops early would SIGPIPE scontrol
        "scontrol": 'echo node-a; for i in $(seq 20000); do echo node-b$i; done',
        "srun": 'echo "$SRUN_CPUS_PER_TASK" > "$RECORD.cpus"; shift; exec "$@"',
        "accelerate": 'for arg in "$@"; do printf "%s\\n" "$arg"; done > "$RECORD"',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(tmp_path / "args"), "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_GPUS_PER_NODE": "4", "SLURM_CPUS_PER_TASK": "32"}
    overrides = ["plane=sagittal", "tracking.run_name=knee run 2", 'tracking.project="a b"']
    subprocess.run(["bash", str(script), *overrides], env=env, check=True, timeout=30)
    args = (tmp_path / "args").read_text().splitlines()
    assert args[args.index("-m"):] == ["-m", "orthodiff", "pretrain", "-c", "reference", *overrides]
    assert args[args.index("--num_processes") + 1] == "8" and args[args.index("--machine_rank") + 1] == "1"
    assert args[args.index("--main_process_ip") + 1] == "node-a"
    assert (tmp_path / "args.cpus").read_text().strip() == "32"
    assert "#SBATCH --output=%x-%j.out" in script.read_text().splitlines()


SLURM_OVERRIDES = ["data.slab=fit", "data.series.description_regex=PD FS", 'data.series.planes="[sagittal]"']


def _stand_in_commands(tmp_path: Path, bodies: dict) -> dict:
    """An environment whose PATH finds these stand-in commands first; each records into $RECORD.*."""
    import stat

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in bodies.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(tmp_path / "record")}


SRUN_STAND_IN = 'echo "$SRUN_CPUS_PER_TASK" > "$RECORD.cpus"; while [[ "$1" == --* ]]; do shift; done; exec "$@"'
ARGS_STAND_IN = 'for arg in "$@"; do printf "%s\\n" "$arg"; done > "$RECORD.args"'


def test_slurm_prepare_script_passes_overrides_whole_and_cpus_to_srun(tmp_path):
    """pretrain/slurm_prepare.sh under stand-ins for srun and orthodiff: prepare gets its shard, the job's
    CPUs as workers and every override as one argument; srun gets the CPUs; no logs/ folder is needed."""
    script = Path(__file__).parents[1] / "pretrain" / "slurm_prepare.sh"
    env = _stand_in_commands(tmp_path, {"srun": SRUN_STAND_IN, "orthodiff": ARGS_STAND_IN})
    env.update(MANIFEST="m.parquet", CACHE="cache", SLURM_ARRAY_TASK_COUNT="16", SLURM_ARRAY_TASK_ID="3",
               SLURM_CPUS_PER_TASK="32")
    subprocess.run(["bash", str(script), *SLURM_OVERRIDES], env=env, cwd=tmp_path, check=True, timeout=30)
    assert (tmp_path / "record.args").read_text().splitlines() == [
        "prepare", "m.parquet", "--out", "cache", "-c", "reference", "--workers", "32", "--shard", "3/16",
        *SLURM_OVERRIDES]
    assert (tmp_path / "record.cpus").read_text().strip() == "32"
    assert "#SBATCH --output=%x-%A_%a.out" in script.read_text().splitlines()
    assert "logs" not in script.read_text() and not (tmp_path / "logs").exists()


def test_slurm_scan_prepare_script_hands_overrides_whole_to_prepare_and_its_merge(tmp_path):
    """pretrain/slurm_scan_prepare.sh submit under a stand-in sbatch: the prepare array and the cache
    merge get every override as one argument and write their output in the submit directory; the cache
    merge job then gives them to orthodiff prepare --merge, and srun the job's CPUs."""
    script = Path(__file__).parents[1] / "pretrain" / "slurm_scan_prepare.sh"
    sbatch = ('calls=("$RECORD".sbatch.*); n=${#calls[@]}; [ -e "${calls[0]}" ] || n=0; '
              'for arg in "$@"; do printf "%s\\n" "$arg"; done > "$RECORD.sbatch.$n"; echo "10$n"')
    env = _stand_in_commands(tmp_path, {"sbatch": sbatch, "srun": SRUN_STAND_IN, "python": ARGS_STAND_IN})
    env.update(ARCHIVE="archive", N="4", OUT=str(tmp_path / "runs"))
    subprocess.run(["bash", str(script), "submit", *SLURM_OVERRIDES], env=env, cwd=tmp_path, check=True,
                   timeout=30)
    calls = [(tmp_path / f"record.sbatch.{n}").read_text().splitlines() for n in range(4)]
    assert calls[0][-2:] == [str(script), "scan"] and calls[1][-2:] == [str(script), "merge"]
    assert calls[2][-1 - len(SLURM_OVERRIDES):] == ["pretrain/slurm_prepare.sh", *SLURM_OVERRIDES]
    assert calls[3][-2 - len(SLURM_OVERRIDES):] == [str(script), "merge-cache", *SLURM_OVERRIDES]
    assert "--output=%x-%j.out" in calls[1] and "--output=%x-%j.out" in calls[3]
    assert "#SBATCH --output=%x-%A_%a.out" in script.read_text().splitlines()
    assert "logs" not in script.read_text() and not (tmp_path / "logs").exists()

    env.update(SLURM_CPUS_PER_TASK="2")
    subprocess.run(["bash", str(script), "merge-cache", *SLURM_OVERRIDES], env=env, cwd=tmp_path, check=True,
                   timeout=30)
    runs = tmp_path / "runs"
    assert (tmp_path / "record.args").read_text().splitlines() == [
        "-m", "orthodiff", "prepare", f"{runs}/manifest.parquet", "--out", f"{runs}/cache", "--merge", "-c",
        "reference", *SLURM_OVERRIDES]
    assert (tmp_path / "record.cpus").read_text().strip() == "2"


def test_heldout_loss_shared_out_over_processes_adds_up_to_the_whole(cache, tmp_path):
    """Each process scores its share of the held-out volumes in batches; the shares add up to one process's score."""
    from types import SimpleNamespace

    from orthodiff.training.heldout import HeldoutLoss, evaluate_heldout

    splits = write_splits(tmp_path / "splits.json", ["P0001", "P0002"], ["P0003", "P0004", "P0005"], ["P0006"])
    cfg = tiny_config(cache, tmp_path, f"data.splits={splits}", "pretrain.eval_every=1", "pretrain.eval_volumes=3",
                      "pretrain.batch_size=2")
    model = initial_denoiser(cfg, "sagittal")
    whole = HeldoutLoss(cfg, "sagittal", "cpu")
    shares = [HeldoutLoss(cfg, "sagittal", "cpu", rank, 2) for rank in (0, 1)]
    assert [len(share.volumes) for share in shares] == [2, 1] and len(whole.volumes) == 3
    torch.testing.assert_close(shares[0].noise[1], whole.noise[2])  # a volume's noise does not depend on the share
    added = shares[0].totals(model) + shares[1].totals(model)
    assert added[1].item() == 3 * len(whole.timesteps)
    assert (added[0] / added[1]).item() == pytest.approx(whole(model), rel=1e-6)

    class NoEMA:
        def store(self, parameters): pass
        def copy_to(self, parameters): pass
        def restore(self, parameters): pass

    written = []
    for rank, share in enumerate(shares):
        other = shares[1 - rank]
        accelerator = SimpleNamespace(num_processes=2, is_main_process=rank == 0,
                                      reduce=lambda totals, reduction, other=other: totals + other.totals(model))
        loss = evaluate_heldout(share, model, NoEMA(), 5, "sagittal", SimpleNamespace(write=written.append),
                                tmp_path / "sagittal", accelerator)
        assert loss == pytest.approx(whole(model), rel=1e-6)
    assert [row["step"] for row in written] == [5]  # the main process alone writes
