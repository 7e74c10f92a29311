"""examples/generate.py and benchmarks/end_to_end.py run end to end on the CPU (small settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def launch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def run(*args: str) -> subprocess.CompletedProcess:
    proc = launch(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_generate_example_reports_both_phases():
    proc = run(
        "examples/generate.py",
        "--model", "tiny-llama",
        "--prompt-len", "300",
        "--new-tokens", "5",
        "--policy", "examples/policies/scaling_law.toml",
        "--no-progress",
    )  # fmt: skip
    # The cache goes under the keyword the installed transformers takes (cache= on 5.24), not a deprecated one.
    assert "deprecated" not in proc.stderr, proc.stderr
    out = proc.stdout
    assert "chunk means from MobaCache" in out  # decode steps scored cached means
    assert out.count("model.layers.0.self_attn  moba") == 2  # module paths, prefill and decode
    for line in ("moba ", "dense ", "MoBA / dense: prefill"):
        assert line in out


@pytest.mark.parametrize("problem", ["unknown-key", "missing-file"])
def test_generate_example_bad_policy_is_one_line_and_exit_status_2(tmp_path, problem):
    path = tmp_path / "policy.toml"
    if problem == "unknown-key":
        path.write_text("version = 1\nchunk_sizes = 512\n")
    proc = launch("examples/generate.py", "--policy", str(path), "--prompt-len", "16", "--new-tokens", "2")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: ")
    assert ("unknown key 'chunk_sizes'" if problem == "unknown-key" else "not found") in line


def test_end_to_end_benchmark_smoke_and_dry_run():
    plan = run("-m", "benchmarks.end_to_end", "--dry-run").stdout
    assert "B parameters" in plan and "524288 tokens" in plan
    out = run("-m", "benchmarks.end_to_end", "--smoke", "--repeats", "1", "--decode-steps", "2").stdout
    assert "prefill     512" in out and "decode    1024" in out and "not saved" in out
