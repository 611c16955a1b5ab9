#!/usr/bin/env python
"""Base-train a Neg-Margin model.

python tools/classification/train.py CONFIG [--work-dir DIR] [--auto-resume] [--cfg-options k=v ...]
torchrun --nproc_per_node=N tools/classification/train.py CONFIG --launcher pytorch
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a clone without installing

from negmargin.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
