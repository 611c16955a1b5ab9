#!/usr/bin/env python
"""Meta-test a checkpoint on 2000 5-way episodes (mean accuracy and 95% CI).

python tools/classification/test.py CONFIG CHECKPOINT [--shots 1 5] [--show-task-results]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a clone without installing

from negmargin.cli import test_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(test_main())
