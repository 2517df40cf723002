import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# One torch thread per test process: the suite runs as two processes (pytest-xdist) on 2 cores, and
# tiny models gain nothing from more threads; subprocesses the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real MRI fixtures beside the checkout (../shared/data)."""
    if not SHARED_DATA.exists():
        pytest.skip(f"real MRI fixtures not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def knee_dicom_dir(shared_data) -> Path:
    return shared_data / "knee_mese_t2_dicom"


@pytest.fixture(scope="session")
def knee_labelmap_path(shared_data) -> Path:
    return shared_data / "knee_labelmap" / "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd"
