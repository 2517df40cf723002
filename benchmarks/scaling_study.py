"""The scaling study, stage by stage: what pretraining compute buys the frozen-feature probe.

    python benchmarks/scaling_study.py pool --work /data/scaling matrix=128 \
        "data.plane_size.sagittal=[16,64,64]" ... "data.field_of_view_mm.sagittal=[null,100,100]" ...
    python benchmarks/scaling_study.py pretrain w8-600-crops
    python benchmarks/scaling_study.py extract w8-600-crops
    python benchmarks/scaling_study.py probe w8-600-crops
    python benchmarks/scaling_study.py extract floors
    python benchmarks/scaling_study.py probe floors
    python benchmarks/scaling_study.py report --baselines bench/label-fraction/results.json

``pool`` records the preset, the overrides and --work in the results folder's study.json; the later
stages read them from there (settings given again must match). Every stage resumes: a finished one
prints so and writes nothing; an interrupted pretraining resumes from its last checkpoint. Give
--work the folder a label-fraction bench ran in (its --out) to share its labeled data and pool.
The points and the protocol are in ``orthodiff/bench/scaling.py``; ``--list`` prints the points
with their compute.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "scaling"


def study_from(args, argv: list[str]):
    from orthodiff.bench.scaling import Study
    from orthodiff.errors import OrthodiffError
    from orthodiff.fileio import read_json

    stored = RESULTS if args.results is None else args.results
    record = Path(stored) / "study.json"
    settings = read_json(record) if record.exists() else {}
    work = args.work or (Path(settings["work"]) if settings.get("work") else None)
    if work is None:
        raise OrthodiffError(f"{record}: no study recorded yet; give --work DIR (outside the repository) to `pool`")
    overrides = args.overrides or settings.get("overrides", [])
    command = "python benchmarks/scaling_study.py " + " ".join(shlex.quote(a) for a in argv)
    return Study(results=Path(stored), work=Path(work).resolve(), preset=args.preset or settings.get("preset", "small"),
                 overrides=list(overrides), command=command)


def list_points(study) -> None:
    from orthodiff.bench.scaling import point_compute

    smallest = None
    for point in study.points:
        compute = point_compute(study, point)
        smallest = smallest or compute["compute"]
        crop = next(iter(compute["planes"].values()))["crop"]
        print(f"{point.name}: width {point.width}, {compute['steps']} steps of {compute['batch_size']} x "
              f"{'x'.join(map(str, crop))}, {compute['parameters']:,} parameters per plane, compute "
              f"{compute['compute']:.2e} ({compute['compute'] / smallest:.1f}x the first)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("words", nargs="*", metavar="STAGE [POINT] [KEY=VALUE ...]",
                        help="pool, pretrain POINT, extract POINT, probe POINT (POINT: a point or floors) or report; "
                             "bench preset or config key=value overrides (given to pool, then recorded)")
    parser.add_argument("--work", type=Path, help="folder for the bulky data (outside the repository)")
    parser.add_argument("--results", type=Path, help=f"folder for the small outputs (default {RESULTS})")
    parser.add_argument("--preset", help="bench preset (default: the recorded one, else small)")
    parser.add_argument("--baselines", type=Path, help="a finished label-fraction results.json (report)")
    parser.add_argument("--list", action="store_true", help="print the points and their compute")
    args = parser.parse_intermixed_args(argv)  # options may come between the stage and its overrides
    words = [w for w in args.words if "=" not in w]
    args.overrides = [w for w in args.words if "=" in w]
    args.stage = words[0] if words else None
    args.point = words[1] if len(words) > 1 else None
    if len(words) > 2:
        parser.error(f"unexpected {words[2]!r}: give a stage, at most one point, and key=value overrides")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from orthodiff.bench.scaling import run_stage
    from orthodiff.errors import OrthodiffError
    from orthodiff.fileio import read_json, write_json

    try:
        study = study_from(args, argv)
        if args.list:
            list_points(study)
            return 0
        if args.stage is None:
            parser.error("give a stage: pool, pretrain POINT, extract POINT, probe POINT or report")
        did = run_stage(study, args.stage, args.point, baselines=args.baselines)
        record = study.results / "study.json"
        if record.exists() and "work" not in read_json(record):
            write_json(record, {**read_json(record), "work": str(study.work)})
    except OrthodiffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    what = f"{args.stage}{f' {args.point}' if args.point else ''}"
    print(f"[scaling] {what}: {'done' if did else 'already finished; nothing written'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
