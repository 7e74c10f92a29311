"""JSON files written atomically (a crash never leaves a half-written log)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_json", "write_json"]


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and an atomic rename.

    Args:
        path: the destination. data: JSON-serialisable data.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file.

    Args:
        path: the file.

    Returns:
        The parsed data.
    """
    return json.loads(Path(path).read_text(encoding="utf-8"))
