"""Reading what a pipeline needs out of fine-tuning run directories: the head specs (enough JSON to
rebuild each head), the denoisers the heads were trained on, and the decision thresholds."""

from __future__ import annotations

from pathlib import Path

from ..errors import OrthodiffError
from ..fileio import read_json
from ..planes import PLANES

HEAD_ATTENTION_HEADS = 4  # what finetune builds its pools with (MultiLabelClassifier default)


def read_run_json(run_dir: Path, task: str) -> tuple[dict, dict]:
    """(run.json, head.json) of a finished ``task`` run; one line when the folder is not one."""
    run_dir = Path(run_dir)
    for name in ("run.json", "head.json", "head.safetensors", "config.yaml"):
        if not (run_dir / name).exists():
            raise OrthodiffError(
                f"{run_dir}: not a finished `orthodiff finetune {task}` run ({name} missing); give its run directory"
            )
    info, head = read_json(run_dir / "run.json"), read_json(run_dir / "head.json")
    if info.get("task") != task or head.get("task") != task:
        raise OrthodiffError(f"{run_dir}: is a {info.get('task')!r} run, not {task}; give a `finetune {task}` run directory")
    return info, head


def run_config(run_dir: Path):
    """The resolved config the run was trained with (its config.yaml)."""
    from ..config import load_config

    return load_config([Path(run_dir) / "config.yaml"])


def timesteps_of(spec: str) -> list[int]:
    """'100' -> [100]; '50+100' (features averaged over timesteps) -> [50, 100]."""
    try:
        return [int(part) for part in str(spec).split("+")]
    except ValueError:
        raise OrthodiffError(f"head.json: feature timestep {spec!r} is not a number or 'a+b' list") from None


def classifier_spec(run_dir: Path, info: dict, head: dict, cfg) -> dict:
    """Everything that rebuilds the classification head and reproduces its features."""
    from ..features.selection import plane_sampling

    features = head.get("features") or {}
    planes = [p for p in PLANES if p in head.get("planes", [])]
    if "selection" in features:
        selection = {plane: [str(key) for key in features["selection"].get(plane) or []] for plane in planes}
    elif "block" in features and "timestep" in features:  # runs written before per-plane features
        selection = {plane: [f"{features['block']}@{features['timestep']}"] for plane in planes}
    else:
        raise OrthodiffError(f"{run_dir / 'head.json'}: features.selection missing; rerun the finetune")
    empty = [plane for plane, keys in selection.items() if not keys]
    if empty:
        raise OrthodiffError(
            f"{run_dir / 'head.json'}: features.selection names no feature for {empty}; rerun the finetune"
        )
    extraction = features.get("extraction") or {}
    averaged = any(plane_sampling(keys)[2] for keys in selection.values())
    spec = {
        "planes": planes,
        "selection": selection,
        "average_timesteps": averaged,
        "noise_draws": int(extraction.get("noise_draws", 1)),
        "seed": int(extraction.get("seed", info.get("seed", cfg.seed))),
        "pooling": head.get("pooling", "attention"),
        "readout_grid": [int(v) for v in head.get("readout_grid") or [1, 2, 2]],
        "fusion": head.get("fusion", "concat"),
        "attention_heads": HEAD_ATTENTION_HEADS,
        "use_ehr": bool(head.get("use_ehr", False)),
        "ehr_columns": list(cfg.data.ehr_columns),
        "ehr_stats": {},
    }
    if not spec["planes"]:
        raise OrthodiffError(f"{run_dir / 'head.json'}: names no plane; rerun the finetune")
    if spec["use_ehr"]:
        spec["ehr_stats"] = training_ehr_stats(info, cfg)
    return spec


def segmenter_spec(run_dir: Path, info: dict, head: dict, cfg) -> dict:
    features = head.get("features") or {}
    blocks = list(features.get("blocks") or [])
    if len(blocks) < 1 or "timestep" not in features:
        raise OrthodiffError(f"{run_dir / 'head.json'}: features.blocks / features.timestep missing; rerun the finetune")
    return {
        "planes": [p for p in PLANES if p in head.get("planes", [])],
        "bottleneck": blocks[0],
        "skips": blocks[1:],
        "timesteps": timesteps_of(features["timestep"]),
        "average_timesteps": False,
        "noise_draws": 1,
        "seed": int(info.get("seed", cfg.seed)),
        "pooling": head.get("pooling", "attention"),
        "width": int(cfg.finetune.decoder_width),
        # runs saved before the decoder had an image stem record none: the raw tensor joined
        "image_stem": int(head.get("image_stem", 0)),
    }


def training_ehr_stats(info: dict, cfg) -> dict:
    """The EHR standardisation the head was trained with (mean, std over its training studies)."""
    from ..data.cache import PlaneCache
    from ..data.datasets import StudyDataset
    from ..data.selection import select_cache
    from ..data.splits import load_splits
    from ..finetune.studies import run_patients

    try:
        cache = select_cache(PlaneCache(info["cache"]), cfg.data.series)
        patients = run_patients(load_splits(info["splits"]), info.get("labels_fraction", 1.0))
    except (KeyError, OrthodiffError) as exc:
        raise OrthodiffError(
            f"the classify run uses EHR, whose training statistics come from its cache and splits, which cannot be read "
            f"({exc}); keep them in place while assembling the pipeline"
        ) from None
    dataset = StudyDataset(cache, patients["train"], labels=[], ehr_columns=cfg.data.ehr_columns)
    return {column: [float(v) for v in stats] for column, stats in dataset.ehr_stats.items()}


def run_denoisers(run_dir: Path, info: dict, cfg, planes, pretrained: Path | None) -> tuple[dict, str]:
    """The denoisers a run's head was trained on, and where they came from.

    A partial/full run (and every segment run) saved its own under RUN/denoisers; a probe read
    ``pretrained`` (default: the run's ``finetune.pretrained``), or a seeded random init (scratch).
    """
    from ..features.backbones import build_denoisers
    from ..models.denoiser import load_denoisers

    own = Path(run_dir) / "denoisers"
    if own.is_dir():
        return load_denoisers(own, planes=planes), str(own.resolve())
    if info.get("init") == "pretrained":
        source = Path(pretrained) if pretrained is not None else Path(info.get("pretrained") or cfg.finetune.pretrained)
        if not (source / "denoisers").is_dir():
            raise OrthodiffError(
                f"{source}: no denoisers/ folder; pass pretrained= the `orthodiff pretrain` output the run {run_dir} used"
            )
        cfg.finetune.pretrained = str(source)
        where = str((source / "denoisers").resolve())
    else:
        where = f"random init (seed {cfg.seed})"
    size = {plane: tuple(int(v) for v in cfg.data.plane_size[plane]) for plane in planes}
    return build_denoisers(cfg, planes, size), where


def check_fingerprints(denoisers: dict, head: dict, run_dir: Path, where: str) -> None:
    """A probe's head.json records the fingerprints of the denoisers its features came from."""
    from ..features.backbones import denoiser_fingerprint

    recorded = ((head.get("features") or {}).get("extraction") or {}).get("denoisers") or {}
    for plane, fingerprint in recorded.items():
        if plane in denoisers and denoiser_fingerprint(denoisers[plane]) != fingerprint:
            raise OrthodiffError(
                f"{where}: the {plane} denoiser is not the one the features of {run_dir} came from "
                f"(fingerprint {fingerprint}); pass pretrained= the folder that run used"
            )


def run_thresholds(run_dir: Path, labels: list[str]) -> dict:
    """Per-label decision thresholds chosen on validation: from RUN/eval/metrics.json when
    ``orthodiff evaluate`` wrote one, else Youden's J on the run's validation predictions."""
    import pandas as pd

    from ..evaluation.classification import DEFAULT_THRESHOLD, choose_thresholds

    metrics = Path(run_dir) / "eval" / "metrics.json"
    if metrics.exists():
        saved = read_json(metrics).get("thresholds") or {}
        if all(label in saved for label in labels):
            return {label: {**saved[label], "file": str(metrics.resolve())} for label in labels}
    predictions = Path(run_dir) / "predictions.csv"
    if not predictions.exists():
        raise OrthodiffError(f"{predictions}: missing; the classify run did not finish, run it again")
    frame = pd.read_csv(predictions, dtype={"study_id": str, "patient_id": str})
    val = frame[frame["split"].astype(str) == "val"]
    if val.empty:
        return {label: {"value": DEFAULT_THRESHOLD, "source": "default",
                        "reason": f"the run has no validation predictions; used {DEFAULT_THRESHOLD}"} for label in labels}
    return choose_thresholds(val, labels)
