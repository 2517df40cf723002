"""Pretraining throughput: orthodiff's Denoiser against a plain MONAI DiffusionModelUNet.

One training step (noise a batch, predict, MSE, backward, AdamW) of the same architecture,
side by side in one run: the plain MONAI network in eager fp32 is the baseline; orthodiff's
denoiser runs with each optimisation (bf16 autocast, SDPA attention, channels-last 3D memory,
torch.compile, gradient checkpointing) on alone, and all together.

    python benchmarks/pretrain_throughput.py                 # CPU, small size (about two minutes)
    python benchmarks/pretrain_throughput.py --device cuda   # GPU, reference size 16x256x256, batch 10

Prints a markdown table (step time, volumes/s, peak memory, ratios to the baseline) and writes
it, with the machine it ran on, to benchmarks/results/pretrain_throughput[_cuda].md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from orthodiff.config import DenoiserConfig, DiffusionConfig
from orthodiff.models.denoiser import Denoiser, check_denoiser_config
from orthodiff.models.diffusion import make_noise_scheduler

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = DenoiserConfig()  # the paper's reference architecture (base 64, mult 1,1,2,2,4)
SMALL = dataclasses.replace(REFERENCE, base_channels=16, num_head_channels=16, norm_num_groups=16)


@dataclasses.dataclass
class Variant:
    name: str
    bf16: bool = False
    sdpa: bool = False
    channels_last: bool = False
    compile: bool = False
    checkpointing: bool = False
    plain_monai: bool = False


def variants(with_bf16: bool, with_compile: bool) -> list[Variant]:
    rows = [
        Variant("MONAI DiffusionModelUNet, eager fp32 (baseline)", plain_monai=True),
        Variant("orthodiff Denoiser, eager fp32"),
    ]
    if with_bf16:
        rows.append(Variant("+ bf16 autocast", bf16=True))
    rows += [
        Variant("+ SDPA attention", sdpa=True),
        Variant("+ channels-last 3D", channels_last=True),
        Variant("+ gradient checkpointing", checkpointing=True),
    ]
    if with_compile:
        rows.append(Variant("+ torch.compile", compile=True))
    combined = [name for name, on in (("bf16", with_bf16), ("SDPA", True), ("channels-last", True), ("compile", with_compile)) if on]
    rows.append(Variant(" + ".join(combined), bf16=with_bf16, sdpa=True, channels_last=True, compile=with_compile))
    rows.append(Variant(" + ".join(combined) + " + checkpointing", bf16=with_bf16, sdpa=True, channels_last=True,
                        compile=with_compile, checkpointing=True))
    return rows


class SavedActivations:
    """Bytes of distinct tensors autograd keeps for backward during a forward pass.

    The allocator-independent part of training memory that checkpointing, bf16 and attention
    kernels change; used on CPU, where process RSS mostly shows the allocator's caching.
    """

    def __enter__(self):
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.bytes = sum(self._storages.values())


class PeakMemory:
    """CUDA allocator peak of a block (0 on CPU, where ``SavedActivations`` is reported instead)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()


def build_model(variant: Variant, config: DenoiserConfig, size, device) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant.plain_monai:
        from monai.networks.nets import DiffusionModelUNet

        channels = check_denoiser_config(config)
        return DiffusionModelUNet(
            spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=config.num_res_blocks, channels=channels,
            attention_levels=tuple(config.attention_levels), norm_num_groups=config.norm_num_groups,
            num_head_channels=config.num_head_channels, use_flash_attention=False,
        ).to(device)
    options = dataclasses.replace(
        config, sdpa=variant.sdpa, channels_last=variant.channels_last, compile=variant.compile,
        gradient_checkpointing=variant.checkpointing,
    )
    return Denoiser(options, "sagittal", size).to(device)


def make_step(model, variant: Variant, batch: int, size, device) -> Callable[[], None]:
    scheduler = make_noise_scheduler(DiffusionConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    clean = torch.rand((batch, 1, *size), generator=generator, device=device) * 2 - 1
    memory_format = torch.channels_last_3d if variant.channels_last else torch.contiguous_format
    model.train()

    def step(activations: Optional[SavedActivations] = None) -> None:
        noise = torch.randn(clean.shape, generator=generator, device=device)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator, device=device)
        noisy = scheduler.add_noise(clean, noise, timesteps).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16), (activations or _nothing()):
            prediction = model(noisy, timesteps)
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def measure(variant: Variant, config, size, batch: int, device, warmup: int, repeats: int) -> dict:
    try:
        model = build_model(variant, config, size, device)
        step = make_step(model, variant, batch, size, device)
        for _ in range(warmup):  # first steps: compile, cudnn autotuning, allocator growth
            step()
        _sync(device)
        times = []
        with PeakMemory(device) as memory:
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        activations = SavedActivations()
        step(activations)
        peak = memory.peak_bytes if device.type == "cuda" else activations.bytes
        return {"step_s": seconds, "volumes_per_s": batch / seconds, "peak_bytes": peak, "saved_bytes": activations.bytes}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        model = step = None  # noqa: F841
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine(device: torch.device) -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} logical cores ({torch.get_num_threads()} torch threads); torch {torch.__version__}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}; " + text
    return text


def table(rows: list[tuple[Variant, dict]], device) -> str:
    base = rows[0][1]
    lines = [
        f"| variant | bf16 | SDPA | channels-last | compile | checkpointing | step (ms) | volumes/s | {'peak memory' if device.type == 'cuda' else 'activation memory'} (MiB) | speed vs baseline | memory vs baseline |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    mark = lambda flag: "on" if flag else ""  # noqa: E731
    for variant, result in rows:
        flags = [mark(variant.bf16), mark(variant.sdpa), mark(variant.channels_last), mark(variant.compile), mark(variant.checkpointing)]
        if "error" in result:
            lines.append(f"| {variant.name} | " + " | ".join(flags) + f" | {result['error']} | | | | |")
            continue
        speed = f"{base['step_s'] / result['step_s']:.2f}x" if "step_s" in base else ""
        memory = f"{result['peak_bytes'] / base['peak_bytes']:.2f}x" if base.get("peak_bytes") else ""
        lines.append(
            f"| {variant.name} | " + " | ".join(flags)
            + f" | {result['step_s'] * 1000:.0f} | {result['volumes_per_s']:.2f} | {result['peak_bytes'] / 2**20:.0f} | {speed} | {memory} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (small size) or cuda (reference size)")
    parser.add_argument("--size", type=int, nargs=3, help="D H W (default: 16 32 32 on CPU, 16 256 256 on GPU)")
    parser.add_argument("--batch", type=int, help="volumes per step (default: 2 on CPU, 10 on GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant (compile, autotune)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include torch.compile variants (default: on GPU only; slow to compile on CPU)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="include bf16 variants (default: on GPU only; CPUs without AMX run bf16 3D convs slowly)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: benchmarks/results/...)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    config = REFERENCE if gpu else SMALL
    size = tuple(args.size or ((16, 256, 256) if gpu else (16, 32, 32)))
    batch = args.batch or (10 if gpu else 2)
    with_compile = gpu if args.compile is None else args.compile
    with_bf16 = gpu if args.bf16 is None else args.bf16
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for variant in variants(with_bf16, with_compile):
        result = measure(variant, config, size, batch, device, args.warmup, args.repeats)
        rows.append((variant, result))
        print(f"{variant.name}: {result}", flush=True)

    widths = [config.base_channels * m for m in config.channel_mult]
    header = (
        f"# Pretraining throughput ({'GPU' if gpu else 'CPU'})\n\n"
        f"Machine: {machine(device)}  \n"
        f"Model: widths {widths}, attention at levels {[i for i, a in enumerate(config.attention_levels) if a]} and the "
        f"middle block, {config.num_res_blocks} residual block per level; volume 1 x {size[0]} x {size[1]} x {size[2]}, "
        f"batch {batch}; AdamW step; median of {args.repeats} steps after {args.warmup} warm-up.  \n"
        f"Memory: {'CUDA allocator peak over the timed steps' if gpu else 'tensors autograd saves for backward in one step (allocator-independent; with checkpointing the kept block inputs are not counted)'}.  \n"
        f"Command: `python benchmarks/pretrain_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
    )
    markdown = header + table(rows, device) + "\n"
    print("\n" + markdown)
    out = args.out or RESULTS / f"pretrain_throughput{'_cuda' if gpu else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    return markdown


if __name__ == "__main__":
    main()
