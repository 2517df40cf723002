"""A tiny trained pipeline for the prediction tests, built once per session with the real stages:
archive -> scan -> prepare -> split -> pretrain (one step per plane) -> finetune classify (probe) ->
finetune segment (probe) -> OrthoDiffusionPipeline.from_runs -> save_pretrained.

The archive is ``tiny_archive``'s (a bright blob decides label ``blob``), each image with a
dcm2niix-style sidecar (``SIDECAR``: a proton-density series without fat suppression), at plane
size 8 x 16 x 16 with the ``tiny`` denoiser config; the whole build takes well under a minute on
two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

from orthodiff.planes import PLANES

PLANE_SIZE = [8, 16, 16]
STUDIES = 12
# the sequence every training series has (site and field strength come from the archive's metadata.csv)
SIDECAR = {"SeriesDescription": "PD TSE", "Manufacturer": "Siemens", "ScanOptions": ["PFP"]}

_BUILT: dict = {}


def _overrides(root: Path) -> list[str]:
    return [
        f"data.archive={root / 'archive'}",
        f"data.cache={root / 'cache'}",
        f"data.splits={root / 'splits.json'}",
        *(f"data.plane_size.{plane}=[{','.join(map(str, PLANE_SIZE))}]" for plane in PLANES),
        f"pretrain.output_dir={root / 'pretrain'}",
        "pretrain.plane=all",
        "pretrain.max_steps=1",
        "pretrain.warmup_steps=0",
        "pretrain.checkpoint_every=100",
        "pretrain.preview_every=0",
        "pretrain.log_every=1",
        "pretrain.tracker=none",
        f"finetune.pretrained={root / 'pretrain'}",
        f"features.output_dir={root / 'features'}",
        "finetune.augment=false",
        "finetune.batch_size=8",
    ]


def build_tiny_pipeline(root: Path) -> dict:
    """Train and save a tiny pipeline under ``root``; returns the paths of every stage's output."""
    from tiny_archive import write_tiny_archive

    from orthodiff.config import load_config
    from orthodiff.data.prepare import prepare_cache
    from orthodiff.data.scan import scan_archive
    from orthodiff.data.splits import make_splits
    from orthodiff.finetune.run import run_finetune
    from orthodiff.pipeline.pipeline import OrthoDiffusionPipeline
    from orthodiff.training.pretrain import run_pretraining

    root = Path(root)
    archive = write_tiny_archive(root / "archive", studies=STUDIES)
    write_sidecars(archive, SIDECAR)
    scan_archive(archive, root / "manifest.parquet")
    prepare_cache(root / "manifest.parquet", root / "cache", plane_size=dict.fromkeys(PLANES, PLANE_SIZE), workers=1)
    make_splits(root / "manifest.parquet", root / "splits.json", seed=0, val_fraction=0.25, test_fraction=0.25,
                fractions=[1.0])
    overrides = _overrides(root)
    run_pretraining(load_config(["tiny"], overrides))
    run_finetune(load_config(["tiny"], overrides + [f"finetune.output_dir={root / 'classify'}", "finetune.task=classify",
                                                    "finetune.epochs=10"]))
    run_finetune(load_config(["tiny"], overrides + [f"finetune.output_dir={root / 'segment'}", "finetune.task=segment",
                                                    "finetune.epochs=1"]))
    pipeline = OrthoDiffusionPipeline.from_runs(root / "classify", root / "segment")
    pipeline.save_pretrained(root / "pipeline")
    return {"root": root, "archive": archive, "manifest": root / "manifest.parquet", "cache": root / "cache",
            "pretrain": root / "pretrain", "classify": root / "classify", "segment": root / "segment",
            "pipeline": root / "pipeline"}


def write_sidecars(folder: Path, sidecar: dict) -> None:
    """A BIDS sidecar (``<stem>.json``) beside every image of ``folder``, as dcm2niix writes them."""
    import json

    for image in Path(folder).rglob("*.nii.gz"):
        if not image.name.endswith("_seg.nii.gz"):
            image.with_name(image.name[: -len(".nii.gz")] + ".json").write_text(json.dumps(sidecar))


def tiny_pipeline(tmp_path_factory) -> dict:
    """The session's tiny pipeline (built on first use)."""
    if "paths" not in _BUILT:
        _BUILT["paths"] = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))
    return _BUILT["paths"]


def dicom_exams(tmp_path_factory) -> Path:
    """Two synthetic knee exams as DICOM (``orthodiff synth --format dicom``, at a 32-pixel matrix)."""
    if "dicom" not in _BUILT:
        from orthodiff.synth import synthesize_archive

        out = tmp_path_factory.mktemp("dicom-exams") / "archive"
        synthesize_archive(out, joint="knee", studies=2, seed=0, fmt="dicom", workers=1, matrix=32, progress=False)
        _BUILT["dicom"] = out
    return _BUILT["dicom"]
