"""``python -m examples.reproduce``: see :mod:`examples.reproduce.cli`."""

import sys

from .cli import main

sys.exit(main())
