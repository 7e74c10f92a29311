"""examples/generate.py and benchmarks/end_to_end.py run end to end on the CPU (small settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_generate_example_reports_both_phases():
    out = run(
        "examples/generate.py",
        "--model", "tiny-llama",
        "--prompt-len", "300",
        "--new-tokens", "5",
        "--policy", "examples/policies/scaling_law.toml",
        "--no-progress",
    )  # fmt: skip
    assert "chunk means from MobaCache" in out  # decode steps scored cached means
    assert out.count("model.layers.0.self_attn  moba") == 2  # module paths, prefill and decode
    for line in ("moba ", "dense ", "MoBA / dense: prefill"):
        assert line in out


def test_end_to_end_benchmark_smoke_and_dry_run():
    plan = run("-m", "benchmarks.end_to_end", "--dry-run")
    assert "B parameters" in plan and "524288 tokens" in plan
    out = run("-m", "benchmarks.end_to_end", "--smoke", "--repeats", "1", "--decode-steps", "2")
    assert "prefill     512" in out and "decode    1024" in out and "not saved" in out
