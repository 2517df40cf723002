"""Training loops (pretraining through Accelerate) and their helpers.

Import from the submodules, e.g. ``from orthodiff.training.pretrain import run_pretraining``.
"""
