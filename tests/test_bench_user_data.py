"""The label-fraction bench on archives laid out as a user holds them: a labeled DICOM archive and a
separate unlabeled NIfTI archive written by ``orthodiff synth``, and a labels CSV; the protocol
checks that guard it (disjoint pool, usable labels, named shortfalls)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from orthodiff.bench import run_bench
from orthodiff.bench.data.user_data import (
    UserData,
    attach_labels,
    existing_denoisers,
    pretraining_provenance,
    studies_without_series,
    usable_labels,
    user_pretraining,
)
from orthodiff.bench.presets import resolve_preset
from orthodiff.cli import main
from orthodiff.errors import OrthodiffError
from orthodiff.fileio import sha256_file

GRID = ["seeds=[0]", "fractions=[1.0,0.5]", "methods=[orthodiff-probe,raw-voxels]", "segment_methods=[]"]
LAKESIDE = "Lakeside Imaging Centre"  # one of the synthetic archives' three sites


def synth(out: Path, seed: int, fmt: str, studies: int) -> Path:
    main(["synth", str(out), "--studies", str(studies), "--matrix", "32", "--seed", str(seed), "--format", fmt,
          "--workers", "1"])
    return out


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-archives")
    labeled = synth(root / "hospital", 0, "dicom", 24)
    pool = synth(root / "pool", 1, "nifti", 16)
    labels = pd.read_csv(labeled / "labels.csv", dtype=str)
    labels["never_seen"] = "0"  # a constant label: named and left out
    labels.to_csv(root / "labels.csv", index=False)
    return {"root": root, "labeled": labeled, "pool": pool, "labels": root / "labels.csv"}


@pytest.fixture(scope="module")
def distinct_pool(archives):
    """synth numbers patients P0001... under every seed, so its two archives share patient ids; this
    is the pool with its own ids, given as a user would: in the metadata.csv that scan reads."""
    folder = archives["root"] / "pool-own-ids"
    shutil.copytree(archives["pool"], folder)
    metadata = pd.read_csv(archives["pool"] / "metadata.csv", dtype=str)
    metadata["patient_id"] = "U-" + metadata["patient_id"]
    metadata.to_csv(folder / "metadata.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def bench(archives, distinct_pool):
    out = archives["root"] / "bench" / "label-fraction"
    user = UserData(labeled=archives["labeled"], unlabeled=distinct_pool, labels=archives["labels"])
    result = run_bench("label-fraction", "test", out, GRID, user=user)
    return out, result


def test_label_fraction_runs_end_to_end_on_the_users_archives(bench, archives):
    out, result = bench
    stored = json.loads((out / "results.json").read_text())
    assert len(stored["rows"]) == 4 and result.computed == 4
    assert f"--labeled {archives['labeled']}" in stored["command"]
    # the labeled archive was scanned, prepared and split under <out>/user, patients as the archive names them
    manifest = pd.read_parquet(out / "user" / "manifest.parquet")
    splits = json.loads((out / "user" / "splits.json").read_text())
    assert set(manifest["patient_id"]) == set(pd.read_csv(archives["labeled"] / "metadata.csv")["patient_id"])
    assert set(splits["train"] + splits["val"] + splits["test"]) == set(manifest["patient_id"])
    assert "label_never_seen" not in manifest.columns and "label_acl_tear" in manifest.columns
    pool = stored["unlabeled_pool"]
    assert pool["source"] == "separate archive" and pool["archive"] == str(Path(archives["root"] / "pool-own-ids"))
    pool_patients = set(pd.read_parquet(Path(pool["pool"]) / "manifest.parquet")["patient_id"])
    assert all(p.startswith("U-") for p in pool_patients) and not pool_patients & set(manifest["patient_id"])
    report = (out / "report.md").read_text()
    assert f"The user's labeled archive `{archives['labeled']}`" in report
    assert "label never_seen: 0 in all 24 labeled studies" in report
    # 16 pool studies for ~9 training patients: short of 5x, named, not refused
    assert "protocol: at least 5x" in report and pool["ratio"] < 5
    # every section the synthetic bench's report has: counts, the headline against the floors, per label,
    # the ceiling, how each cell trained, how pretraining went, plots
    for section in ("## Protocol: patients and positives per label", "## Macro AUROC over the headline labels",
                    "## Headline: orthodiff at", "## Per-label AUROC", "## Learnability: the ceiling per label",
                    "## Convergence (training loss", "## Pretraining", "## Plots"):
        assert section in report, section


def test_a_pool_sharing_a_patient_with_the_labeled_archive_is_refused_in_one_line(bench, archives):
    out, _ = bench
    user = UserData(labeled=archives["labeled"], unlabeled=archives["pool"], labels=archives["labels"])
    with pytest.raises(OrthodiffError, match="'P0001'") as refused:
        run_bench("label-fraction", "test", out, GRID, user=user)
    assert "\n" not in str(refused.value) and "patient" in str(refused.value)
    assert len(list(out.glob("user-pool-*/manifest.parquet"))) == 1  # the refused pool was not written


def test_pretraining_on_the_training_patients_never_sees_validation_or_test(bench):
    out, _ = bench
    preset, _ = resolve_preset("test", GRID)
    from orthodiff.bench.data.workspace import JointData, joint_config

    data = JointData("knee", out / "user", joint_config(preset, out / "user", "knee"))
    folder, record, _ = user_pretraining(preset, out, UserData(labeled=out / "user" / "manifest.parquet",
                                                               pool_from_training=True), data)
    splits = json.loads((out / "user" / "splits.json").read_text())
    trained_on = json.loads((folder / "pool-splits.json").read_text())
    assert set(trained_on["train"] + trained_on["val"]) == set(splits["train"])
    assert record["source"] == "training patients"
    from orthodiff.bench.label_fraction import _pool_lines

    assert "TRAINING patients only" in _pool_lines(record)[0]


def test_existing_denoisers_are_recorded_and_checked_against_the_plane_size(bench):
    out, _ = bench
    stored = json.loads((out / "results.json").read_text())
    folder = Path(stored["unlabeled_pool"]["pretraining"])
    preset, _ = resolve_preset("test", GRID)
    from orthodiff.bench.data.workspace import joint_config

    config = joint_config(preset, out / "user", "knee")
    record = existing_denoisers(folder, config)
    assert record["sha256"]["axial"] == sha256_file(folder / "denoisers" / "axial" / "model.safetensors")
    assert record["unlabeled_patients"] == stored["unlabeled_pool"]["unlabeled_patients"]
    # the cross-joint and robustness reports name them by joint, path, pool size and digest
    line = pretraining_provenance(record)
    assert line.startswith(f"Pretraining: none in this run; the knee denoisers of `{folder.resolve()}`")
    assert record["sha256"]["axial"][:12] in line and f"{record['unlabeled_patients']} unlabeled patients" in line
    from orthodiff.bench.data.domains import HeldOut
    from orthodiff.bench.data.workspace import JointData

    data = JointData("knee", out / "user", config)
    _, _, warnings = user_pretraining(preset, out, UserData(labeled=out / "user", denoisers=folder), data,
                                      domain=HeldOut("site", LAKESIDE))
    assert any(f"never saw site={LAKESIDE}" in warning for warning in warnings)  # they may have seen it
    import orthodiff.pretrained

    shipped = Path(orthodiff.pretrained.__file__).parent / "knee-small"
    with pytest.raises(OrthodiffError, match=r"data\.plane_size\.sagittal=\[8,32,32\]"):
        existing_denoisers(shipped, config)


def test_labels_csv_keyed_by_patient_and_values_other_than_zero_one(tmp_path):
    frame = pd.DataFrame({"patient_id": ["A", "A", "B"], "study_id": ["a1", "a2", "b1"], "label_old": [0.0, 1.0, 0.0]})
    csv = tmp_path / "labels.csv"
    csv.write_text("patient_id,acl\nA,1\nB,0\nC,1\n")
    labeled, notes = attach_labels(frame, csv)
    assert list(labeled["label_acl"]) == [1.0, 1.0, 0.0] and "label_old" not in labeled.columns
    assert any("'C'" in note for note in notes)  # a row naming no patient of the archive is named
    csv.write_text("study_id,acl\na1,1\na2,yes\n")
    with pytest.raises(OrthodiffError, match=r"label 'acl' is 'yes' for study_id 'a2' \(row 3\)"):
        attach_labels(frame, csv)


def test_unusable_labels_are_named_and_left_out_and_none_left_is_refused():
    frame = pd.DataFrame({"patient_id": ["A", "B", "C"], "study_id": ["a", "b", "c"], "label_ok": [0.0, 1.0, None],
                          "label_flat": [1.0, 1.0, 1.0], "label_empty": [None, None, None]})
    kept, notes = usable_labels(frame, "archive")
    assert [c for c in kept.columns if c.startswith("label_")] == ["label_ok"]
    assert any("flat" in n and "constant" in n for n in notes) and any("empty" in n and "no study" in n for n in notes)
    assert any("'c'" in n for n in notes)  # a study without any label value
    with pytest.raises(OrthodiffError, match="no label varies"):
        usable_labels(frame.drop(columns=["label_ok"]), "archive")
    with pytest.raises(OrthodiffError, match="label 'ok' holds 2"):
        usable_labels(frame.assign(label_ok=[0.0, 2.0, 1.0]), "archive")
    with pytest.raises(OrthodiffError, match="--labels CSV"):
        usable_labels(frame[["patient_id", "study_id"]], "archive")


def test_a_study_without_a_prepared_series_is_named(tmp_path):
    from orthodiff.fileio import write_table

    manifest = pd.DataFrame({"patient_id": ["A", "A", "B"], "study_id": ["a", "a", "b"], "series_id": ["a1", "a2", "b1"],
                             "plane": ["sagittal"] * 3, "path": ["x"] * 3, "format": ["nifti"] * 3})
    write_table(tmp_path / "manifest.parquet", manifest)
    (tmp_path / "cache").mkdir()
    pd.DataFrame({"series_id": ["a2"]}).to_parquet(tmp_path / "cache" / "index.parquet")
    lines = studies_without_series(tmp_path / "manifest.parquet", tmp_path / "cache")
    assert len(lines) == 1 and lines[0].startswith("study b: no usable series")


def test_user_options_that_do_not_go_together_are_refused(tmp_path):
    with pytest.raises(OrthodiffError, match="need --labeled"):
        UserData(unlabeled=tmp_path).check()
    with pytest.raises(OrthodiffError, match="give one of them"):
        UserData(labeled=tmp_path, unlabeled=tmp_path, pool_from_training=True).check()
    with pytest.raises(OrthodiffError, match="needs a pretraining source"):
        UserData(labeled=tmp_path).check()
    with pytest.raises(OrthodiffError, match="needs --labeled and --held-out"):
        run_bench("robustness", "test", tmp_path / "out", user=UserData(denoisers=tmp_path))
    with pytest.raises(OrthodiffError, match="needs --held-out COLUMN=VALUE"):
        UserData(labeled=tmp_path, denoisers=tmp_path).check("robustness")
    with pytest.raises(OrthodiffError, match="expected COLUMN=VALUE"):
        UserData(labeled=tmp_path, denoisers=tmp_path, held_out="site").check("robustness")
    with pytest.raises(OrthodiffError, match="an option of `orthodiff bench robustness`"):
        UserData(labeled=tmp_path, denoisers=tmp_path, held_out="site=A").check("label-fraction")
    with pytest.raises(OrthodiffError, match="pretrains on the source joint"):
        UserData(labeled=tmp_path, pool_from_training=True).check("cross-joint")


def test_mrnet_valid_exams_are_the_test_set(tmp_path):
    from orthodiff.bench.data.user_data import mrnet_valid_patients, test_on_mrnet_valid
    from orthodiff.data.splits import load_splits, make_splits
    from orthodiff.fileio import write_table

    exams = [("train", n) for n in range(16)] + [("valid", 1130 + n) for n in range(6)]
    rows = [{"patient_id": f"mrnet-{split}-{n:04d}", "study_id": f"mrnet-{split}-{n:04d}",
             "series_id": f"mrnet-{split}-{n:04d}/{plane}", "plane": plane, "path": "x", "format": "mrnet",
             "label_acl": float(n % 2), "label_meniscus": float(n % 3 == 0)}
            for split, n in exams for plane in ("sagittal", "coronal", "axial")]
    write_table(tmp_path / "manifest.parquet", pd.DataFrame(rows))
    valid = mrnet_valid_patients(tmp_path / "manifest.parquet")
    assert valid == [f"mrnet-valid-{1130 + n:04d}" for n in range(6)]
    make_splits(tmp_path / "manifest.parquet", tmp_path / "splits.json", val_fraction=0.25, test_fraction=0.0,
                fractions=[1.0, 0.5])
    test_on_mrnet_valid(tmp_path / "splits.json", tmp_path / "manifest.parquet", 0)
    splits = load_splits(tmp_path / "splits.json")
    assert sorted(splits.test) == valid
    assert all(p.startswith("mrnet-train-") for p in splits.train + splits.val) and splits.val
    assert set(splits.subset(0.5)) <= set(splits.train)


@pytest.fixture(scope="module")
def mrnet_folder(tmp_path_factory):
    from mrnet_archive import write_mrnet_archive

    return write_mrnet_archive(tmp_path_factory.mktemp("mrnet") / "MRNet-v1.0", train=24, valid=8)


def mrnet_bench_command(out: Path, folder: Path) -> list[str]:
    return ["bench", "label-fraction", "--preset", "test", "--out", str(out), "--labeled", str(folder),
            "--pool-from-training", *GRID]


@pytest.fixture(scope="module")
def mrnet_bench(mrnet_folder):
    out = mrnet_folder.parent / "bench" / "label-fraction"
    status = main(mrnet_bench_command(out, mrnet_folder))
    return out, status


def test_label_fraction_runs_end_to_end_on_an_mrnet_folder_pretraining_on_its_training_patients(mrnet_bench):
    from mrnet_archive import mrnet_exams

    out, status = mrnet_bench
    assert status is None  # main returned: exit status 0
    stored = json.loads((out / "results.json").read_text())
    assert len(stored["rows"]) == 4 and {row["method"] for row in stored["rows"]} == {"orthodiff-probe", "raw-voxels"}
    for row in stored["rows"]:  # each scored on the 8 valid exams, per MRNet label
        assert row["n_test_patients"] == 8 and set(row["auroc"]) == {"abnormal", "acl", "meniscus"}
    # MRNet's valid exams are the test set; training and validation patients are train exams only
    splits = json.loads((out / "user" / "splits.json").read_text())
    exams = mrnet_exams(24, 8)
    assert splits["test"] == [f"mrnet-valid-{n:04d}" for n in exams["valid"]]
    assert set(splits["train"] + splits["val"]) == {f"mrnet-train-{n:04d}" for n in exams["train"]} and splits["val"]
    # pretraining read training patients only: no validation patient, no valid exam
    pool = stored["unlabeled_pool"]
    assert pool["source"] == "training patients" and pool["labeled_train_patients"] == len(splits["train"])
    trained_on = json.loads((Path(pool["pretraining"]) / "pool-splits.json").read_text())
    assert set(trained_on["train"] + trained_on["val"]) == set(splits["train"])
    report = (out / "report.md").read_text()
    assert "| split | fraction | patients | acl | meniscus | abnormal |" in report
    assert "Pretraining: on the labeled archive's TRAINING patients only" in report
    assert "test set: the 8 patient(s) of MRNet's valid exams" in report


def test_an_edited_mrnet_label_csv_is_never_read_stale(mrnet_bench, mrnet_folder, capsys):
    out, _ = mrnet_bench
    table = mrnet_folder / "valid-acl.csv"
    original = table.read_text()
    table.write_text(original.replace(",0\n", ",1\n", 1))
    try:
        with pytest.raises(SystemExit) as exited:
            main(mrnet_bench_command(out, mrnet_folder))
    finally:
        table.write_text(original)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and error.startswith(f"orthodiff: error: {out / 'user'}: prepared from other data")


def test_an_mrnet_pool_with_its_own_patient_ids_in_metadata_csv_is_disjoint_from_an_mrnet_archive(mrnet_folder,
                                                                                                tmp_path):
    """Two MRNet folders name their exams alike (mrnet-train-0000, ...); the pool's metadata.csv
    patient_id is what tells its patients apart, as the refusal says."""
    from mrnet_archive import write_mrnet_archive

    from orthodiff.bench.data.user_data import check_disjoint, read_user_archive

    labeled, _ = read_user_archive(mrnet_folder, tmp_path / "labeled.parquet")
    pool_folder = write_mrnet_archive(tmp_path / "pool", train=4, valid=2, side=16, seed=1)
    pool, _ = read_user_archive(pool_folder, tmp_path / "pool.parquet")
    with pytest.raises(OrthodiffError, match="'mrnet-train-0000'.*metadata.csv patient_id"):
        check_disjoint(pool, labeled, pool_folder)
    studies = sorted(set(pool["study_id"]))
    pd.DataFrame({"study_id": studies, "patient_id": ["U-" + s for s in studies]}).to_csv(
        pool_folder / "metadata.csv", index=False)
    pool, _ = read_user_archive(pool_folder, tmp_path / "pool-own-ids.parquet")
    assert sorted(set(pool["patient_id"])) == ["U-" + s for s in studies]
    check_disjoint(pool, labeled, pool_folder)


def test_the_command_line_offers_the_user_data_options_and_refuses_a_labeled_archive_alone(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "label-fraction", "--preset", "test", "--out", str(tmp_path / "out"), "--labeled", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and error.count("\n") == 0 and "--pool-from-training" in error
    assert not (tmp_path / "out").exists()  # refused before anything is written
    with pytest.raises(SystemExit) as exited:
        main(["bench", "robustness", "--preset", "test", "--out", str(tmp_path / "out"), "--labeled", str(tmp_path),
              "--denoisers", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and error.count("\n") == 0 and "--held-out COLUMN=VALUE" in error


# ------------------------------------------------------------------------------ cross-joint, robustness
@pytest.fixture(scope="module")
def ankle_archive(archives):
    """A labeled archive of another joint, as a hospital exports it: DICOM with its labels.csv."""
    main(["synth", str(archives["root"] / "ankle-hospital"), "--joint", "ankle", "--studies", "16", "--matrix", "32",
          "--seed", "2", "--format", "dicom", "--workers", "1"])
    return archives["root"] / "ankle-hospital"


def test_cross_joint_runs_end_to_end_from_a_knee_pool_to_the_users_ankle_archive(archives, distinct_pool,
                                                                               ankle_archive):
    out = archives["root"] / "bench" / "cross-joint"
    user = UserData(labeled=ankle_archive, unlabeled=distinct_pool)
    result = run_bench("cross-joint", "test", out, GRID, user=user)
    stored = json.loads((out / "results.json").read_text())
    assert result.computed == 2 and {row["joint"] for row in stored["rows"]} == {"ankle"}
    assert f"--labeled {ankle_archive} --unlabeled {distinct_pool}" in stored["command"]
    # the source and target are named by what their scans say, the source pool recorded
    assert stored["pretrained_on"] == "knee" and stored["user_data"]["targets"] == ["ankle"]
    pool = stored["unlabeled_pools"]["knee"]
    assert pool["source"] == "separate archive" and pool["archive"] == str(distinct_pool)
    assert Path(stored["source_denoisers"]) == Path(pool["pretraining"]).resolve()
    report = (out / "report.md").read_text()
    assert report.startswith("# Cross-joint bench (knee-pretrained denoisers on ankle)")
    assert f"target: the user's labeled ankle archive `{ankle_archive}` (16 studies of" in report
    assert f"unlabeled knee patients of the user's archive `{distinct_pool}`" in report
    assert "## ankle: macro AUROC (classify)" in report


def test_a_source_pool_sharing_a_patient_with_the_target_archive_is_refused(archives, ankle_archive):
    out = archives["root"] / "bench" / "cross-joint"  # the target prepared by the run above (or now)
    with pytest.raises(OrthodiffError, match="'P0001'") as refused:
        run_bench("cross-joint", "test", out, GRID, user=UserData(labeled=ankle_archive, unlabeled=archives["pool"]))
    assert "\n" not in str(refused.value) and "patient" in str(refused.value)


def test_robustness_holds_a_site_out_of_training_and_of_the_pool(archives, distinct_pool):
    out = archives["root"] / "bench" / "robustness"
    held_out = f"site={LAKESIDE}"  # named as the archive spells it, whatever the case it was given in
    user = UserData(labeled=archives["labeled"], labels=archives["labels"], unlabeled=distinct_pool,
                    held_out=held_out.lower())
    result = run_bench("robustness", "test", out, GRID, user=user)
    assert result.computed == 2
    scenario = "unseen-site-lakeside-imaging-centre"
    manifest = pd.read_parquet(out / "user" / "manifest.parquet")
    lakeside = set(manifest.loc[manifest["site"] == LAKESIDE, "patient_id"])
    splits = json.loads((out / "user" / f"splits-{scenario}.json").read_text())
    assert lakeside and lakeside <= set(splits["test"]) and not lakeside & set(splits["train"] + splits["val"])
    # pretraining never saw a pool patient of the held-out site
    stored = json.loads((out / "results.json").read_text())
    pool = stored["unlabeled_pools"][scenario]
    pool_frame = pd.read_parquet(Path(pool["pool"]) / "manifest.parquet")
    pool_lakeside = set(pool_frame.loc[pool_frame["site"] == LAKESIDE, "patient_id"])
    trained_on = json.loads((Path(pool["pretraining"]) / "pool-splits.json").read_text())
    assert pool_lakeside and not pool_lakeside & set(trained_on["train"] + trained_on["val"])
    assert pool["domain_left_out"] == {"held_out": held_out, "patients": len(pool_lakeside)}
    # each run is scored on the held-out site and on the others
    for row in stored["rows"]:
        assert set(row["by_held_out"]) == {held_out, "other site"}
    report = (out / "report.md").read_text()
    assert report.startswith(f"# Robustness bench (knee, the user's archive): unseen {held_out}")
    assert f"| {held_out} (unseen) |" in report and f"patient(s) of {held_out} left out" in report


def test_a_held_out_column_or_value_the_archive_lacks_is_refused_in_one_line(bench, archives):
    out, _ = bench
    stored = json.loads((out / "results.json").read_text())
    manifest, denoisers = out / "user" / "manifest.parquet", Path(stored["unlabeled_pool"]["pretraining"])
    robustness = archives["root"] / "bench" / "robustness-refused"
    with pytest.raises(OrthodiffError, match="has no column 'scanner'; columns to hold out") as refused:
        run_bench("robustness", "test", robustness, GRID,
                  user=UserData(labeled=manifest, denoisers=denoisers, held_out="scanner=X"))
    assert "\n" not in str(refused.value) and "site" in str(refused.value)
    with pytest.raises(OrthodiffError, match=f"no series of .* has site 'Nowhere'; values present: .*'{LAKESIDE}'"):
        run_bench("robustness", "test", robustness, GRID,
                  user=UserData(labeled=manifest, denoisers=denoisers, held_out="site=Nowhere"))
    assert not (robustness / "results.json").exists()  # refused before any cell
    from orthodiff.bench.data.domains import HeldOut

    frame = pd.read_parquet(manifest)
    three_tesla = set(frame.loc[frame["field_strength"] == 3.0, "patient_id"])
    assert HeldOut.parse("field_strength=3").patients(frame) == three_tesla  # numbers match as numbers
