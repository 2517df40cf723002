"""Prediction latency and peak memory per three-plane study at the reference size.

The pipeline is built in memory with the reference denoiser (configs/reference.yaml: 16 x 256 x 256
per plane, base width 64, multipliers 1,1,2,2,4) and random weights (timing does not depend on
the weights), the knee labels, a probe-style diagnosis head (middle block, t = 100) and an
11-class segmentation head. A study is three synthetic series of 256 x 256 x 20 voxels. Rows:

- classify: preprocessing, denoiser features, the diagnosis head
- + Grad-CAM: heat maps for every label and plane, mapped back onto the series grids
- + segmentation: the segmentation head, mapped back onto the series grids
- + writing outputs: prediction.json, NIfTI files, PNG overlays and report.html (what
  ``orthodiff predict`` does per study)

    python benchmarks/predict_latency.py                  # CPU, 2 threads (the 30 s target)
    python benchmarks/predict_latency.py --device cuda    # GPU, when present

Prints a markdown table and writes it, with the machine it ran on, to
benchmarks/results/predict_latency[_cuda].md.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "reference.yaml"
TARGET_SECONDS = 30.0
SOURCE_SHAPE = (256, 256, 20)  # rows x cols x slices of each synthetic series
SOURCE_SPACING = (0.6, 0.6, 3.5)
# Voxel axes (i, j, k) -> RAS axes; k is the slice axis, along the plane's normal.
_AXES = {"sagittal": (1, 2, 0), "coronal": (0, 2, 1), "axial": (0, 1, 2)}


def build_pipeline(device: str):
    """The reference pipeline with random weights (seeded), as ``from_runs`` would assemble it."""
    from orthodiff.config import load_config
    from orthodiff.data.prepare import INTENSITY_PERCENTILES, PLANE_AXCODES
    from orthodiff.models.denoiser import Denoiser
    from orthodiff.pipeline.pipeline import (
        FORMAT,
        VERSION,
        OrthoDiffusionPipeline,
        build_classifier,
        build_segmenter,
    )
    from orthodiff.planes import PLANES
    from orthodiff.synth import JOINT_CLASSES, JOINT_LABELS

    cfg = load_config([REFERENCE_CONFIG])
    torch.manual_seed(0)
    denoisers = {p: Denoiser(cfg.model, p, cfg.data.plane_size[p], cfg.diffusion).eval() for p in PLANES}
    labels, classes = list(JOINT_LABELS["knee"]), list(JOINT_CLASSES["knee"])
    sampling = {"timesteps": [100], "average_timesteps": False, "noise_draws": 1, "seed": 0}
    classifier_spec = {"planes": list(PLANES), "block": "mid", **sampling, "pooling": "attention", "fusion": "concat",
                       "attention_heads": 4, "use_ehr": False, "ehr_columns": [], "ehr_stats": {}}
    segmenter_spec = {"planes": list(PLANES), "bottleneck": "mid",
                      "skips": [b for b in denoisers["sagittal"].block_names() if b.startswith("down")],
                      **sampling, "pooling": "attention", "width": 16, "image_channels": 1, "denoisers": "denoisers"}
    config = {
        "format": FORMAT, "version": VERSION, "labels": labels, "classes": classes,
        "thresholds": {label: {"value": 0.5, "source": "benchmark"} for label in labels},
        "preprocessing": {"plane_size": {p: list(cfg.data.plane_size[p]) for p in PLANES}, "slice_spacing": None,
                          "orientation": dict(PLANE_AXCODES), "intensity_percentiles": list(INTENSITY_PERCENTILES)},
        "classifier": classifier_spec, "segmenter": segmenter_spec, "sources": {"benchmark": "random weights"},
    }
    classifier = build_classifier(classifier_spec, labels, denoisers)
    segmenter = build_segmenter(segmenter_spec, len(classes), denoisers)
    return OrthoDiffusionPipeline(config, denoisers, classifier, denoisers, segmenter).to(device)


def synthetic_study(seed: int = 0) -> dict:
    """Three smooth random series with plane geometry (256 x 256 x 20, 0.6 x 0.6 x 3.5 mm)."""
    from scipy.ndimage import gaussian_filter

    from orthodiff.io.volume import Volume

    rng = np.random.default_rng(seed)
    volumes = {}
    for plane, axes in _AXES.items():
        image = gaussian_filter(rng.normal(0, 1, SOURCE_SHAPE), sigma=(6, 6, 1)).astype(np.float32) * 100 + 300
        affine = np.eye(4)
        affine[:3, :3] = 0
        for voxel_axis, ras_axis in enumerate(axes):
            affine[ras_axis, voxel_axis] = SOURCE_SPACING[voxel_axis]
        volumes[plane] = Volume(image, affine)
    return volumes


class PeakMemory:
    """Peak resident memory (CPU, sampled) or peak allocated CUDA memory over a block."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            process = psutil.Process()
            self.peak = process.memory_info().rss

            def sample():
                while not self._stop.wait(0.02):
                    self.peak = max(self.peak, process.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        return False


def measure(run, device: str, repeats: int) -> tuple[list[float], int]:
    times, peak = [], 0
    for _ in range(repeats):
        gc.collect()
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = max(peak, memory.peak)
    return times, peak


def machine(device: str, threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} logical cores visible, torch {torch.__version__} with {threads} thread(s), "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")
    if device == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return text + f"; 1-minute load average at the start {load:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target is for 2 cores)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row, after one warm-up study")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    torch.set_num_threads(args.threads)
    described = machine(args.device, args.threads)

    from orthodiff.pipeline.inputs import StudyInput

    pipeline = build_pipeline(args.device)
    study = synthetic_study()
    pipeline.predict_study(study, "warm-up")  # first call: lazy imports, allocator warm-up

    with tempfile.TemporaryDirectory() as tmp:
        study_input = StudyInput("bench", rows={p: [{"series_id": f"bench/{p}", "path": p}] for p in study})

        def write_all():
            prediction = pipeline.predict_study(study, "bench")
            _write(pipeline, prediction, study_input, Path(tmp))

        rows = [
            ("classify", lambda: pipeline.predict_study(study, "bench", explain=False, segment=False)),
            ("+ Grad-CAM (8 labels x 3 planes)", lambda: pipeline.predict_study(study, "bench", segment=False)),
            ("+ segmentation (11 classes)", lambda: pipeline.predict_study(study, "bench")),
            ("+ writing outputs (JSON, NIfTI, PNG, report)", write_all),
        ]
        results = []
        for name, run in rows:
            times, peak = measure(run, args.device, args.repeats)
            results.append((name, statistics.median(times), min(times), peak))
            print(f"{name}: median {statistics.median(times):.2f} s, peak {peak / 2**30:.2f} GiB", flush=True)

    memory_kind = "peak CUDA memory allocated" if args.device == "cuda" else "peak resident memory (process)"
    lines = [
        f"# Prediction latency per three-plane study ({args.device})",
        "",
        f"Machine: {described}.",
        "",
        "Reference denoisers (configs/reference.yaml, 16 x 256 x 256 per plane, random weights), 8 knee labels,"
        " 11 segmentation classes; each series 256 x 256 x 20 voxels. Each row adds to the one above;"
        f" median (and best) of {args.repeats} runs after one warm-up study."
        f" Target: at most {TARGET_SECONDS:.0f} s per study on 2 CPU cores."
        " Produced by `python benchmarks/predict_latency.py"
        + (" --device cuda" if args.device == "cuda" else "") + "`.",
        "",
        f"| per study | median s | best s | {memory_kind} GiB | within {TARGET_SECONDS:.0f} s |",
        "| --- | ---: | ---: | ---: | :---: |",
    ]
    for name, median, best, peak in results:
        lines.append(f"| {name} | {median:.2f} | {best:.2f} | {peak / 2**30:.2f} | {'yes' if median <= TARGET_SECONDS else 'no'} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = args.out or RESULTS / ("predict_latency.md" if args.device == "cpu" else "predict_latency_cuda.md")
    from orthodiff.fileio import write_text

    write_text(out, table)
    print(f"wrote {out}")


def _write(pipeline, prediction, study_input, tmp: Path) -> None:
    from orthodiff.pipeline.predict import _write_study

    folder = tmp / "study"
    folder.mkdir(exist_ok=True)
    _write_study(pipeline, prediction, {p: study_input.chosen(p) for p in prediction.series}, study_input, folder, None)


if __name__ == "__main__":
    main()
