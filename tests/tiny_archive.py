"""A tiny archive in the synthetic-archive layout, with a label that is plainly visible (a bright
blob) and a segmentation of it, for fine-tuning tests. Goes through the real scan -> prepare -> split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orthodiff.planes import PLANES

# Voxel axes (i, j, k) -> RAS axes; k (the third) is the slice axis, along the plane's normal.
_AXES = {"sagittal": (1, 2, 0), "coronal": (0, 2, 1), "axial": (0, 1, 2)}
SHAPE = (24, 24, 8)  # rows, cols, slices


def _affine(plane: str) -> np.ndarray:
    affine = np.zeros((4, 4))
    for voxel_axis, ras_axis in enumerate(_AXES[plane]):
        affine[ras_axis, voxel_axis] = 3.0 if voxel_axis == 2 else 1.0
    affine[3, 3] = 1
    return affine


def write_tiny_archive(root: Path, studies: int = 30, seed: int = 0, missing_every: int = 7) -> Path:
    """``studies`` studies, one patient each except every 5th patient who has two; label ``blob`` (per patient) is a
    bright sphere, label ``rim`` a dark ring; every ``missing_every``-th study lacks its axial plane."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels, metadata = ["study_id,blob,rim"], ["patient_id,study_id,joint,site,field_strength,age,sex,height,weight"]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), axis=-1).astype(float)
    patient = 0
    for index in range(studies):
        if index % 5 != 1:
            patient += 1
        patient_id, study_id = f"P{patient:04d}", f"knee-{index + 1:04d}"
        blob, rim = int(patient % 2 == 0), int(rng.random() < 0.5)  # blob: per patient
        labels.append(f"{study_id},{blob},{rim}")
        site = "A" if index % 3 else "B"
        metadata.append(f"{patient_id},{study_id},knee,{site},{1.5 if index % 2 else 3.0},{40 + index},"
                        f"{'F' if index % 2 else 'M'},{170 + index % 7},{70 + index % 5}")
        folder = root / patient_id / study_id
        folder.mkdir(parents=True, exist_ok=True)
        for plane in PLANES:
            if plane == "axial" and index % missing_every == 3:
                continue
            image = rng.normal(100, 10, SHAPE)
            centre = np.array([12, 12, 4]) + rng.integers(-2, 3, 3) * np.array([1, 1, 0])
            distance = np.linalg.norm((grid - centre) * np.array([1, 1, 3]), axis=-1)
            seg = np.zeros(SHAPE, np.uint8)
            seg[distance < 5] = 1
            seg[(distance >= 7) & (distance < 9)] = 2
            image[seg == 1] += 150 if blob else 20
            image[seg == 2] -= 60 if rim else 10
            affine = _affine(plane)
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / f"{plane}.nii.gz")
            nib.save(nib.Nifti1Image(seg, affine), folder / f"{plane}_seg.nii.gz")
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    (root / "metadata.csv").write_text("\n".join(metadata) + "\n")
    (root / "archive.json").write_text(json.dumps({
        "joint": "knee", "seed": seed, "studies": studies, "format": "nifti",
        "labels": ["blob", "rim"], "classes": ["background", "blob", "rim"],
    }))
    return root


def build_tiny_project(root: Path, studies: int = 30, plane_size=(8, 16, 16)) -> dict:
    """archive -> manifest -> cache -> splits under ``root``; returns the paths."""
    from orthodiff.data.prepare import prepare_cache
    from orthodiff.data.scan import scan_archive
    from orthodiff.data.splits import make_splits

    archive = write_tiny_archive(root / "archive", studies=studies)
    manifest = root / "manifest.parquet"
    scan_archive(archive, manifest)
    size = {plane: list(plane_size) for plane in PLANES}
    prepare_cache(manifest, root / "cache", plane_size=size, workers=1)
    make_splits(manifest, root / "splits.json", seed=0, val_fraction=0.25, test_fraction=0.25, fractions=[1.0, 0.5])
    return {"archive": archive, "manifest": manifest, "cache": root / "cache", "splits": root / "splits.json",
            "plane_size": size}


TINY_OVERRIDES = [
    "model.base_channels=8",
    "model.channel_mult=[1,2,2]",
    "model.attention_levels=[false,false,true]",
    "model.num_head_channels=8",
    "model.norm_num_groups=8",
    "finetune.epochs=8",
    "finetune.batch_size=8",
    "finetune.augment=false",
    "features.timesteps=[100]",
    "features.blocks=[mid]",
]

_PROJECTS: dict = {}


def shared_tiny_project(tmp_path_factory) -> dict:
    """One tiny project per test session (built once, shared by the test modules that use it),
    with pretrained-style denoiser checkpoints (random weights, saved through the real API)."""
    if "project" not in _PROJECTS:
        import torch

        from orthodiff.config import load_config
        from orthodiff.models.denoiser import Denoiser

        root = tmp_path_factory.mktemp("tiny-project")
        paths = build_tiny_project(root)
        cfg = load_config([], TINY_OVERRIDES)
        torch.manual_seed(0)
        for plane in PLANES:
            Denoiser(cfg.model, plane, paths["plane_size"][plane], cfg.diffusion).save_pretrained(
                root / "pretrain" / "denoisers" / plane
            )
        paths["pretrained"] = root / "pretrain"
        paths["root"] = root
        _PROJECTS["project"] = paths
    return _PROJECTS["project"]


def tiny_config(project: dict, out: Path, *overrides: str):
    """A config for ``project`` writing into ``out`` (features and run directory)."""
    from orthodiff.config import load_config

    size = project["plane_size"]["sagittal"]
    return load_config([], [
        *TINY_OVERRIDES,
        f"data.archive={project['archive']}",
        f"data.cache={project['cache']}",
        f"data.splits={project['splits']}",
        f"data.plane_size={{sagittal: {size}, coronal: {size}, axial: {size}}}",
        f"finetune.pretrained={project['pretrained']}",
        f"features.output_dir={out / 'features'}",
        f"finetune.output_dir={out / 'run'}",
        *overrides,
    ])


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run a module's tiny tensors on one thread, then restore the setting. On a shared 2-core
    machine, torch's second OpenMP thread spins while waiting and made these tests 6x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
