"""The synthetic population: patients, their studies, sites, EHR fields and labels.

Labels come from a small causal model per joint: a latent injury event (more likely when young and
male) and a degeneration score (age, body-mass index) raise the odds of each label, and some
labels raise the odds of others (an ACL tear brings lateral meniscal tears, bone bruises and
effusion). That gives prevalences of about 5-40 %, co-occurrence, EHR correlated with labels,
and a share of normal exams. About one patient in eight has a second study.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..planes import PLANES
from .abnormalities import JOINT_LABELS
from .acquisition import SITES

JOINT_INDEX = {"knee": 0, "ankle": 1, "shoulder": 2}
SECOND_STUDY_P = 0.12
MISSING_PLANE_P = 0.04
_AGE = {"knee": (42.0, 15.0, 16, 80), "ankle": (36.0, 14.0, 16, 75), "shoulder": (52.0, 14.0, 18, 85)}
_INJURY = {"knee": -0.4, "ankle": 0.0, "shoulder": -0.8}  # base log-odds of a recent injury

# label: (base log-odds, injury, degeneration, male, {earlier label: weight})
_LABEL_MODEL = {
    "knee": {
        "acl_tear": (-3.0, 2.6, 0.0, 0.3, {}),
        "pcl_tear": (-3.4, 1.3, 0.0, 0.2, {}),
        "medial_meniscal_tear": (-2.1, 0.6, 0.9, 0.0, {"acl_tear": 0.6}),
        "lateral_meniscal_tear": (-2.7, 0.8, 0.2, 0.0, {"acl_tear": 1.4}),
        "mcl_injury": (-3.2, 1.6, 0.0, 0.0, {"acl_tear": 1.0}),
        "lcl_injury": (-3.6, 1.2, 0.0, 0.0, {"acl_tear": 0.6, "pcl_tear": 0.8}),
        "cartilage_defect": (-2.3, 0.0, 1.1, 0.0, {"medial_meniscal_tear": 0.5}),
        "joint_effusion": (-2.4, 0.8, 0.2, 0.0, {"acl_tear": 1.5, "cartilage_defect": 0.8, "medial_meniscal_tear": 0.5}),
    },
    "ankle": {
        "atfl_tear": (-2.4, 2.0, 0.0, 0.0, {}),
        "cfl_tear": (-3.6, 0.6, 0.0, 0.0, {"atfl_tear": 2.2}),
        "achilles_rupture": (-3.1, 0.6, 0.3, 0.7, {}),
        "talar_osteochondral_lesion": (-3.0, 0.8, 0.2, 0.0, {"atfl_tear": 0.6}),
    },
    "shoulder": {
        "supraspinatus_tear": (-1.6, 0.5, 1.0, 0.2, {}),
        "infraspinatus_tear": (-3.0, 0.3, 0.3, 0.0, {"supraspinatus_tear": 1.6}),
        "subscapularis_tear": (-3.2, 0.8, 0.2, 0.0, {"supraspinatus_tear": 1.0}),
        "biceps_long_head_injury": (-2.8, 0.0, 0.3, 0.0, {"supraspinatus_tear": 1.0, "subscapularis_tear": 1.2}),
        "ac_joint_injury": (-3.0, 2.0, 0.0, 0.5, {}),
        "glenohumeral_effusion": (-2.6, 0.6, 0.0, 0.0, {"supraspinatus_tear": 0.8}),
        "subacromial_bursitis": (-1.9, 0.0, 0.4, 0.0, {"supraspinatus_tear": 1.0}),
    },
}


@dataclass
class StudySpec:
    """Everything needed to render one study, deterministically."""

    index: int
    study_id: str
    patient_id: str
    joint: str
    site: str
    field_strength: float
    age: int
    sex: str
    height: float
    weight: float
    side: int                     # +1 right, -1 left
    labels: dict[str, int]
    planes: tuple[str, ...]
    anatomy_seed: tuple[int, ...]  # per patient: both studies of a patient share their anatomy
    study_seed: tuple[int, ...]

    def metadata_row(self) -> dict:
        return {"patient_id": self.patient_id, "study_id": self.study_id, "joint": self.joint, "site": self.site,
                "field_strength": self.field_strength, "age": self.age, "sex": self.sex,
                "height": self.height, "weight": self.weight}

    def with_labels(self, **labels: int) -> StudySpec:
        """The same subject and acquisition with some labels changed (to see what a label does)."""
        from dataclasses import replace

        return replace(self, labels={**self.labels, **labels})


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def sample_labels(joint: str, rng: np.random.Generator, age: float, bmi: float, male: bool, injury: bool) -> dict[str, int]:
    degeneration = 0.06 * (age - 45.0) + 0.12 * (bmi - 26.0)
    labels: dict[str, int] = {}
    for name, (base, w_injury, w_degen, w_male, parents) in _LABEL_MODEL[joint].items():
        logit = base + w_injury * injury + w_degen * degeneration + w_male * male
        logit += sum(weight * labels[parent] for parent, weight in parents.items())
        labels[name] = int(rng.random() < _sigmoid(logit))
    return labels


def sample_population(joint: str, studies: int, seed: int) -> list[StudySpec]:
    """``studies`` study specifications; patients and their attributes drawn from the seed."""
    assert tuple(_LABEL_MODEL[joint]) == JOINT_LABELS[joint]
    jidx = JOINT_INDEX[joint]
    rng = np.random.default_rng([seed, jidx, 1])
    weights = np.asarray([site.weight for site in SITES])
    specs: list[StudySpec] = []
    patient = 0
    while len(specs) < studies:
        patient += 1
        patient_id = f"P{patient:04d}"
        male = bool(rng.random() < 0.5)
        mean, sd, lo, hi = _AGE[joint]
        age = float(np.clip(rng.normal(mean, sd), lo, hi))
        height = float(np.clip(rng.normal(177.0 if male else 164.0, 7.0), 145, 205))
        bmi = float(np.clip(rng.normal(26.0, 4.0), 17, 42))
        site_index = int(rng.choice(len(SITES), p=weights / weights.sum()))
        side = 1 if rng.random() < 0.55 else -1
        injury = bool(rng.random() < _sigmoid(_INJURY[joint] - 0.03 * (age - 40) + 0.3 * male))
        n_studies = 2 if rng.random() < SECOND_STUDY_P else 1
        for visit in range(min(n_studies, studies - len(specs))):
            if visit and rng.random() < 0.2:  # some follow-ups happen elsewhere
                site_index = int(rng.integers(len(SITES)))
            site = SITES[site_index]
            visit_age = age + visit * rng.uniform(0.5, 2.5)
            weight = bmi * (height / 100) ** 2 * rng.uniform(0.97, 1.03)
            labels = sample_labels(joint, rng, visit_age, bmi, male, injury)
            planes = list(PLANES)
            if rng.random() < MISSING_PLANE_P:
                planes.pop(int(rng.integers(3)))
            index = len(specs)
            specs.append(StudySpec(
                index=index, study_id=f"{joint}-{index + 1:04d}", patient_id=patient_id, joint=joint,
                site=site.name, field_strength=3.0 if rng.random() < site.p_3t else 1.5,
                age=int(visit_age), sex="M" if male else "F", height=round(height, 1), weight=round(weight, 1),
                side=side, labels=labels, planes=tuple(planes),
                anatomy_seed=(seed, jidx, 2, patient), study_seed=(seed, jidx, 3, index)))
    return specs
