"""Segmentation training-step time: the orthodiff segmenter (the shipped knee-small denoisers,
encoder fine-tuned, the width-16 decoder with its image stem) and the DynUNet reference at the
`small` preset's sizes, each with ``finetune.channels_last`` off and on, measured side by side.

    python benchmarks/segment_throughput.py [--threads 1] [--batch 8] [--repeats 5] [--rounds 3]

A step is forward, Dice + CE loss over the three planes, backward and an AdamW step, on random plane
tensors and labels of 11 classes (1 x 8 x 32 x 32 per plane). Variants take turns, ``--rounds``
times ``--repeats`` steps each after one warm-up step, so a machine that gets busier or quieter
during the run slows every variant alike; the table gives each variant's median step. It writes
``benchmarks/results/segment_throughput.md`` (``--out`` to name another file).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

PLANES = ("sagittal", "coronal", "axial")
CLASSES = 11
SIZE = (8, 32, 32)


def orthodiff_segmenter() -> torch.nn.Module:
    from orthodiff.finetune.endtoend import Backbone, EndToEndSegmenter, segmentation_blocks
    from orthodiff.heads.segmentation import SegmentationModel
    from orthodiff.models.denoiser import load_denoisers
    from orthodiff.pretrained import shipped_folder

    denoisers = load_denoisers(shipped_folder() / "denoisers", PLANES)
    bottleneck, skips = segmentation_blocks(next(iter(denoisers.values())))
    backbone = Backbone(denoisers, 100, [bottleneck, *skips], seed=0, mode="partial")
    shapes = {p: {b: d.feature_shape(b) for b in [bottleneck, *skips]} for p, d in denoisers.items()}
    head = SegmentationModel(shapes, {p: tuple(d.plane_size) for p, d in denoisers.items()}, bottleneck, skips,
                             CLASSES, pooling="attention", width=16, image_channels=1, image_stem=2)
    return EndToEndSegmenter(backbone, head)


def dynunet_segmenter() -> torch.nn.Module:
    from orthodiff.baselines.dynunet import DynUNetSegmenter

    # the small preset's plan: 16-128 filters; 3.5 mm slices of 0.5 mm pixels after data.slab=fit
    return DynUNetSegmenter(dict.fromkeys(PLANES, SIZE), dict.fromkeys(PLANES, (3.5, 0.5, 0.5)), CLASSES,
                            base_filters=16, max_filters=128)


def make_batch(batch: int, generator: torch.Generator) -> dict:
    return {
        "images": {p: torch.randn(batch, 1, *SIZE, generator=generator) for p in PLANES},
        "segs": {p: torch.randint(0, CLASSES, (batch, *SIZE), generator=generator) for p in PLANES},
        "study_id": [f"study-{i}" for i in range(batch)],
        "present": torch.ones(batch, len(PLANES), dtype=torch.bool),
    }


def step_seconds(model: torch.nn.Module, optimizer, batch: dict, repeats: int) -> list[float]:
    """``repeats`` timed training steps; outputs stacked by deep supervision are all scored."""
    from torch.nn import functional as F

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = model(batch)
        loss = 0.0
        for plane, logits in outputs.items():
            heads = logits.unbind(1) if logits.dim() == 6 else (logits,)
            loss = loss + sum(F.cross_entropy(head, batch["segs"][plane]) for head in heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "segment_throughput.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from orthodiff.finetune.endtoend import use_channels_last

    variants = {}
    for name, build in (("orthodiff segmenter", orthodiff_segmenter), ("DynUNet", dynunet_segmenter)):
        for channels_last in (False, True):
            torch.manual_seed(0)
            model = build()
            if channels_last:
                model = use_channels_last(model)
            model.train()
            trainable = [p for p in model.parameters() if p.requires_grad]
            variants[(name, channels_last)] = (model, torch.optim.AdamW(trainable, lr=1e-4))
    batch = make_batch(args.batch, torch.Generator().manual_seed(0))
    times = {key: [] for key in variants}
    for model, optimizer in variants.values():
        step_seconds(model, optimizer, batch, 1)  # warm-up: allocator and kernel choice
    for _ in range(args.rounds):
        for key, (model, optimizer) in variants.items():
            times[key] += step_seconds(model, optimizer, batch, args.repeats)

    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "n/a"
    lines = ["# Segmentation training step (CPU)", "",
             f"torch {torch.__version__}, {args.threads} torch thread(s); batch {args.batch} studies of three "
             f"1 x {' x '.join(map(str, SIZE))} planes, {CLASSES} classes; forward, loss, backward and AdamW step; "
             f"median of {args.rounds} x {args.repeats} steps, the variants taking turns; load average {load} at the "
             "end.  ",
             f"Command: `python benchmarks/segment_throughput.py --threads {args.threads} --batch {args.batch} "
             f"--repeats {args.repeats} --rounds {args.rounds}`", "",
             "| model | channels-last 3D | step (ms) | studies/s | speed vs channels-first |",
             "| --- | --- | ---: | ---: | ---: |"]
    for name in dict.fromkeys(key[0] for key in variants):
        base = statistics.median(times[(name, False)])
        for channels_last in (False, True):
            median = statistics.median(times[(name, channels_last)])
            lines.append(f"| {name} | {'on' if channels_last else ''} | {median * 1000:.0f} | "
                         f"{args.batch / median:.2f} | {base / median:.2f}x |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
