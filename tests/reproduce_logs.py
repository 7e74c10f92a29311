"""Hand-written run logs of examples/reproduce for the tests of its tables, charts, sweeps and archives (no training).

Test modules import them directly (``from reproduce_logs import fake_log``); pytest puts ``tests/`` on ``sys.path`` as
it does for ``tests/conftest.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from examples.reproduce.config import RunConfig


def fake_log(cfg: RunConfig, value: float, *, completed: bool = True, steps: int | None = None) -> dict[str, Any]:
    """A log of ``cfg`` with the fields plot, table, sweep, pack and unpack read: one record at step ``steps`` (default
    ``cfg.steps``) whose losses are ``value``; ``completed=False`` leaves it unfinished (no ``final``)."""
    done = cfg.steps if steps is None else steps
    record = {
        "step": done,
        "tokens": done * cfg.tokens_per_step,
        "phase": "full",
        "lr": cfg.lr,
        "loss": value,
        "loss_avg": value,
        "val_loss": value,
        "val_trailing_loss": value + 0.1,
        "flops": {"dense": 1, "attention": 1, "attention_full_equivalent": 2, "gate": 0, "total": 2},
        "pflop_s_days": 1e-6 * cfg.n_layers,
        "wall_s": 10.0,
    }
    final = {k: record[k] for k in ("step", "tokens", "loss", "loss_avg", "val_loss", "val_trailing_loss", "flops")}
    return {
        "name": cfg.name,
        "config": cfg.to_dict(),
        "identity": cfg.identity(),
        "model": {"params_matmul": 1000},
        "device": "cuda",
        "device_name": "NVIDIA H200",
        "records": [record],
        "sessions": [],
        "completed": completed,
        "final": {**final, "pflop_s_days": record["pflop_s_days"], "wall_s": 10.0} if completed else None,
    }


def write_log(out: Path, log: dict[str, Any]) -> None:
    """Write ``log`` where a sweep writes its run's log: ``out/runs/<name>/log.json``."""
    path = out / "runs" / log["name"] / "log.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(log, indent=1) + "\n")
