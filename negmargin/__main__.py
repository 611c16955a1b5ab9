"""``python -m negmargin ...`` is the ``negmargin`` command."""

import sys

from .cli import main

sys.exit(main())
