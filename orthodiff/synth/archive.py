"""``orthodiff synth``: write a whole synthetic archive, studies rendered in parallel."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OrthodiffError
from ..fileio import read_json, write_json, write_table
from ..planes import PLANES
from .abnormalities import JOINT_LABELS
from .anatomy import JOINT_CLASSES, JOINTS
from .population import StudySpec, sample_population

FORMATS = ("nifti", "dicom")
_ARCHIVE_FILES = ("archive.json", "labels.csv", "metadata.csv", "preview.png")


@dataclass
class SynthSummary:
    out: Path
    joint: str
    fmt: str
    studies: int
    patients: int
    label_counts: dict[str, int]
    normal_studies: int
    sites: dict[str, int]
    field_strengths: dict[float, int]
    planes: dict[str, int]
    seconds: float
    workers: int = 1
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        labels = ", ".join(f"{name} {count}" for name, count in self.label_counts.items())
        sites = ", ".join(f"{name} {count}" for name, count in self.sites.items())
        fields = ", ".join(f"{fs:g} T {count}" for fs, count in sorted(self.field_strengths.items()))
        planes = ", ".join(f"{plane} {count}" for plane, count in self.planes.items())
        return (f"Wrote {self.studies} {self.joint} studies of {self.patients} patients ({self.fmt}) to {self.out} "
                f"in {self.seconds:.1f} s on {self.workers} workers. Labels (studies with each): {labels}; "
                f"{self.normal_studies} normal exams. Sites: {sites}. Field strength: {fields}. "
                f"Series per plane: {planes}.")


def _check_arguments(out: Path, joint: str, studies: int, fmt: str, workers: int, matrix: int) -> None:
    if joint not in JOINTS:
        raise OrthodiffError(f"--joint {joint!r} is not supported; use one of {', '.join(JOINTS)}")
    if not isinstance(studies, int) or studies < 1:
        raise OrthodiffError(f"--studies {studies!r} must be a whole number of at least 1")
    if fmt not in FORMATS:
        raise OrthodiffError(f"--format {fmt!r} is not supported; use nifti or dicom")
    if not isinstance(workers, int) or workers < 0:
        raise OrthodiffError(f"workers={workers!r} must be 0 (all cores) or a positive number of processes")
    if not isinstance(matrix, int) or not 32 <= matrix <= 1024:
        raise OrthodiffError(f"matrix={matrix!r} must be a whole number of pixels between 32 and 1024")
    if out.exists() and not out.is_dir():
        raise OrthodiffError(f"{out}: exists and is not a folder; choose a new folder for the archive")


def _clear_previous_archive(out: Path) -> None:
    """An existing synthetic archive is replaced; any other non-empty folder is left alone."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / "archive.json").exists():
        raise OrthodiffError(f"{out}: folder is not empty and holds no archive.json; choose an empty or new folder")
    try:
        previous = read_json(out / "archive.json")
        assert isinstance(previous, dict) and "joint" in previous
    except Exception as exc:
        raise OrthodiffError(f"{out}/archive.json is not a synthetic archive description ({exc}); choose another folder") from exc
    strangers = [p.name for p in out.iterdir() if not _belongs_to_archive(p)]
    if strangers:
        raise OrthodiffError(f"{out}: holds files that are not part of a synthetic archive ({strangers[0]}); choose another folder")
    for entry in out.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _belongs_to_archive(path: Path) -> bool:
    """Archive tables, patient folders, and temporary files left by an interrupted run."""
    if path.name in _ARCHIVE_FILES:
        return True
    if path.is_dir():
        return re.fullmatch(r"P\d+", path.name) is not None
    return path.name.startswith(".") and ".tmp" in path.name


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, not the machine's
    except AttributeError:
        return os.cpu_count() or 1


_WORKER_STATE: dict = {}


def _init_worker(out: str, fmt: str, matrix: int, seed: int) -> None:
    import torch

    torch.set_num_threads(1)  # one study per core; threads would only fight each other
    _WORKER_STATE.update(out=Path(out), fmt=fmt, matrix=matrix, seed=seed)


def _synthesize_one(spec: StudySpec) -> tuple[str, tuple[str, ...]]:
    from .study import render_study
    from .writers import write_study

    state = _WORKER_STATE
    series = render_study(spec, state["matrix"])
    write_study(state["out"], spec, series, state["fmt"], state["seed"])
    return spec.study_id, tuple(series)


def synthesize_archive(out, joint: str = "knee", studies: int = 200, seed: int = 0, fmt: str = "nifti",
                       workers: int = 0, matrix: int = 128, progress: bool = True) -> SynthSummary:
    """Write a synthetic archive of ``studies`` exams of one joint; the same seed writes the same voxels.

    Layout: labels.csv, metadata.csv, archive.json and OUT/<patient_id>/<study_id>/<plane>.nii.gz
    (or <plane>/IM0001.dcm ...) with <plane>_seg.nii.gz beside each series.
    """
    out = Path(out)
    _check_arguments(out, joint, studies, fmt, workers, matrix)
    _clear_previous_archive(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    specs = sample_population(joint, studies, seed)
    n_workers = min(workers or _default_workers(), len(specs))
    planes_written = dict(_run(specs, out, fmt, matrix, seed, n_workers, progress))
    _write_tables(out, joint, seed, fmt, matrix, specs)
    return _summary(out, joint, fmt, specs, planes_written, time.perf_counter() - start, n_workers)


def _run(specs, out, fmt, matrix, seed, n_workers, progress):
    from tqdm import tqdm

    bar = tqdm(total=len(specs), desc="synth", unit="study", disable=not progress, file=sys.stderr)
    if n_workers <= 1:
        _init_worker(str(out), fmt, matrix, seed)
        for spec in specs:
            yield _synthesize_one(spec)
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        import torch  # noqa: F401 - imported once here so that forked workers need not import them again
        import torchio  # noqa: F401

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        if specs[0].joint == "knee" and method == "fork":  # forked workers inherit the built knee atlas
            from .knee import knee_atlas

            knee_atlas()

        with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context(method),
                                 initializer=_init_worker, initargs=(str(out), fmt, matrix, seed)) as pool:
            for result in pool.map(_synthesize_one, specs, chunksize=4):
                yield result
                bar.update()
    bar.close()


def _write_tables(out: Path, joint: str, seed: int, fmt: str, matrix: int, specs: list[StudySpec]) -> None:
    import pandas as pd

    labels = JOINT_LABELS[joint]
    write_table(out / "labels.csv", pd.DataFrame([{"study_id": s.study_id, **{n: int(s.labels[n]) for n in labels}} for s in specs]))
    write_table(out / "metadata.csv", pd.DataFrame([s.metadata_row() for s in specs]))
    write_json(out / "archive.json", {"joint": joint, "seed": seed, "studies": len(specs), "format": fmt,
                                      "labels": list(labels), "classes": list(JOINT_CLASSES[joint]),
                                      "matrix": matrix, "generator": "orthodiff synth"})


def _summary(out, joint, fmt, specs, planes_written, seconds, n_workers) -> SynthSummary:
    labels = JOINT_LABELS[joint]
    plane_counts = Counter(plane for planes in planes_written.values() for plane in planes)
    return SynthSummary(
        out=out, joint=joint, fmt=fmt, studies=len(specs), patients=len({s.patient_id for s in specs}),
        label_counts={name: sum(s.labels[name] for s in specs) for name in labels},
        normal_studies=sum(1 for s in specs if not any(s.labels.values())),
        sites=dict(Counter(s.site for s in specs)), field_strengths=dict(Counter(s.field_strength for s in specs)),
        planes={plane: plane_counts.get(plane, 0) for plane in PLANES}, seconds=seconds, workers=n_workers)
