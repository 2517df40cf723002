"""Torch datasets over a prepared cache: shapes, dtypes, missing planes, labels, EHR."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from orthodiff.data.cache import PlaneCache
from orthodiff.data.datasets import PlaneVolumeDataset, StudyDataset, collate_studies
from orthodiff.errors import OrthodiffError
from orthodiff.fileio import safe_filename

SIZE = {"sagittal": [4, 8, 8], "coronal": [4, 8, 6], "axial": [3, 8, 8]}


def _fill(series_id: str) -> float:
    """A distinct value per series, so a test can tell which series an item holds."""
    return (sum(map(ord, series_id)) % 100) / 100.0


@pytest.fixture()
def cache_dir(tmp_path):
    """A cache as ``orthodiff prepare`` writes it: three studies of two patients, s2 without coronal,
    s1 with two sagittal echoes, a segmentation on every sagittal series."""
    studies = [
        (
            "P1",
            "s1",
            dict(
                age=20.0,
                sex="F",
                height=160.0,
                weight=60.0,
                site="A",
                field_strength=1.5,
                label_acl=1.0,
                label_effusion=0.0,
            ),
            ["sagittal", "sagittal/echo2", "coronal", "axial"],
        ),
        (
            "P1",
            "s2",
            dict(
                age=40.0,
                sex="M",
                height=math.nan,
                weight=80.0,
                site="B",
                field_strength=3.0,
                label_acl=0.0,
                label_effusion=math.nan,
            ),
            ["sagittal", "axial"],
        ),
        (
            "P2",
            "s3",
            dict(
                age=60.0,
                sex="",
                height=180.0,
                weight=100.0,
                site="A",
                field_strength=3.0,
                label_acl=1.0,
                label_effusion=1.0,
            ),
            ["sagittal", "coronal", "axial"],
        ),
    ]
    rows = []
    for patient, study, meta, series in studies:
        for name in series:
            plane = name.split("/")[0]
            series_id = f"{study}/{name}"
            image = f"images/{safe_filename(series_id)}.npy"
            seg = f"segs/{safe_filename(series_id)}.npy" if plane == "sagittal" else ""
            (tmp_path / "images").mkdir(exist_ok=True)
            np.save(tmp_path / image, np.full((1, *SIZE[plane]), _fill(series_id), np.float16))
            if seg:
                (tmp_path / "segs").mkdir(exist_ok=True)
                np.save(tmp_path / seg, np.full((1, *SIZE[plane]), 2, np.uint8))
            rows.append(
                dict(
                    series_id=series_id,
                    study_id=study,
                    patient_id=patient,
                    plane=plane,
                    image=image,
                    seg=seg,
                    **meta,
                    source_shape="[8, 8, 4]",
                    source_affine=json.dumps(np.eye(4).tolist()),
                    tensor_affine=json.dumps(np.eye(4).tolist()),
                )
            )
    pd.DataFrame(rows).to_parquet(tmp_path / "index.parquet", index=False)
    (tmp_path / "cache.json").write_text(json.dumps({"format_version": 1, "plane_size": SIZE, "manifest": ""}))
    return tmp_path


def test_plane_volume_dataset(cache_dir):
    dataset = PlaneVolumeDataset(cache_dir, "sagittal")
    assert len(dataset) == 4  # both echoes count as volumes for pretraining
    item = dataset[0]
    assert item.dtype == torch.float32 and item.shape == (1, 4, 8, 8)
    only_p2 = PlaneVolumeDataset(PlaneCache(cache_dir), "coronal", patient_ids=["P2"])
    assert len(only_p2) == 1
    assert torch.allclose(only_p2[0], torch.full((1, 4, 8, 6), _fill("s3/coronal")), atol=1e-3)
    flipped = PlaneVolumeDataset(cache_dir, "axial", augment=lambda x: -x)
    assert flipped[0].max() <= 0
    with pytest.raises(OrthodiffError, match="no prepared coronal series"):
        PlaneVolumeDataset(cache_dir, "coronal", patient_ids=["P9"])


def test_study_items_missing_plane_labels_and_first_echo(cache_dir):
    dataset = StudyDataset(cache_dir, ["P1", "P2"], labels=["acl", "effusion"])
    assert dataset.study_ids == ["s1", "s2", "s3"]
    s1, s2 = dataset[0], dataset[1]
    assert s1["study_id"] == "s1" and s1["patient_id"] == "P1"
    assert s1["images"]["coronal"].shape == (1, 4, 8, 6) and s1["images"]["coronal"].dtype == torch.float32
    # several echoes: the first in sorted series_id order
    assert torch.allclose(s1["images"]["sagittal"], torch.full((1, 4, 8, 8), _fill("s1/sagittal")), atol=1e-3)
    assert s2["present"].tolist() == [True, False, True] and s2["present"].dtype == torch.bool
    assert torch.count_nonzero(s2["images"]["coronal"]) == 0
    assert s1["labels"].tolist() == [1.0, 0.0]
    assert s2["labels"][0] == 0.0 and torch.isnan(s2["labels"][1])
    assert s2["meta"] == {"site": "B", "field_strength": 3.0}
    assert "segs" not in s1


def test_ehr_standardised_with_missing_flags(cache_dir):
    dataset = StudyDataset(cache_dir, None, labels=["acl"])
    assert dataset.ehr_names == [
        "age",
        "sex",
        "height",
        "weight",
        "age_missing",
        "sex_missing",
        "height_missing",
        "weight_missing",
    ]
    ehr = torch.stack([dataset[i]["ehr"] for i in range(len(dataset))])
    assert ehr.shape == (3, 8) and ehr.dtype == torch.float32
    ages = ehr[:, 0]
    assert torch.allclose(ages.mean(), torch.tensor(0.0), atol=1e-6) and torch.allclose(
        ages.std(unbiased=False), torch.tensor(1.0)
    )
    assert ehr[:, 1].tolist() == [0.0, 1.0, 0.0] and ehr[:, 5].tolist() == [0.0, 0.0, 1.0]  # F, M, unknown
    assert ehr[1, 2] == 0.0 and ehr[1, 6] == 1.0  # missing height -> 0 with its flag
    # statistics passed in (from training patients) are used as given
    val = StudyDataset(
        cache_dir,
        ["P2"],
        labels=["acl"],
        ehr_stats={"age": (40.0, 10.0), "height": (170.0, 10.0), "weight": (0.0, 1.0)},
    )
    assert val[0]["ehr"][0].item() == pytest.approx(2.0) and val[0]["ehr"][2].item() == pytest.approx(1.0)
    with pytest.raises(OrthodiffError, match="EHR columns"):
        StudyDataset(cache_dir, None, labels=["acl"], ehr_columns=["bmi"])
    with pytest.raises(OrthodiffError, match="labels"):
        StudyDataset(cache_dir, None, labels=["nope"])


def test_segmentations_augment_and_collate(cache_dir):
    seen = []

    def augment(sample):
        seen.append(sorted(sample))
        return {key: (value + 1 if key.endswith("_seg") else value * 0) for key, value in sample.items()}

    dataset = StudyDataset(cache_dir, ["P1"], labels=["acl"], with_segmentation=True, augment=augment)
    item = dataset[1]  # s2: no coronal
    assert seen[-1] == ["axial", "sagittal", "sagittal_seg"]
    assert item["segs"]["sagittal"].dtype == torch.int64 and item["segs"]["sagittal"].shape == (4, 8, 8)
    assert int(item["segs"]["sagittal"].max()) == 3 and int(item["segs"]["axial"].max()) == 0
    assert item["seg_present"].tolist() == [True, False, False]

    batch = collate_studies([dataset[0], dataset[1]])
    assert batch["images"]["sagittal"].shape == (2, 1, 4, 8, 8) and batch["images"]["coronal"].shape == (2, 1, 4, 8, 6)
    assert batch["present"].shape == (2, 3) and batch["labels"].shape == (2, 1) and batch["ehr"].shape == (2, 8)
    assert batch["segs"]["sagittal"].shape == (2, 4, 8, 8) and batch["study_id"] == ["s1", "s2"]
    assert batch["meta"]["site"] == ["A", "B"] and batch["meta"]["field_strength"].tolist() == [1.5, 3.0]


def test_one_plane_studies(cache_dir):
    dataset = StudyDataset(cache_dir, None, labels=["acl"], planes=["coronal"])
    assert dataset.study_ids == ["s1", "s3"]  # s2 has no coronal series
    item = dataset[0]
    assert list(item["images"]) == ["coronal"] and item["present"].tolist() == [False, True, False]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_studies)
    assert next(iter(loader))["images"]["coronal"].shape == (2, 1, 4, 8, 6)


@pytest.mark.filterwarnings("ignore:.* has no positive patient for label")
def test_synth_scan_prepare_split_to_study_batches(tmp_path, capsys):
    """The real pipeline on a tiny synthetic archive, through the commands."""
    from orthodiff.cli import main
    from orthodiff.data.scan import scan_archive
    from orthodiff.data.splits import load_splits
    from orthodiff.synth import synthesize_archive

    synthesize_archive(tmp_path / "archive", studies=6, seed=0, workers=1, matrix=32, progress=False)
    manifest = tmp_path / "manifest.parquet"
    scan = scan_archive(tmp_path / "archive", manifest)
    n_series = len(scan.manifest)
    main(["prepare", str(manifest), "--out", str(tmp_path / "cache"), "-c", "tiny", "--workers", "1"])
    assert f"Prepared {n_series} of {n_series} series" in capsys.readouterr().out
    main(["prepare", str(manifest), "--out", str(tmp_path / "cache"), "-c", "tiny", "--workers", "1"])
    assert f"{n_series} were already done" in capsys.readouterr().out
    main(
        [
            "split",
            str(manifest),
            "--out",
            str(tmp_path / "splits.json"),
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
        ]
    )
    splits = load_splits(tmp_path / "splits.json")

    cache = PlaneCache(tmp_path / "cache")
    assert cache.plane_size == dict.fromkeys(("sagittal", "coronal", "axial"), (8, 32, 32))
    patients = splits.train + splits.val + splits.test
    dataset = StudyDataset(cache, patients, labels=splits.labels, with_segmentation=True)
    assert len(dataset) == 6
    batch = collate_studies([dataset[i] for i in range(len(dataset))])
    assert batch["images"]["axial"].shape == (6, 1, 8, 32, 32) and batch["labels"].shape == (6, len(splits.labels))
    assert batch["present"].sum() == n_series  # a study that lacks a plane shows it in the mask
    for plane, segs in batch["segs"].items():
        assert segs.dtype == torch.int64 and int(segs.max()) > 0, plane
    for plane, images in batch["images"].items():
        shown = batch["present"][:, ("sagittal", "coronal", "axial").index(plane)]
        assert images[shown].min() >= -1 and images[shown].max() <= 1 and images[shown].std() > 0.1
