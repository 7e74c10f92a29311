"""The training examples: ``examples/train.py`` and ``examples/train_distributed.py`` (DDP and FSDP2 on the CPU).

Each runs as a subprocess from the repository root with ``PYTHONPATH`` set to it, as a user would run it from a
checkout; the distributed ones through ``python -m torch.distributed.run --nproc-per-node 2`` (gloo on the CPU). Tiny
settings (tiny-llama, 128 tokens, 3 steps, ``aot_eager``) keep the whole file near a minute on two cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds per subprocess; a hang (e.g. at process-group teardown) fails instead of blocking the suite

# Four layers (tiny presets): layers 0-2 MoBA with chunk 32 and top-2 (128 tokens = 4 chunks, so MoBA is sparse and
# differs from dense attention), layer 3 dense.
POLICY = """\
version = 1
chunk_size = 32
topk = 2
dense_last = 1
"""
TINY = ["--steps", "3", "--seq-len", "128", "--no-progress"]

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or importlib.util.find_spec("transformers") is None,
    reason="needs transformers (the tiny-llama preset) and torchrun on a POSIX system",
)


def _run(args: list[str], *, distributed: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    prefix = [sys.executable]
    if distributed:
        prefix += ["-m", "torch.distributed.run", "--nproc-per-node", "2"]
    return subprocess.run(
        prefix + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _policy(tmp_path: Path) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY, encoding="utf-8")
    return str(path)


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return float(match.group(1))


def _step_losses(tag: str, text: str) -> dict[int, float]:
    return {
        int(m.group(1)): float(m.group(2)) for m in re.finditer(rf"^\[{tag}\] step (\d+)/\d+ +loss (\S+)", text, re.M)
    }


def _agreement(text: str) -> float:
    return _number(r"losses agree: max relative difference (\S+),", text)


def test_train_tiny_llama(tmp_path: Path) -> None:
    result = _run(["examples/train.py", *TINY, "--policy", _policy(tmp_path), "--device", "cpu"])
    out = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    moba, dense = _step_losses("moba", out), _step_losses("dense", out)
    assert set(moba) == {1, 2, 3} and set(dense) == {1, 2, 3}, out
    assert all(math.isfinite(x) for x in [*moba.values(), *dense.values()]), out
    # The same weights and batch: only the attention differs, and sparse MoBA changes the very first loss.
    assert moba[1] != dense[1], out
    moba_time = _number(r"MoBA step time: (\S+) s", out)
    dense_time = _number(r"dense step time: (\S+) s", out)
    ratio = _number(r"MoBA/dense step time ratio: (\S+)", out)
    assert moba_time > 0 and dense_time > 0 and ratio == pytest.approx(moba_time / dense_time, rel=0.01), out
    # 3 MoBA layers x 3 steps, forward and backward, all on the reference (CPU).
    assert "attention x9, attention_backward x9" in out, out
    assert "model.layers.3.self_attn  dense" in out and "OK: MoBA ran in 3 of 4 layers" in out, out


def test_train_gpt_default_policy() -> None:
    result = _run(["examples/train.py", *TINY, "--model", "gpt", "--dense-steps", "2", "--device", "cpu"])
    out = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"MoBA step time: \S+ s", out) and re.search(r"MoBA/dense step time ratio: \S+", out), out
    # hybrid.toml: chunk 2048, top-3, the last 3 of 4 layers dense; 128 tokens fit in one chunk, and the script says so.
    assert "OK: MoBA ran in 1 of 4 layers" in out and "equals dense attention here" in out, out
    assert all(math.isfinite(x) for x in _step_losses("moba", out).values()), out


def test_train_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("version = 1\nchunk = 3\n", encoding="utf-8")
    result = _run(["examples/train.py", *TINY, "--policy", str(bad)])
    assert result.returncode == 2 and "unknown key 'chunk'" in result.stderr, result.stderr
    # An argparse refusal exits with status 2 in this process exactly as in the script's: no second process needed.
    from examples import train  # the repository root is on sys.path (pyproject.toml)

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main(["--steps", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--steps must be >= 2" in err, err


def test_ddp_matches_saved_single_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    policy, saved = _policy(tmp_path), str(tmp_path / "single.json")
    common = [*TINY, "--batch", "4", "--policy", policy, "--device", "cpu"]
    single = _run(["examples/train_distributed.py", "--mode", "single", *common, "--save-losses", saved])
    assert single.returncode == 0, single.stdout + single.stderr
    assert len(json.loads(Path(saved).read_text(encoding="utf-8"))["losses"]) == 3

    result = _run(["examples/train_distributed.py", "--mode", "ddp", *common, "--reference", saved], distributed=True)
    out = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ddp on 2 ranks (gloo, cpu)" in out and f"single-process reference: {saved}" in out, out
    assert _agreement(out) <= 1e-4, out

    # A reference that disagrees makes the run fail: main's comparison on rank 0, in this process, with the
    # distributed training replaced by the saved single-run losses (which the real DDP run above matched); a second
    # 2-rank run would only repeat that training, and the comparison and exit status are what this checks.
    from examples import train_distributed  # the repository root is on sys.path (pyproject.toml)

    losses = json.loads(Path(saved).read_text(encoding="utf-8"))["losses"]
    data = json.loads(Path(saved).read_text(encoding="utf-8"))
    data["losses"][-1] *= 1.01
    Path(saved).write_text(json.dumps(data), encoding="utf-8")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train_distributed, "train_distributed", lambda *a, **k: (list(losses), True))
    assert train_distributed.main(["--mode", "ddp", *common, "--reference", saved]) == 1
    out = capsys.readouterr().out
    assert f"single-process reference: {saved}" in out and "losses DIFFER" in out, out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp2_matches_single_process(tmp_path: Path, dtype: str) -> None:
    args = [*TINY, "--batch", "4", "--policy", _policy(tmp_path), "--device", "cpu", "--dtype", dtype]
    result = _run(["examples/train_distributed.py", "--mode", "fsdp2", *args], distributed=True)
    out = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    # Each layer compiled on its own (moba_compile.compile_blocks), with the decision the policy makes for its full
    # module path: layers 0-2 share one decision, layer 3 has its own.
    assert "(each layer compiled on its own; 2 distinct decisions)" in out, out
    assert "model.layers.0.self_attn: moba chunk 32 topk 2" in out, out
    assert "model.layers.3.self_attn: dense (dense_last=1" in out, out
    assert "single-process reference on rank 0" in out, out
    assert _agreement(out) <= (1e-4 if dtype == "float32" else 5e-3), out


def test_compare_losses(capsys: pytest.CaptureFixture[str]) -> None:
    from examples.train_distributed import compare_losses  # the repository root is on sys.path (pyproject.toml)

    assert compare_losses([1.0, 2.0], [1.0, 2.0 * (1 + 5e-5)], 1e-4)
    assert not compare_losses([1.0, 2.0], [1.0, 2.0 * (1 + 2e-4)], 1e-4)
    assert not compare_losses([1.0, math.nan], [1.0, 2.0], 1e-4)
    assert not compare_losses([1.0], [1.0, 2.0], 1e-4)
    assert "losses DIFFER" in capsys.readouterr().out
