"""Script entry point: ``python examples/reproduce/run.py ...`` equals ``python -m examples.reproduce ...``."""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
    from examples.reproduce.cli import main

    sys.exit(main())
