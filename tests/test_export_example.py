"""examples/export_aoti.py runs end to end on the CPU: export, rewrite with a policy file, AOTInductor package (C++
compiled for the CPU: 20-40 s of the test's time on two cores), load, greedy tokens equal to the eager MoBA path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("transformers", reason="the 'test' extra installs transformers")


def launch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_export_aoti_example_packages_and_matches_the_eager_tokens(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("version = 1\nchunk_size = 16\ntopk = 2\ndense_last = 1\n")
    package = tmp_path / "tiny.pt2"
    proc = launch(
        "examples/export_aoti.py",
        "--model", "tiny-llama",
        "--prompt-len", "80",
        "--new-tokens", "3",
        "--policy", str(policy),
        "--device", "cpu",
        "--package", str(package),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "moba-compile report: 3 of 4 attention sites on MoBA" in out
    assert "model.layers.0.self_attn  moba" in out and "model.layers.3.self_attn  dense" in out
    assert f"AOTInductor package {package}" in out and package.is_file()
    assert "greedy tokens: the same" in out


def test_export_aoti_example_bad_policy_is_one_line_and_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In this process (a subprocess would spend its ~5 s importing torch): main's exit status, nothing on stdout and
    # one line on stderr.
    from examples.export_aoti import main  # the repository root is on sys.path (pyproject.toml)

    policy = tmp_path / "policy.toml"
    policy.write_text("version = 1\nchunk_sizes = 512\n")
    assert main(["--policy", str(policy), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {policy}: ") and "unknown key 'chunk_sizes'" in line
