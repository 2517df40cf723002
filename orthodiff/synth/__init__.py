"""Synthetic musculoskeletal MRI archives: procedural anatomy, label-driven abnormalities, scanner physics.

``synthesize_archive(out, joint="knee", studies=200, seed=0, fmt="nifti")`` writes the layout of the
"Synthetic archive" contract; ``render_study`` renders one study in memory (for tests and demos).
"""

from .abnormalities import JOINT_LABELS
from .anatomy import JOINT_CLASSES, JOINTS
from .archive import SynthSummary, synthesize_archive
from .population import StudySpec, sample_population
from .study import render_study, subject_anatomy

__all__ = ["JOINTS", "JOINT_CLASSES", "JOINT_LABELS", "StudySpec", "SynthSummary", "render_study",
           "sample_population", "subject_anatomy", "synthesize_archive"]
