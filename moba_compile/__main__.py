"""``python -m moba_compile``: the ``moba-compile`` command (see :mod:`moba_compile.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
