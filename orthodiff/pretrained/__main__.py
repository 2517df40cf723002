"""``python -m orthodiff.pretrained PRETRAINING_FOLDER [NAME]``: ship a cached bench pretraining."""

import sys
from pathlib import Path

from . import KNEE_SMALL, ship

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m orthodiff.pretrained PRETRAINING_FOLDER [NAME]")
    print(ship(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else KNEE_SMALL))
