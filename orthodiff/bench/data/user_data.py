"""A bench on the user's own archives instead of synthetic ones: a labeled archive, and a separate
unlabeled pool to pretrain on (or the labeled archive's training patients, or denoisers already
pretrained).

Each archive is a folder that ``orthodiff scan`` reads (DICOM, NIfTI/NRRD, the MRNet layout) or a
manifest it wrote. The labeled one goes through scan -> prepare -> split under ``<bench out>/user/``
exactly as a synthetic archive does; the pool is scanned and prepared under
``<bench out>/user-pool-<key of its path>/`` with its labels dropped. The protocol is checked
before anything trains: the pool shares no patient, study (StudyInstanceUID) or series
(SeriesInstanceUID) with the labeled archive (refused, naming one), each label is 0/1 and varies
(named and left out otherwise), and what is short of the protocol (few test patients, a pool under
5x the labeled training patients, studies with no usable series) is named in the report and on the
terminal.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ...config import ExperimentConfig
from ...errors import OrthodiffError
from ...fileio import read_json, sha256_file, write_json, write_table
from ..presets import BenchPreset

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".parquet", ".csv")
LABELED_FOLDER = "user"
POOL_FOLDER = "user-pool"
MIN_POOL_RATIO = 5  # unlabeled patients per labeled training patient the protocol asks for
UNNAMED_JOINT = "target"  # a labeled archive's joint until its scans name it


@dataclass(frozen=True)
class UserData:
    """What the user pointed the bench at; every path is optional, the synthetic archives fill in.
    ``held_out`` (robustness) is COLUMN=VALUE of the labeled manifest: the domain tested, never trained on."""

    labeled: Path | None = None
    unlabeled: Path | None = None
    labels: Path | None = None
    pool_from_training: bool = False
    denoisers: Path | None = None
    held_out: str | None = None

    @property
    def given(self) -> bool:
        return bool(self.labeled or self.unlabeled or self.labels or self.denoisers or self.pool_from_training
                    or self.held_out)

    def check(self, bench: str = "label-fraction") -> None:
        """One line for options that do not go together, on ``bench``, or paths that are not there."""
        if not self.labeled and (self.unlabeled or self.labels or self.pool_from_training or self.held_out):
            raise OrthodiffError("--unlabeled, --labels, --pool-from-training and --held-out need --labeled PATH (the "
                                 "labeled archive folder or its manifest)")
        if self.held_out and bench != "robustness":
            raise OrthodiffError(f"--held-out {self.held_out}: an option of `orthodiff bench robustness`, not of {bench}")
        sources = [name for name, on in (("--unlabeled", self.unlabeled), ("--pool-from-training",
                                         self.pool_from_training), ("--denoisers", self.denoisers)) if on]
        if len(sources) > 1:
            raise OrthodiffError(f"{' and '.join(sources)} each say what pretraining reads; give one of them")
        if self.labeled and not sources:
            raise OrthodiffError("--labeled needs a pretraining source: --unlabeled PATH (a separate unlabeled "
                                 "archive), --pool-from-training, or --denoisers PATH (denoisers already pretrained)")
        if bench == "cross-joint" and self.pool_from_training:
            raise OrthodiffError("--pool-from-training: the cross-joint bench pretrains on the source joint, never on "
                                 "the target's scans; give --unlabeled PATH (an unlabeled source-joint archive) or "
                                 "--denoisers DIR")
        if bench == "robustness":
            self._check_robustness()
        for option, path in (("--labeled", self.labeled), ("--unlabeled", self.unlabeled), ("--labels", self.labels),
                             ("--denoisers", self.denoisers)):
            if path and not Path(path).exists():
                raise OrthodiffError(f"{option} {path}: not found; give an existing folder or file")

    def _check_robustness(self) -> None:
        from .domains import HeldOut

        if self.labeled and not self.held_out:
            raise OrthodiffError("--labeled on the robustness bench needs --held-out COLUMN=VALUE (the domain to test "
                                 "on, e.g. site=Lakeside or field_strength=1.5)")
        if self.denoisers and not self.labeled:
            raise OrthodiffError("--denoisers on the robustness bench needs --labeled and --held-out: the synthetic "
                                 "scenarios pretrain without their held-out domain")
        if self.held_out:
            HeldOut.parse(self.held_out)

    def options(self) -> list[str]:
        """The command-line options that give this data, for the command recorded in the report."""
        found = [f"--{name} {Path(path).resolve()}" for name, path in (
            ("labeled", self.labeled), ("unlabeled", self.unlabeled), ("labels", self.labels),
            ("denoisers", self.denoisers)) if path]
        found += [f"--held-out {self.held_out}"] if self.held_out else []
        return found + (["--pool-from-training"] if self.pool_from_training else [])

    def as_dict(self) -> dict:
        found = {name: str(Path(getattr(self, name)).resolve()) for name in ("labeled", "unlabeled", "labels", "denoisers")
                 if getattr(self, name)}
        if self.labels:
            found["labels_sha256"] = sha256_file(self.labels)
        if self.held_out:
            found["held_out"] = self.held_out
        return {**found, "pool_from_training": bool(self.pool_from_training)}


def archive_joint(manifest: Path, fallback: str) -> str:
    """The joint a manifest's series say they show (BodyPartExamined, or metadata.csv's joint), several
    joined by "/"; ``fallback`` when no series says."""
    from ...data.manifest import read_manifest

    frame = read_manifest(manifest)
    if "joint" not in frame.columns:
        return fallback
    joints = sorted({str(v).strip().lower() for v in frame["joint"].dropna()} - {""})
    return "/".join(joints) if joints else fallback


# ------------------------------------------------------------------------------------------- reading
def read_user_archive(path: Path, scratch: Path, labels_csv: Path | None = None):
    """The manifest of a user's archive: ``path`` scanned when it is a folder, read when it is a
    manifest; its labels replaced by ``labels_csv`` when given. Returns (frame, notes)."""
    from ...data.manifest import read_manifest
    from ...data.scan import scan_archive

    path, notes = Path(path), []
    if path.is_dir():
        scanned = scan_archive(path, scratch)
        frame = read_manifest(scratch)
        if scanned.errors:
            notes.append(f"{path}: the scan set aside {len(scanned.errors)} file(s), series or table rows, listed in "
                         f"{scanned.errors_path}")
        # a labeled study with no series at all never reaches a split: name each
        notes += [f"{path}: {problem.reason}" for problem in scanned.errors if "has no series" in problem.reason]
    elif path.suffix.lower() in MANIFEST_SUFFIXES:
        frame = read_manifest(path)
    else:
        raise OrthodiffError(f"{path}: neither an archive folder nor a manifest (.parquet or .csv from "
                             "`orthodiff scan`); give the folder that holds the scans")
    if labels_csv is not None:
        frame, found = attach_labels(frame, Path(labels_csv))
        notes += found
    return frame, notes


def attach_labels(frame, labels_csv: Path):
    """``frame`` with its label columns replaced by those of ``labels_csv`` (keyed by study_id, or by
    patient_id for labels of every study of a patient). Returns (frame, notes)."""
    import pandas as pd

    from ...data.manifest import LABEL_PREFIX, label_columns

    table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    key = next((k for k in ("study_id", "patient_id") if k in table.columns), None)
    if key is None:
        raise OrthodiffError(f"{labels_csv}: no study_id or patient_id column (columns: {', '.join(table.columns)}); "
                             "key each row by the study_id or patient_id that `orthodiff scan` gives")
    names = [c for c in table.columns if c not in ("study_id", "patient_id")]
    if not names:
        raise OrthodiffError(f"{labels_csv}: no label column beside {key}; add one 0/1 column per label")
    table[key] = table[key].str.strip()
    repeated = table[key][table[key].duplicated()]
    if len(repeated):
        raise OrthodiffError(f"{labels_csv}: {key} {repeated.iloc[0]!r} appears in more than one row; keep one")
    values = {name: _zero_one(table, name, key, labels_csv) for name in names}
    frame = frame.drop(columns=label_columns(frame))
    ids = frame[key].astype(str)
    for name in names:
        frame[LABEL_PREFIX + name] = ids.map(dict(zip(table[key], values[name]))).astype("float64")
    notes = []
    unknown = sorted(set(table[key]) - set(ids))
    if unknown:
        notes.append(f"{labels_csv}: {len(unknown)} row(s) name a {key} with no series in the labeled archive "
                     f"(e.g. {unknown[0]!r}); their labels are not used")
    return frame, notes


def _zero_one(table, name: str, key: str, source: Path):
    """Column ``name`` as 0.0 / 1.0 / NaN (blank); any other value is refused, naming its row."""
    import pandas as pd

    raw = table[name].str.strip()
    blank = raw.str.lower().isin(["", "nan", "na"])
    numbers = pd.to_numeric(raw.where(~blank), errors="coerce")
    bad = ~blank & ~numbers.isin([0, 1])
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise OrthodiffError(f"{source}: label {name!r} is {raw.iloc[row]!r} for {key} {table[key].iloc[row]!r} "
                             f"(row {row + 2}); labels are 0, 1 or blank (unknown)")
    return numbers.where(~blank)


def usable_labels(frame, source: str):
    """``frame`` without the label columns that cannot be learned or scored (no values, one value
    only), each named; refused when a label holds other values than 0/1 or none is left.
    Returns (frame, notes)."""
    import numpy as np

    from ...data.manifest import LABEL_PREFIX, label_columns

    columns = label_columns(frame)
    if not columns:
        raise OrthodiffError(f"{source}: the labeled archive has no labels (no labels.csv, no MRNet label CSVs); "
                             "give --labels CSV keyed by study_id or patient_id")
    notes, dropped = [], []
    studies = frame.drop_duplicates("study_id")
    for column in columns:
        name, values = column[len(LABEL_PREFIX):], studies[column].astype("float64")
        known = values.dropna()
        if not np.isin(known, [0.0, 1.0]).all():
            other = sorted(set(known) - {0.0, 1.0})[0]
            raise OrthodiffError(f"{source}: label {name!r} holds {other:g}; labels are 0, 1 or blank (unknown)")
        if known.empty:
            notes.append(f"label {name}: no study has a value; left out")
            dropped.append(column)
        elif known.nunique() == 1:
            notes.append(f"label {name}: {known.iloc[0]:g} in all {len(known)} labeled studies (constant: nothing "
                         "to learn or score); left out")
            dropped.append(column)
    if len(dropped) == len(columns):
        raise OrthodiffError(f"{source}: no label varies across the labeled studies ({'; '.join(notes)}); check the "
                             "labels table")
    frame = frame.drop(columns=dropped)
    unlabeled = studies.loc[studies[[c for c in columns if c not in dropped]].isna().all(axis=1), "study_id"]
    if len(unlabeled):
        notes.append(f"{len(unlabeled)} labeled-archive stud(ies) have no label value (e.g. {unlabeled.iloc[0]!r}); "
                     "they count as unknown for every label")
    return frame, notes


def archive_size(manifest: Path) -> dict:
    """Studies and patients of a manifest, for the report."""
    from ...data.manifest import read_manifest

    frame = read_manifest(manifest)
    return {"studies": int(frame["study_id"].nunique()), "patients": int(frame["patient_id"].nunique())}


def studies_without_series(manifest: Path, cache: Path) -> list[str]:
    """One line per study of ``manifest`` none of whose series was prepared into ``cache``."""
    import pandas as pd

    from ...data.manifest import read_manifest

    frame = read_manifest(manifest)
    prepared = set(pd.read_parquet(Path(cache) / "index.parquet")["series_id"].astype(str))
    missing = frame.groupby("study_id")["series_id"].apply(lambda ids: not set(ids.astype(str)) & prepared)
    errors = Path(cache) / "errors.csv"
    where = f"; reasons in {errors}" if errors.exists() else ""
    return [f"study {study}: no usable series (none could be prepared{where}); it is in no training or test set"
            for study in missing[missing].index]


# ----------------------------------------------------------------------------------- labeled archive
def prepare_user_joint(preset: BenchPreset, out: Path, user: UserData, joint: str | None = None):
    """Scan (or read), label, prepare and split the user's labeled archive under ``out/user``; each
    stage resumes. ``joint`` None: the joint its scans name (BodyPartExamined, metadata.csv), else
    its folder's name. Returns (JointData, notes for the report)."""
    from ...data.manifest import read_manifest
    from ...data.splits import make_splits
    from .workspace import JointData, joint_config, prepare_planes

    root = Path(out) / LABELED_FOLDER
    root.mkdir(parents=True, exist_ok=True)
    config = joint_config(preset, root, joint or UNNAMED_JOINT, extra=[f"data.archive={Path(user.labeled).resolve()}"])
    record = root / "user-data.json"
    given = {"labeled": str(Path(user.labeled).resolve()), "labels": user.as_dict().get("labels_sha256", "")}
    manifest = Path(config.data.manifest)
    if manifest.exists():
        # MRNet's label CSVs are stamped where the scan found them, so the prepared manifest tells where
        _check_same_source(record, {**given, "stamp": source_stamp(Path(user.labeled), read_manifest(manifest))}, root)
        notes = read_json(record)["notes"]
    else:
        frame, notes = read_user_archive(Path(user.labeled), root / "scanned.parquet", user.labels)
        given["stamp"] = source_stamp(Path(user.labeled), frame)
        frame, label_notes = usable_labels(frame, str(user.labeled))
        notes = notes + label_notes
        write_table(manifest, frame)
        write_json(record, {**given, "notes": notes})
    prepare_planes(config)
    data = config.data
    valid = mrnet_valid_patients(manifest)
    if valid:
        # MRNet's valid exams are its held-out test set: they are the test set, train/val come from train
        make_splits(data.manifest, data.splits, seed=config.seed, val_fraction=data.val_fraction,
                    test_fraction=0.0, fractions=data.label_fractions)
        test_on_mrnet_valid(Path(data.splits), manifest, int(config.seed))
        notes = list(notes) + [f"test set: the {len(valid)} patient(s) of MRNet's valid exams, as MRNet holds them "
                               "out; training and validation patients come from its train exams"]
    else:
        make_splits(data.manifest, data.splits, seed=config.seed, val_fraction=data.val_fraction,
                    test_fraction=data.test_fraction, fractions=data.label_fractions)
    notes = list(notes) + studies_without_series(manifest, Path(data.cache))
    if joint is None:
        joint = archive_joint(manifest, fallback=Path(user.labeled).stem or UNNAMED_JOINT)
        config = replace(config, data=replace(config.data, joint=joint))
    return JointData(joint=joint, root=root, config=config), notes


def source_stamp(path: Path, frame=None) -> dict:
    """What decides a prepared manifest besides the scans: the manifest file itself, or an archive
    folder's labels.csv and metadata.csv and the MRNet label CSVs beside the MRNet exams of its
    manifest ``frame``, by sha256 (so an edited table is never read stale)."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    tables = [path / name for name in ("labels.csv", "metadata.csv")]
    tables += mrnet_label_tables(frame) if frame is not None else []
    return {_relative_name(table, path): sha256_file(table) for table in tables if table.exists()}


def mrnet_label_tables(frame) -> list[Path]:
    """Where the scan reads the labels of a manifest's MRNet exams: ``{train,valid}-{label}.csv``
    beside the train/valid folders (``<root>/<split>/<plane>/NNNN.npy``)."""
    from ...io.mrnet import LABELS, SPLITS

    if "format" not in frame.columns:
        return []
    roots = sorted({Path(p).parent.parent.parent for p in frame.loc[frame["format"] == "mrnet", "path"]})
    return [root / f"{split}-{label}.csv" for root in roots for split in SPLITS for label in LABELS]


def _relative_name(table: Path, folder: Path) -> str:
    try:
        return table.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(table.resolve())


def mrnet_valid_patients(manifest: Path) -> list[str]:
    """The patients of MRNet's valid exams when the archive is MRNet's train and valid folders (scan
    names their studies mrnet-train-NNNN and mrnet-valid-NNNN); empty for any other archive."""
    from ...data.manifest import read_manifest

    studies = read_manifest(manifest).drop_duplicates("study_id")
    ids = studies["study_id"].astype(str)
    valid, train = ids.str.startswith("mrnet-valid-"), ids.str.startswith("mrnet-train-")
    if not (valid.any() and train.any() and (valid | train).all()):
        return []
    return sorted(set(studies.loc[valid, "patient_id"].astype(str)))


def test_on_mrnet_valid(splits_path: Path, manifest: Path, seed: int) -> Path:
    """Rewrite a train/val splits file of an MRNet archive so that its test set is exactly MRNet's
    valid exams: those leave train and val, and the nested label subsets are drawn again from what is
    left. Done once (the file records it)."""
    from ...data.manifest import read_manifest
    from ...data.splits import load_splits, nested_subsets, patient_labels

    stored = read_json(splits_path)
    if stored.get("test_set") == "mrnet-valid":
        return splits_path
    splits = load_splits(splits_path)
    valid = set(mrnet_valid_patients(manifest))
    per_patient = patient_labels(read_manifest(manifest), splits.labels)
    train = sorted(set(splits.train) - valid)
    val = sorted(set(splits.val) - valid)
    fractions = sorted(splits.subsets, reverse=True)
    subsets = nested_subsets(train, per_patient.loc[train], fractions, int(seed) + 7)
    val_subsets = nested_subsets(val, per_patient.loc[val], fractions, int(seed) + 57)
    stored.update(train=train, val=val, test=sorted(valid), test_set="mrnet-valid",
                  subsets={f"{k:g}": sorted(v) for k, v in subsets.items()},
                  val_subsets={f"{k:g}": sorted(v) for k, v in val_subsets.items()})
    stored.pop("label_positives", None)  # counted for the random split; the report counts anew
    write_json(splits_path, stored)
    load_splits(splits_path)  # checks nesting and disjointness
    return splits_path


def _check_same_source(record: Path, given: dict, root: Path) -> None:
    stored = read_json(record) if record.exists() else {}
    if {k: stored.get(k) for k in given} != given:
        raise OrthodiffError(f"{root}: prepared from other data or tables ({stored.get('labeled', 'a synthetic archive')}); "
                             "give another --out, or delete that folder to scan again")


# ------------------------------------------------------------------------------------ unlabeled pool
def prepare_user_pool(out: Path, user: UserData, labeled_config: ExperimentConfig, joint: str):
    """Scan (or read) and prepare the user's unlabeled archive under ``out/user-pool-<key>`` with its labels
    dropped (pretraining never reads them). Returns the pool (see ``pretraining.Pool``) and notes."""
    import numpy as np

    from ...data.manifest import label_columns, read_manifest
    from .pretraining import Pool
    from .workspace import prepare_planes

    source = Path(user.unlabeled).resolve()
    root = Path(out) / f"{POOL_FOLDER}-{hashlib.sha256(str(source).encode()).hexdigest()[:12]}"
    root.mkdir(parents=True, exist_ok=True)
    data = labeled_config.data
    config = replace(labeled_config, data=replace(
        data, archive=str(Path(user.unlabeled).resolve()), manifest=str(root / "manifest.parquet"),
        cache=str(root / "cache"), splits=str(root / "splits.json")))
    record, given = root / "user-data.json", {"labeled": str(source), "stamp": source_stamp(source), "labels": ""}
    manifest = Path(config.data.manifest)
    if manifest.exists():
        _check_same_source(record, given, root)
        notes = read_json(record)["notes"]
        check_disjoint(read_manifest(manifest), read_manifest(labeled_config.data.manifest), manifest)
    else:
        frame, notes = read_user_archive(source, root / "scanned.parquet")
        # checked before the pool is written, so a refused pool is scanned afresh once it is fixed
        check_disjoint(frame, read_manifest(labeled_config.data.manifest), source)
        for column in label_columns(frame):
            frame[column] = np.nan
        write_table(manifest, frame)
        write_json(record, {**given, "notes": notes})
    prepare_planes(config)
    return Pool(joint=joint, root=root, config=config), list(notes)


def check_disjoint(pool, labeled, source: Path) -> None:
    """Refuse, naming one, a patient, a study (StudyInstanceUID) or a series (SeriesInstanceUID) in
    both the pool's manifest frame and the labeled one: pretraining on an exam that is tested on
    would inflate every pretrained number."""
    checks = (("patient", "patient_id", lambda v: v), ("exam (StudyInstanceUID)", "study_key", _study_uid),
              ("series (SeriesInstanceUID)", "series_uid", lambda v: v))
    for what, column, identity in checks:
        if column not in pool.columns or column not in labeled.columns:
            continue
        ids = [{identity(str(v)) for v in frame[column]} - {"", None} for frame in (pool, labeled)]
        shared = sorted(ids[0] & ids[1])
        if shared:
            raise OrthodiffError(
                f"{source}: {len(shared)} {what} id(s) are in both the unlabeled pool and the labeled "
                f"archive (e.g. {shared[0]!r}); pretraining must not see labeled patients: remove them from the "
                "pool, or give the pool's patients their own ids (metadata.csv patient_id)")


def _study_uid(study_key: str) -> str:
    """The StudyInstanceUID in a manifest's study_key ("dicom:<uid>"); "" for studies without one."""
    return study_key[len("dicom:"):] if study_key.startswith("dicom:") else ""


def pool_counts(patients: int, held_out: int, train_patients: int, source: str) -> tuple[dict, list[str]]:
    """The pool's counts for the report and a warning when it is under ``MIN_POOL_RATIO`` x the
    labeled training patients (a user's pool is what it is: named, never refused)."""
    trained = patients - held_out
    counts = {"unlabeled_patients": patients, "held_out_patients": held_out, "trained_patients": trained,
              "labeled_train_patients": train_patients, "ratio": round(trained / max(1, train_patients), 2),
              "disjoint": True, "source": source}
    warnings = []
    if source == "separate archive" and trained < MIN_POOL_RATIO * train_patients:
        warnings.append(f"unlabeled pool: {trained} patients to pretrain on for {train_patients} labeled training "
                        f"patients ({counts['ratio']}x; protocol: at least {MIN_POOL_RATIO}x)")
    return counts, warnings


def user_pretraining(preset: BenchPreset, out: Path, user: UserData, data, splits: Path | None = None,
                     domain=None) -> tuple[Path, dict, list[str]]:
    """Denoisers for the user's bench, after the protocol checks: pretrained on the separate pool,
    on the labeled archive's training patients only, or the ones given. ``splits`` are the labeled
    splits whose training patients count (default: the archive's); ``domain`` (a ``domains.HeldOut``)
    is left out of the pool. The record names the pool's joint as its scans say (the labeled joint's
    when they do not). Returns (folder, the pool's record for the report, warnings)."""
    from ...data.splits import load_splits
    from .pretraining import Pool, cached_pretraining, heldout_patients, pool_patients

    train = load_splits(splits or data.splits).train
    if user.denoisers:
        warnings = [f"pretraining: the given denoisers were pretrained outside this bench, so nothing shows that "
                    f"they never saw {domain}; the unseen domain may not be unseen by them"] if domain else []
        return Path(user.denoisers), existing_denoisers(Path(user.denoisers), data.config), warnings
    if user.pool_from_training:
        # the training patients of ``splits``: a held-out domain sits in their test set already
        pool = Pool(joint=data.joint, root=data.root, config=data.config)
        patients, source, notes = list(train), "training patients", []
    else:
        pool, notes = prepare_user_pool(out, user, data.config, data.joint)
        pool = replace(pool, joint=archive_joint(pool.manifest, data.joint))  # cross-joint: the source joint
        patients, source = pool_patients(pool), "separate archive"
    left_out = {}
    if domain is not None and source == "separate archive":
        patients, left_out, found = _without_domain(pool, patients, domain)
        notes = notes + found
    held_out = len(heldout_patients(patients, data.config))
    counts, warnings = pool_counts(len(patients), held_out, len(train), source)
    if not held_out and int(pool.config.pretrain.eval_every) > 0:
        # one pool patient in ten scores the held-out loss; a pool under ten patients has none to spare
        pretrain = replace(pool.config.pretrain, eval_every=0)
        pool = replace(pool, config=replace(pool.config, pretrain=pretrain))
        warnings.append(f"pretraining: {len(patients)} patients are too few to hold any out, so its held-out "
                        "denoising loss was not measured")
    name = source.replace(" ", "-") + (f"-{domain.name}" if domain is not None else "")
    folder = cached_pretraining(pool, preset, out, patients, name=name)
    record = {**counts, **left_out, "joint": pool.joint, "pretraining": str(folder), "pool": str(pool.root),
              "archive": str(Path(user.unlabeled or user.labeled).resolve())}
    return folder, record, notes + warnings


def _without_domain(pool, patients: list[str], domain) -> tuple[list[str], dict, list[str]]:
    """The pool's patients less those of the held-out ``domain``, the record of what was left out,
    and a warning when the pool cannot tell its domain (no such column, or no value in it)."""
    from ...data.manifest import read_manifest

    frame = read_manifest(pool.manifest)
    dropped = domain.patients(frame) & set(patients)
    record = {"domain_left_out": {"held_out": str(domain), "patients": len(dropped)}}
    known = domain.column in frame.columns and frame[domain.column].astype("string").str.strip().fillna("").ne("").any()
    notes = [] if known else [f"unlabeled pool: no {domain.column} values, so its patients of {domain} (if any) could "
                              "not be left out of pretraining"]
    kept = [p for p in patients if p not in dropped]
    if not kept:
        raise OrthodiffError(f"{pool.root}: every unlabeled patient is of the held-out {domain}; pretraining would "
                             "learn from none: give a pool with other domains too")
    return kept, record, notes


def pretraining_provenance(record: dict) -> str:
    """One sentence of a report on where the denoisers of a bench on the user's data come from
    (``record``: what ``user_pretraining`` returned)."""
    joint = record.get("joint", "")
    if record.get("source") == "existing denoisers":
        steps = f"{record['steps']} steps" if "steps" in record else "steps not recorded"
        patients = (f"{record['unlabeled_patients']} unlabeled patients" if "unlabeled_patients" in record
                    else "pool size not recorded")
        digests = ", ".join(f"{plane} {digest[:12]}" for plane, digest in record["sha256"].items())
        return (f"Pretraining: none in this run; the {joint or 'given'} denoisers of `{record['pretraining']}` "
                f"({'joint not recorded; ' if not joint else ''}{steps}, {patients}; sha256 {digests}).")
    held = int(record.get("held_out_patients", 0))
    scored = f", {held} more held out to score its denoising loss" if held else ""
    left = record.get("domain_left_out")
    dropped = f"; its {left['patients']} patient(s) of {left['held_out']} left out" if left else ""
    if record.get("source") == "training patients":
        return (f"Pretraining: on the labeled archive's training patients only ({record['trained_patients']}{scored}), "
                "without their labels; no validation or test patient was seen.")
    return (f"Pretraining: {record['trained_patients']} unlabeled {joint} patients of the user's archive "
            f"`{record['archive']}`{scored}{dropped} ({record['ratio']}x the {record['labeled_train_patients']} "
            "labeled training patients; no patient, exam or series shared with the labeled archive, checked).")


def existing_denoisers(folder: Path, config: ExperimentConfig) -> dict:
    """Check ``folder/denoisers/<plane>`` (a pretraining or pipeline folder) against the bench's
    plane sizes; its record for the report: path, sha256 per plane, steps and pool size when known."""
    import json

    from ...planes import PLANES

    record = {"source": "existing denoisers", "pretraining": str(folder.resolve()), "sha256": {}}
    for plane in PLANES:
        plane_dir = folder / "denoisers" / plane
        missing = [name for name in ("config.json", "model.safetensors") if not (plane_dir / name).exists()]
        if missing:
            raise OrthodiffError(f"--denoisers {folder}: no denoisers/{plane}/{missing[0]} there; give a pretraining "
                                 "or pipeline folder holding denoisers/<plane>/config.json and model.safetensors")
        size = json.loads((plane_dir / "config.json").read_text()).get("plane_size")
        wanted = list(config.data.plane_size[plane])
        if size is not None and list(size) != wanted:
            raise OrthodiffError(f"--denoisers {folder}: the {plane} denoiser takes plane tensors of {list(size)}, the "
                                 f"bench prepares {wanted}; add data.plane_size.{plane}={list(size)}".replace(" ", ""))
        record["sha256"][plane] = sha256_file(plane_dir / "model.safetensors")
    record.update(_pretraining_facts(folder))
    return record


def _pretraining_facts(folder: Path) -> dict:
    """Steps and pool size of a pretraining, from whichever record the folder keeps."""
    facts = {}
    for name, steps_key, pool_key in (("provenance.json", "steps", "pool_patients"),
                                      ("pretrain-cache.json", None, "patients")):
        path = folder / name
        if path.exists():
            stored = read_json(path)
            if stored.get("joint"):
                facts.setdefault("joint", str(stored["joint"]))
            if steps_key and steps_key in stored:
                facts.setdefault("steps", int(stored[steps_key]))
            if pool_key in stored:
                facts.setdefault("unlabeled_patients", int(stored[pool_key]))
    if "steps" not in facts and (folder / "config.yaml").exists():
        import yaml

        steps = ((yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("pretrain") or {}).get("max_steps")
        if steps is not None:
            facts["steps"] = int(steps)
    return facts


__all__ = ["UserData", "archive_joint", "archive_size", "attach_labels", "check_disjoint", "existing_denoisers", "pool_counts", "prepare_user_joint",
           "mrnet_valid_patients", "prepare_user_pool", "pretraining_provenance", "test_on_mrnet_valid", "read_user_archive", "studies_without_series", "usable_labels", "user_pretraining"]
