"""Scan throughput: files per second of ``orthodiff scan`` on a synthetic DICOM archive.

The archive is written with ``orthodiff.synth`` (DICOM, one file per slice, three planes per
study, small matrices so generation is quick). On the same files, in one run:

- baseline: a plain single-process loop of ``pydicom.dcmread(path, stop_before_pixels=True)``
- scan --headers-only, on 1 worker and on every core
- scan (full: every series' voxels read and checked), on 1 worker and on every core

Each scan row is the whole command's work: walk, headers, geometry, judging series, studies,
labels and metadata, writing the manifest. Files per second count the DICOM files. Each row is
the fastest of ``--repeats`` runs (the page cache is warm for all of them), which damps the noise
of a machine shared with other processes.

    python benchmarks/scan_throughput.py                   # 40 studies (about 2,400 files)
    python benchmarks/scan_throughput.py --studies 120     # about 7,000 files

Prints a markdown table and writes it, with the machine and the command, to
benchmarks/results/scan_throughput.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def dicom_files(archive: Path) -> list[Path]:
    return sorted(path for path in archive.rglob("*.dcm"))


def baseline(files: list[Path]) -> float:
    import pydicom

    start = time.perf_counter()
    for path in files:
        pydicom.dcmread(path, stop_before_pixels=True)
    return time.perf_counter() - start


def timed_scan(archive: Path, out: Path, check_voxels: bool, workers: int) -> tuple[float, int]:
    from orthodiff.data.scan import scan_archive

    start = time.perf_counter()
    result = scan_archive(archive, out, check_voxels=check_voxels, workers=workers)
    return time.perf_counter() - start, len(result.manifest)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=40, help="Synthetic studies (three DICOM series each).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per row; the fastest counts.")
    parser.add_argument("--matrix", type=int, default=32, help="In-plane matrix of the synthetic series.")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Workers of the parallel rows.")
    parser.add_argument("--note", default="", help="A line about the machine's load, added to the table.")
    parser.add_argument("--out", type=Path, default=RESULTS / "scan_throughput.md")
    args = parser.parse_args(argv)

    from orthodiff.synth import synthesize_archive

    with tempfile.TemporaryDirectory(prefix="orthodiff-scan-bench-") as tmp:
        archive = Path(tmp) / "archive"
        start = time.perf_counter()
        synthesize_archive(archive, joint="knee", studies=args.studies, seed=0, fmt="dicom", matrix=args.matrix, workers=args.workers, progress=False)
        generation = time.perf_counter() - start
        files = dicom_files(archive)
        n = len(files)
        print(f"archive: {args.studies} studies, {n} DICOM files, written in {generation:.0f} s", flush=True)
        base = min(baseline(files) for _ in range(args.repeats))
        rows = [("pydicom.dcmread(stop_before_pixels=True) loop, 1 process (baseline)", base, None)]
        print(f"baseline: {n / base:.0f} files/s", flush=True)
        for label, check_voxels in (("scan --headers-only", False), ("scan (full voxel check)", True)):
            for workers in sorted({1, args.workers}):
                runs = [timed_scan(archive, Path(tmp) / f"m{workers}{check_voxels}.parquet", check_voxels, workers) for _ in range(args.repeats)]
                seconds, series = min(runs)
                rows.append((f"{label}, --workers {workers}", seconds, series))
                print(f"{label}, {workers} worker(s): {n / seconds:.0f} files/s", flush=True)

    command = "python benchmarks/scan_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Scan throughput (CPU)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; Python {platform.python_version()}, "
        f"{_versions()}  ",
        f"Archive: {args.studies} synthetic knee studies (`orthodiff.synth`, DICOM, matrix {args.matrix}), "
        f"{n} DICOM files of {rows[-1][2]} series, plus one NIfTI segmentation per series (read by the full scan).  ",
        f"Command: `{command.strip()}`  ",
        f"Load average at the end: {load:.1f} (the cores were shared with other processes during the run). {args.note}".rstrip(),
        "",
        f"Each row: the fastest of {args.repeats} runs.",
        "",
        "| what | seconds | DICOM files/s | vs baseline |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, seconds, _ in rows:
        lines.append(f"| {label} | {seconds:.1f} | {n / seconds:.0f} | {base / seconds:.2f}x |")
    table = "\n".join(lines) + "\n"
    print(table)
    from orthodiff.fileio import write_text

    write_text(args.out, table)


def _versions() -> str:
    import pydicom

    return f"pydicom {pydicom.__version__}"


if __name__ == "__main__":
    main()
