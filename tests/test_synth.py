"""The synthetic archive generator: layout, geometry, determinism, labels and what labels do."""

import copy
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from orthodiff.errors import OrthodiffError
from orthodiff.fileio import read_json
from orthodiff.planes import plane_from_affine
from orthodiff.synth import (
    JOINT_CLASSES,
    JOINT_LABELS,
    render_study,
    sample_population,
    subject_anatomy,
    synthesize_archive,
)
from orthodiff.synth.abnormalities import apply_abnormalities

SMALL = {"workers": 1, "matrix": 48, "progress": False}


@pytest.fixture(scope="module")
def knee_archives(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    a = root / "a"
    synthesize_archive(a, joint="knee", studies=3, seed=0, **SMALL)
    b = root / "b"
    synthesize_archive(b, joint="knee", studies=3, seed=0, **SMALL)
    c = root / "c"
    synthesize_archive(c, joint="knee", studies=1, seed=1, **SMALL)
    return a, b, c


def _series_files(archive):
    return sorted(p for p in archive.glob("P*/*/*.nii.gz") if not p.name.endswith("_seg.nii.gz"))


def test_archive_files_follow_the_contract(knee_archives):
    archive = knee_archives[0]
    labels = pd.read_csv(archive / "labels.csv")
    metadata = pd.read_csv(archive / "metadata.csv")
    info = read_json(archive / "archive.json")
    assert list(labels.columns) == ["study_id", *JOINT_LABELS["knee"]]
    assert set(labels[list(JOINT_LABELS["knee"])].to_numpy().ravel()) <= {0, 1}
    assert list(metadata.columns) == ["patient_id", "study_id", "joint", "site", "field_strength", "age", "sex", "height", "weight"]
    assert set(metadata["field_strength"]) <= {1.5, 3.0} and set(metadata["sex"]) <= {"F", "M"}
    assert metadata["study_id"].str.match(r"knee-\d{4}$").all() and metadata["patient_id"].str.match(r"P\d{4}$").all()
    assert {k: info[k] for k in ("joint", "seed", "studies", "format")} == {"joint": "knee", "seed": 0, "studies": 3, "format": "nifti"}
    assert info["labels"] == list(JOINT_LABELS["knee"])
    assert info["classes"][0] == "background" and len(info["classes"]) == 11
    for row in metadata.itertuples():
        assert (archive / row.patient_id / row.study_id).is_dir()


def test_every_series_affine_gives_its_plane_and_segmentation_is_aligned(knee_archives):
    files = _series_files(knee_archives[0])
    assert len(files) >= 8
    for path in files:
        image = nib.load(path)
        plane = path.name[: -len(".nii.gz")]
        assert plane_from_affine(image.affine) == plane
        assert 16 <= image.shape[2] <= 24 and 3.0 <= np.linalg.norm(image.affine[:3, 2]) <= 4.5
        fov = np.linalg.norm(image.affine[:3, 1]) * image.shape[1]
        assert 120 < fov < 200  # the site's field of view, whatever the matrix
        seg = nib.load(path.with_name(f"{plane}_seg.nii.gz"))
        assert seg.shape == image.shape
        np.testing.assert_allclose(seg.affine, image.affine, atol=1e-5)
        assert seg.get_data_dtype() == np.uint8


def test_same_seed_same_arrays_and_tables_other_seed_differs(knee_archives):
    a, b, c = knee_archives
    for name in ("labels.csv", "metadata.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    files_a, files_b = _series_files(a), _series_files(b)
    assert [p.relative_to(a) for p in files_a] == [p.relative_to(b) for p in files_b]
    for pa, pb in zip(files_a, files_b):
        assert np.array_equal(np.asarray(nib.load(pa).dataobj), np.asarray(nib.load(pb).dataobj))
    first_c = _series_files(c)[0]
    first_a = a / first_c.relative_to(c)
    assert not first_a.exists() or not np.array_equal(np.asarray(nib.load(first_a).dataobj), np.asarray(nib.load(first_c).dataobj))
    assert (a / "metadata.csv").read_bytes() != (c / "metadata.csv").read_bytes()


def test_all_eleven_knee_classes_appear(knee_archives):
    present = set()
    for path in knee_archives[0].glob("P*/*/*_seg.nii.gz"):
        present |= set(np.unique(np.asarray(nib.load(path).dataobj)).tolist())
    assert present == set(range(len(JOINT_CLASSES["knee"])))


def test_population_prevalences_cooccurrence_and_ehr():
    specs = sample_population("knee", 2000, seed=3)
    labels = pd.DataFrame([s.labels for s in specs])
    prevalence = labels.mean()
    assert prevalence.between(0.04, 0.42).all(), prevalence
    normal = (labels.sum(axis=1) == 0).mean()
    assert 0.2 < normal < 0.7
    # ACL tears bring lateral meniscal tears and effusion; cartilage defects come with age.
    acl = labels["acl_tear"] == 1
    assert labels.loc[acl, "joint_effusion"].mean() > 2 * labels.loc[~acl, "joint_effusion"].mean()
    ages = np.array([s.age for s in specs])
    assert ages[labels["cartilage_defect"] == 1].mean() > ages[labels["cartilage_defect"] == 0].mean() + 3
    patients = pd.Series([s.patient_id for s in specs]).value_counts()
    assert (patients == 2).sum() > 50 and patients.max() == 2
    assert 0.01 < np.mean([len(s.planes) < 3 for s in specs]) < 0.1
    small = pd.DataFrame([s.labels for s in sample_population("knee", 40, seed=0)]).mean()
    assert small.max() <= 0.6 and 0.05 <= small.mean() <= 0.4
    assert len({s.site for s in specs}) >= 3 and {s.field_strength for s in specs} == {1.5, 3.0}


def _spec_without_labels(joint="knee"):
    spec = sample_population(joint, 1, seed=5)[0]
    return spec.with_labels(**dict.fromkeys(spec.labels, 0))


def test_effusion_brightens_the_suprapatellar_region_of_the_same_subject():
    normal = _spec_without_labels()
    effusion = normal.with_labels(joint_effusion=1)
    fluid = subject_anatomy(normal).canvas.count("fluid"), subject_anatomy(effusion).canvas.count("fluid")
    assert fluid[1] > 3 * fluid[0]
    before, after = render_study(normal, 64)["sagittal"].image, render_study(effusion, 64)["sagittal"].image
    changed = before != after
    assert 0.001 < changed.mean() < 0.15  # a local change, not a different image
    assert after[changed].mean() > 1.3 * before[changed].mean()


def test_acl_tear_removes_part_of_the_cruciates_on_sagittal():
    normal = _spec_without_labels()
    torn = normal.with_labels(acl_tear=1)
    cruciate = JOINT_CLASSES["knee"].index("cruciate_ligaments")
    seg_before = render_study(normal, 64)["sagittal"].seg
    seg_after = render_study(torn, 64)["sagittal"].seg
    assert (seg_after == cruciate).sum() < (seg_before == cruciate).sum()


def test_field_strength_changes_noise():
    spec = _spec_without_labels()
    from dataclasses import replace

    noisy = render_study(replace(spec, field_strength=1.5), 48)["axial"].image.astype(float)
    clean = render_study(replace(spec, field_strength=3.0), 48)["axial"].image.astype(float)
    # Air (the image corners) holds only noise: its mean level is proportional to sigma.
    corner = (slice(0, 6), slice(0, 6))
    assert noisy[corner].mean() > 1.4 * clean[corner].mean()


def test_dicom_series_geometry_matches_the_nifti_affine(tmp_path):
    import SimpleITK as sitk

    synthesize_archive(tmp_path / "dcm", joint="knee", studies=1, seed=0, fmt="dicom", **SMALL)
    synthesize_archive(tmp_path / "nii", joint="knee", studies=1, seed=0, fmt="nifti", **SMALL)
    folders = sorted(p for p in (tmp_path / "dcm").glob("P*/*/*") if p.is_dir())
    assert folders, "no DICOM series written"
    for folder in folders:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        image = reader.Execute()
        lps_to_ras = np.diag([-1.0, -1.0, 1.0])
        affine = np.eye(4)
        affine[:3, :3] = lps_to_ras @ np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
        affine[:3, 3] = lps_to_ras @ np.asarray(image.GetOrigin())
        seg = nib.load(folder.with_name(f"{folder.name}_seg.nii.gz"))
        np.testing.assert_allclose(affine, seg.affine, atol=1e-3)
        assert plane_from_affine(affine) == folder.name
        nifti = nib.load(tmp_path / "nii" / folder.relative_to(tmp_path / "dcm").with_suffix(".nii.gz"))
        voxels = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
        assert np.array_equal(voxels, np.asarray(nifti.dataobj))


@pytest.mark.parametrize("joint", ["ankle", "shoulder"])
def test_other_joints_write_their_own_labels_and_classes(tmp_path, joint):
    summary = synthesize_archive(tmp_path / joint, joint=joint, studies=2, seed=0, **SMALL)
    assert joint in summary.describe()
    labels = pd.read_csv(tmp_path / joint / "labels.csv")
    assert list(labels.columns) == ["study_id", *JOINT_LABELS[joint]]
    assert read_json(tmp_path / joint / "archive.json")["classes"] == list(JOINT_CLASSES[joint])
    assert labels["study_id"].str.startswith(f"{joint}-").all()
    present = set()
    for path in (tmp_path / joint).glob("P*/*/*_seg.nii.gz"):
        present |= set(np.unique(np.asarray(nib.load(path).dataobj)).tolist())
    assert len(present) >= 8
    spec = _spec_without_labels(joint)
    normal = subject_anatomy(spec)
    for name in JOINT_LABELS[joint]:  # every label changes that joint's anatomy, locally
        edited = copy.deepcopy(normal)
        apply_abnormalities(edited, {name: 1}, spec.study_seed)
        changed = (edited.canvas.labels != normal.canvas.labels).sum()
        assert 0 < changed < 0.02 * normal.canvas.labels.size, name


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(OrthodiffError, match="--joint 'hip'"):
        synthesize_archive(tmp_path / "x", joint="hip", studies=1)
    with pytest.raises(OrthodiffError, match="--studies"):
        synthesize_archive(tmp_path / "x", studies=0)
    with pytest.raises(OrthodiffError, match="--format"):
        synthesize_archive(tmp_path / "x", studies=1, fmt="png")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(OrthodiffError, match="not empty"):
        synthesize_archive(tmp_path / "busy", studies=1, **SMALL)
    assert (tmp_path / "busy" / "notes.txt").exists()


def test_rerun_replaces_an_existing_archive(tmp_path):
    synthesize_archive(tmp_path / "arc", studies=3, seed=0, **SMALL)
    synthesize_archive(tmp_path / "arc", studies=1, seed=0, **SMALL)
    assert len(pd.read_csv(tmp_path / "arc" / "labels.csv")) == 1
    assert len([p for p in (tmp_path / "arc").glob("P*/*") if p.is_dir()]) == 1


def test_cli_reports_a_bad_joint_on_one_line():
    result = subprocess.run([sys.executable, "-m", "orthodiff", "synth", "/tmp/never-written", "--joint", "elbow"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "elbow" in lines[0]


# ------------------------------------------------------------------ knees from the real template
def test_shipped_knee_template_regenerates_from_the_real_label_map(tmp_path, knee_labelmap_path):
    from orthodiff.synth.template import TEMPLATE_PATH, build_template, load_template, save_template

    rebuilt = load_template(save_template(build_template(knee_labelmap_path), tmp_path / "knee_template.npz"))
    shipped = load_template(TEMPLATE_PATH)
    assert TEMPLATE_PATH.stat().st_size < 400_000
    assert np.array_equal(rebuilt.labels, shipped.labels)
    np.testing.assert_array_equal(rebuilt.origin, shipped.origin)
    assert set(np.unique(shipped.labels).tolist()) == set(range(11))


def test_every_knee_structure_is_present():
    anatomy = subject_anatomy(_spec_without_labels(), matrix=64)
    for tissue in ("femur", "femur_cortex", "tibia", "patella", "fibula", "femoral_cartilage", "tibial_cartilage",
                   "patellar_cartilage", "medial_meniscus", "lateral_meniscus", "acl", "pcl", "mcl", "lcl",
                   "patellar_tendon", "quadriceps_tendon", "fat_pad", "fat", "muscle", "skin", "fluid"):
        assert anatomy.canvas.count(tissue) > 0, tissue


def test_pd_fat_suppressed_ordering_of_tissue_intensities():
    from orthodiff.synth.acquisition import SITES, _sample_grid, tissue_intensities

    anatomy = subject_anatomy(_spec_without_labels(), matrix=48)
    kinds = [anatomy.table.kinds[i] for i in range(len(anatomy.table.names))]
    for site in SITES:
        value = dict(zip(kinds, tissue_intensities(anatomy, site)[0]))
        assert value["fluid"] == max(value.values())
        assert value["cortex"] < value["fat"] < value["muscle"] < value["cartilage"] < value["fluid"]
        # Fatty marrow is dark grey with fat suppression: above pure fat and cortex, below muscle and cartilage.
        assert value["cortex"] < value["fat"] < value["marrow"] < min(value["muscle"], value["cartilage"])
        assert max(value["fibrocartilage"], value["ligament"], value["tendon"]) < value["fat"]
    # And in a rendered series: fluid (an effusion) > muscle > suppressed fat, per voxel tissue.
    from dataclasses import replace

    import torch
    import torch.nn.functional as F

    from orthodiff.synth.acquisition import SITE_BY_NAME, sample_pose
    from orthodiff.synth.study import render_study

    spec = replace(_spec_without_labels().with_labels(joint_effusion=1), field_strength=3.0)
    series = render_study(spec, 64)["sagittal"]
    anatomy = subject_anatomy(spec, 64)
    rng = np.random.default_rng(spec.study_seed)
    pose = sample_pose(rng, spec.side, "knee")
    grid = _sample_grid(anatomy, pose, series.geometry)
    tissue = F.grid_sample(torch.from_numpy(anatomy.canvas.labels.astype(np.float32))[None, None], grid, mode="nearest",
                           align_corners=True)[0, 0].permute(2, 1, 0).numpy().astype(int)
    ids = anatomy.canvas.ids
    median = {name: np.median(series.image[tissue == ids[name]]) for name in ("fluid", "muscle", "fat", "femur")}
    assert median["fluid"] > 2 * median["muscle"] and median["muscle"] > median["femur"] > median["fat"], median
    assert SITE_BY_NAME[spec.site] is not None


def test_coronal_mid_slice_crosses_condyles_menisci_tibia_and_posteriorly_the_fibula():
    classes = JOINT_CLASSES["knee"]
    femur, tibia, fibula = (classes.index(name) for name in ("femur", "tibia", "fibula"))
    menisci = {classes.index("medial_meniscus"), classes.index("lateral_meniscus")}
    from orthodiff.synth.knee import sample_knee_pose

    def flexion(spec):  # the exam's flexion, drawn first from its exam stream
        return sample_knee_pose(np.random.default_rng(0), np.random.default_rng([*spec.study_seed, 11]), 1.0).flexion_deg

    # The most flexed knees, whose tibia swings out of a coronal slab lined up with the femur.
    specs = sorted(sample_population("knee", 24, seed=5), key=flexion)[-4:]
    assert min(flexion(spec) for spec in specs) > 20
    seen = 0
    for spec in specs:
        series = render_study(spec.with_labels(**dict.fromkeys(spec.labels, 0)), 48).get("coronal")
        if series is None:
            continue
        seen += 1
        mid = series.seg.shape[2] // 2
        present = set(np.unique(series.seg[:, :, mid]).tolist())
        assert {femur, tibia} <= present and menisci & present, (spec.study_id, present)
        # The tibia fills the lower part of the mid-slice, not just a rim under the joint line.
        rows = np.nonzero((series.seg[:, :, mid] == tibia).any(axis=0))[0]
        assert np.ptp(rows) * series.geometry.pixel_mm > 35, spec.study_id
        # Slices run posteriorly; the fibular head lies behind the middle of the slab.
        behind = [k for k in range(series.seg.shape[2]) if (series.seg[:, :, k] == fibula).any()]
        assert behind and min(behind) >= mid - 1, (spec.study_id, behind)
    assert seen >= 3


def test_bone_shafts_continue_beyond_the_template_tapering_with_a_cortex():
    from orthodiff.synth.anatomy import tissue_table
    from orthodiff.synth.knee import knee_atlas
    from orthodiff.synth.template import load_template

    atlas, template = knee_atlas(), load_template()
    ids = tissue_table("knee").ids
    z = atlas.origin[2] + atlas.spacing * np.arange(atlas.tissues.shape[2])
    bottom, top = template.origin[2], template.origin[2] + template.spacing * (template.labels.shape[2] - 1)
    for bone, beyond in (("tibia", z < bottom - 5), ("femur", z > top + 5)):
        marrow = (atlas.tissues == ids[bone]).sum(axis=(0, 1))[beyond]
        cortex = (atlas.tissues == ids[f"{bone}_cortex"]).sum(axis=(0, 1))[beyond]
        assert marrow.min() > 100 and cortex.min() > 50, bone  # a shaft with a cortical rim
        area = marrow + cortex
        away = area if bone == "femur" else area[::-1]      # ordered away from the joint
        assert np.all(np.diff(away) <= 0) and away[-1] < 0.9 * away[0], bone  # narrowing smoothly


def test_documented_ranges_of_pose_size_and_field_of_view():
    from orthodiff.synth import acquisition
    from orthodiff.synth.knee import sample_knee_pose

    rng = np.random.default_rng(0)
    poses = [sample_knee_pose(rng, rng, 1.0) for _ in range(400)]
    flexion = np.array([p.flexion_deg for p in poses])
    tibial = np.array([p.tibial_rotation_deg for p in poses])
    shape = np.array([p.scale for p in poses])
    assert flexion.min() >= 0 and flexion.max() <= 30 and flexion.std() > 6
    assert np.abs(tibial).max() <= 8 and tibial.std() > 3
    assert shape.min() >= 0.92 and shape.max() <= 1.08
    sizes = [(s.height / 172.0) ** 0.8 for s in sample_population("knee", 400, seed=1)]
    assert 0.85 <= min(sizes) and max(sizes) <= 1.16 and np.ptp(sizes) > 0.15

    site = acquisition.SITES[0]
    turns, misses, fovs = [], [], []
    for side in (1, -1) * 100:
        pose = acquisition.sample_pose(rng, side, "knee")
        turns.append(np.degrees(np.arctan2(pose.matrix[1, 0] * side, pose.matrix[0, 0] * side)))
        g = acquisition.sample_geometry("sagittal", "knee", site, pose, 128, rng)
        centre = g.origin + (g.cols - 1) / 2 * g.pixel_mm * g.row_dir + (g.rows - 1) / 2 * g.pixel_mm * g.col_dir \
            + (g.slices - 1) / 2 * g.spacing_mm * g.normal
        miss = centre - pose.matrix @ np.asarray(acquisition.JOINT_CENTRE["knee"]) - pose.offset
        misses.append([miss @ g.row_dir, miss @ g.col_dir, miss @ g.normal])
        fovs.append(g.pixel_mm * g.rows / site.fov_mm)
    misses = np.abs(np.array(misses))
    lo, hi = acquisition.KNEE_LEG_ROTATION_DEG
    assert lo - 6 <= min(turns) and max(turns) <= hi + 6 and np.ptp(turns) > 15
    assert misses[:, :2].max() <= acquisition.KNEE_CENTRING_MM + 1e-6 and misses[:, :2].max() > 10
    assert misses[:, 2].max() <= acquisition.KNEE_SLAB_SHIFT_MM + 1e-6
    assert 0.9 - 1e-6 <= min(fovs) and max(fovs) <= 1.1 + 1e-6


def test_lesions_move_with_the_anatomy():
    """The same label lands on different voxels in different subjects (as it would in real exams)."""
    centres = []
    for spec in sample_population("knee", 5, seed=2):
        normal = spec.with_labels(**dict.fromkeys(spec.labels, 0))
        before = render_study(normal, 48)["sagittal"].image.astype(float)
        after = render_study(normal.with_labels(acl_tear=1), 48)["sagittal"].image.astype(float)
        changed = np.argwhere(np.abs(after - before) > 0)
        assert len(changed) > 0
        centres.append(changed.mean(0))
    spread = np.ptp(np.array(centres), axis=0)
    assert spread[:2].max() > 3.0, spread  # in-plane pixels


def test_preview_draws_the_studies_written_to_the_archive(tmp_path):
    from orthodiff.plotting import pyplot
    from orthodiff.synth.preview import archive_studies, write_preview

    synthesize_archive(tmp_path / "arc", studies=1, seed=0, **SMALL)
    written = pd.read_csv(tmp_path / "arc" / "metadata.csv")
    drawn = archive_studies(tmp_path / "arc", subjects=3)
    assert [spec.study_id for spec in drawn] == written["study_id"].tolist()  # one study: one subject, not three
    spec = drawn[0]
    stored = nib.load(next((tmp_path / "arc" / spec.patient_id / spec.study_id).glob("sagittal.nii.gz")))
    assert np.array_equal(render_study(spec, SMALL["matrix"])["sagittal"].image, np.asarray(stored.dataobj))
    picture = pyplot().imread(write_preview(tmp_path / "arc"))
    rows = 1 + len(JOINT_LABELS["knee"])  # the archive's one study, then one row per label
    assert picture.shape[0] / picture.shape[1] > 0.8 * rows * 2.2 / 12
    synthesize_archive(tmp_path / "arc", studies=1, seed=1, **SMALL)  # a rerun replaces it, as part of the archive
    assert not (tmp_path / "arc" / "preview.png").exists()


# ------------------------------------------------------------------------- knee lesions as MRI shows them
@pytest.fixture(scope="module")
def normal_knee():
    return _spec_without_labels(), subject_anatomy(_spec_without_labels(), matrix=64)


def _edited(normal, label, draw):
    spec, anatomy = normal
    edited = copy.deepcopy(anatomy)
    apply_abnormalities(edited, {label: 1}, (*spec.study_seed, draw))
    return edited


# label: (structures it belongs to, how far from them it may change voxels (mm), tissues it may leave)
_LESION_REGIONS = {
    "acl_tear": (("acl",), 14, {"acl", "acl_injured", "fat", "fluid", "edema", "femur_edema", "tibia_edema"}),
    "pcl_tear": (("pcl",), 10, {"pcl_injured", "fluid", "edema"}),
    "medial_meniscal_tear": (("medial_meniscus",), 25, {"fluid", "fat", "medial_meniscus"}),
    "lateral_meniscal_tear": (("lateral_meniscus",), 25, {"fluid", "fat", "lateral_meniscus"}),
    "mcl_injury": (("mcl",), 16, {"edema", "mcl_injured", "fluid"}),
    "lcl_injury": (("lcl",), 16, {"edema", "lcl_injured", "fluid"}),
    "cartilage_defect": (("femoral_cartilage", "patellar_cartilage"), 12, {"fluid", "femur_edema", "patella_edema"}),
    "joint_effusion": (("femur", "femur_cortex", "patella", "patella_cortex"), 30, {"fluid"}),
}
_BONE_BRUISES = ("femur_edema", "tibia_edema", "patella_edema")


@pytest.mark.parametrize("label", JOINT_LABELS["knee"])
def test_each_knee_lesion_changes_voxels_only_in_its_own_region(normal_knee, label):
    from scipy.ndimage import distance_transform_edt

    anatomy = normal_knee[1]
    canvas, names = anatomy.canvas, anatomy.table.names
    structures, reach_mm, leaves = _LESION_REGIONS[label]
    away = distance_transform_edt(~np.isin(canvas.labels, [canvas.ids[t] for t in structures]), sampling=canvas.spacing)
    for draw in range(6):
        edited = _edited(normal_knee, label, draw)
        changed = edited.canvas.labels != canvas.labels
        assert 0 < changed.sum() < 0.01 * changed.size, (label, draw)
        assert {names[t] for t in np.unique(edited.canvas.labels[changed])} <= leaves, (label, edited.findings)
        soft = changed & ~np.isin(edited.canvas.labels, [canvas.ids[t] for t in _BONE_BRUISES])
        assert away[soft].max() <= reach_mm, (label, edited.findings, away[soft].max())


def test_meniscal_tears_reach_an_articular_surface_or_displace_a_fragment(normal_knee):
    from orthodiff.synth.knee_lesions import MeniscusFrame

    anatomy = normal_knee[1]
    canvas = anatomy.canvas
    ids = canvas.ids
    cartilage = [ids["femoral_cartilage"], ids["tibial_cartilage"]]
    kinds = set()
    for label, name in (("medial_meniscal_tear", "medial_meniscus"), ("lateral_meniscal_tear", "lateral_meniscus")):
        centre, radii, turn = anatomy.landmarks["menisci"][name]
        frame = MeniscusFrame(np.asarray(centre), np.asarray(radii), np.asarray(turn))
        meniscus = canvas.labels == ids[name]
        inner_rho = np.median(frame.polar(*[canvas.axes[a][np.nonzero(meniscus)[a]] for a in range(3)])[1])
        for draw in range(16):
            edited = _edited(normal_knee, label, draw)
            finding = edited.findings[label]
            kinds.add(finding.split(" tear")[0].split(",")[0])
            after = edited.canvas.labels
            if "fragment" in finding:  # the fragment lies elsewhere; a smaller meniscus stays behind
                assert ((after == ids[name]) & ~meniscus).sum() > 0 and (meniscus & (after != ids[name])).sum() > 0, finding
                continue
            tear = meniscus & (after == ids["fluid"])
            assert tear.sum() > 0, finding
            reaches = False
            for axis in range(3):
                for step in (-1, 1):
                    contact = np.roll(tear, step, axis) & ~meniscus
                    index = np.nonzero(contact)
                    rho = frame.polar(*[canvas.axes[a][index[a]] for a in range(3)])[1]
                    reaches |= bool(np.isin(after[contact], cartilage).any() or (rho < inner_rho).any())
            assert reaches, (finding, draw)
    assert {"horizontal", "oblique", "vertical", "radial"} <= kinds, kinds


def test_cartilage_defect_has_depth_and_full_thickness_ones_reach_the_bone(normal_knee):
    anatomy = normal_knee[1]
    canvas, ids = anatomy.canvas, anatomy.canvas.ids
    cartilage = np.isin(canvas.labels, [ids["femoral_cartilage"], ids["patellar_cartilage"]])
    bone = np.isin(canvas.labels, [ids[t] for t in ("femur", "femur_cortex", "patella", "patella_cortex")])
    grades = set()
    for draw in range(10):
        edited = _edited(normal_knee, "cartilage_defect", draw)
        finding = edited.findings["cartilage_defect"]
        defect = cartilage & (edited.canvas.labels == ids["fluid"])
        assert defect.sum() >= 2, finding  # wider than one voxel
        touches = {axis_step: np.roll(defect, axis_step[1], axis_step[0]) for axis_step in
                   [(a, s) for a in range(3) for s in (-1, 1)]}
        joint_side = any((t & ~cartilage & ~bone).any() for t in touches.values())
        assert joint_side, finding  # open to the joint: it starts at the articular surface
        if "grade 4" in finding:
            grades.add(4)
            assert any((t & bone).any() for t in touches.values()), finding  # down to the bone
    assert 4 in grades


def test_effusion_is_graded_by_the_distension_of_the_suprapatellar_recess(normal_knee):
    fluid = {}
    for draw in range(12):
        edited = _edited(normal_knee, "joint_effusion", draw)
        amount = edited.findings["joint_effusion"].split()[0]
        fluid.setdefault(amount, []).append(edited.canvas.count("fluid"))
    assert set(fluid) == {"small", "moderate", "large"}
    assert np.mean(fluid["small"]) < np.mean(fluid["moderate"]) < np.mean(fluid["large"])
