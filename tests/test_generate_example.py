"""examples/generate.py, benchmarks/end_to_end.py and benchmarks/decode.py run end to end on the CPU (small shapes)."""

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


def test_generate_example_static_cache_compiled_decode_step():
    """--cache static --compile: MoBA decode steps run the graph-safe static-cache op inside the compiled step, the
    warm-up is reported apart from the steady-state rates, and the tokens agree with dense (the scaling-law policy's
    chunks cover these 305 keys: effectively dense)."""
    proc = run(
        "examples/generate.py",
        "--model", "tiny-llama",
        "--prompt-len", "300",
        "--new-tokens", "5",
        "--policy", "examples/policies/scaling_law.toml",
        "--cache", "static",
        "--compile",
    )  # fmt: skip
    out = proc.stdout
    assert "static cache, compiled decode step" in out
    assert "graph-safe step (length read on the device" in " ".join(out.split())
    header = next(line for line in out.splitlines() if line.startswith("attention ") and "tok/s" in line)
    assert header.split()[-2:] == ["warm-up", "s"]
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("moba ", "dense "))}
    assert set(rows) == {"moba", "dense"} and all(float(r[-1]) > 0 for r in rows.values())
    assert "generated tokens agreeing: 100%" in out
    # Progress is shown (no --no-progress): tqdm's bar or, without tqdm, plain step lines, both on stderr.
    assert "moba decode" in proc.stderr


def generate_main(capsys, *args: str) -> tuple[int, str, str]:
    """``examples/generate.py ARGS`` in this process: ``(exit status, stdout, stderr)``, for the refusals. An argparse
    refusal exits with status 2 exactly as the script's process does; a returned status is what ``raise
    SystemExit(main())`` makes the script's, which test_generate_example_bad_policy_is_one_line_and_exit_status_2 also
    checks in a subprocess once."""
    from examples import generate

    capsys.readouterr()
    try:
        code = generate.main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_example_compile_needs_the_static_cache(capsys):
    code, _, err = generate_main(capsys, "--compile", "--prompt-len", "16", "--new-tokens", "2")
    assert code == 2 and "--compile needs --cache static" in err


@pytest.mark.parametrize("problem", ["unknown-key", "missing-file"])
def test_generate_example_bad_policy_is_one_line_and_exit_status_2(tmp_path, capsys, problem):
    path = tmp_path / "policy.toml"
    args = ("--policy", str(path), "--prompt-len", "16", "--new-tokens", "2")
    if problem == "unknown-key":  # the script's own process: its exit status, no traceback
        path.write_text("version = 1\nchunk_sizes = 512\n")
        proc = launch("examples/generate.py", *args)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, out, err = generate_main(capsys, *args)
    assert code == 2
    assert "Traceback" not in err and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {path}: ")
    assert ("unknown key 'chunk_sizes'" if problem == "unknown-key" else "not found") in line


def test_end_to_end_benchmark_smoke_and_dry_run(capsys):
    # The dry run in this process (status 0 returned; the smoke run below starts the module as a process).
    from benchmarks.end_to_end import main

    capsys.readouterr()
    assert main(["--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "B parameters" in plan and "524288 tokens" in plan
    out = run(
        "-m",
        "benchmarks.end_to_end",
        "--smoke",
        "--repeats",
        "1",
        "--decode-steps",
        "2",
        "--profile-prefill",
        "256",
        "--split-k",
        "--sdpa-dense-decode",
    ).stdout
    assert "prefill     512" in out and "decode    1024" in out and "not saved" in out
    assert "prefill profile moba 256" in out and "prefill profile dense 256" in out
    assert "moba with dense_decode = 'split_k'" in out  # set explicitly: the default's path, same run
    assert "moba with dense_decode = 'sdpa'" in out  # the opt-out (the default before issue 16), same run
    # The best dense baseline (an all-dense policy on moba::dense_decode) beside dense SDPA, and which path the dense
    # layers' decode steps ran: on the CPU the split-K kernels take no step, so SDPA, and the reason.
    assert "best dense (all layers dense, dense_decode = 'split_k': sdpa (CPU tensors))" in out
    assert "moba's dense layers decoded with: sdpa (CPU tensors)" in out
    # Both models also on their fastest decode path: a static cache and the step compiled once (issue 16).
    assert "static cache, compiled step" in out and "its read bound" in out


def test_decode_benchmark_bound_is_the_read_only_probe(tmp_path):
    """benchmarks.decode --smoke: the bound divides the step's bytes by the read-only probe's rate (a sum over a large
    tensor), not by a copy's; the copy's rates are recorded; the static-cache kernel is timed too."""
    import json

    run("-m", "benchmarks.decode", "--smoke", "--out-dir", str(tmp_path), "--no-plot")
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    env = result["environment"]
    assert env["read_gbps"] > 0 and env["copy_read_gbps"] > 0 and "read-only probe" in result["bound"]
    for row in result["rows"]:
        assert row["errors"] == {}
        assert row["bound_ms"] == row["moba_bytes"] / (env["read_gbps"] * 1e6)
        assert row["moba_static_ms"] > 0


def test_generate_example_chunked_prefill_on_a_static_cache(capsys):
    proc = launch(
        "examples/generate.py", "--cache", "static", "--prefill-chunk", "8", "--prompt-len", "20", "--new-tokens", "3",
        "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "generated tokens agreeing: 100%" in proc.stdout
    code, _, err = generate_main(capsys, "--prefill-chunk", "0", "--prompt-len", "16", "--new-tokens", "2")
    assert code == 2 and "--prefill-chunk must be >= 1, got 0" in err


def test_end_to_end_fill_cache_gives_every_cache_type_its_length():
    """The decode rows fill caches with random keys/values instead of a prefill: every cache type the benchmark
    times must then report the context as its length (the next step's position) and hold the written keys."""
    import torch
    from transformers import DynamicCache, LlamaConfig, StaticCache

    from benchmarks.end_to_end import SMOKE_MODEL, fill_cache
    from moba_compile.hf import MobaCache

    config = LlamaConfig(**SMOKE_MODEL)
    for cache in (DynamicCache(), MobaCache(), StaticCache(config=config, max_cache_len=80)):
        fill_cache(cache, SMOKE_MODEL, 2, 70, torch.device("cpu"), torch.float32)
        assert int(cache.get_seq_length()) == 70, type(cache).__name__
        keys = cache.layers[SMOKE_MODEL["num_hidden_layers"] - 1].keys
        assert keys.shape[:2] == (2, SMOKE_MODEL["num_key_value_heads"])
        assert keys[:, :, :70].abs().sum() > 0 and not keys[:, :, 70:].any()


def test_end_to_end_graph_decode_cache_holds_every_step_it_runs():
    """The graph-captured decode rows run 1 eager, 3 untimed, the timed and the profiled steps over one StaticCache:
    the cache must hold all of them (on the H200, 5 profiled steps past a cache sized for the timed ones indexed
    outside the buffer and failed a device-side assert, losing the 512K and 1M rows)."""
    import torch

    from benchmarks.end_to_end import SMOKE_MODEL, build, time_graph_decode

    model = build(SMOKE_MODEL, torch.float32, torch.device("cpu"))
    token = torch.zeros((1, 1), dtype=torch.long)
    rate, prof = time_graph_decode(model, token, 64, 2, SMOKE_MODEL, profile_steps=12)
    assert rate > 0 and prof is not None and prof["steps"] == 12


def test_end_to_end_plot_draws_measured_rows_and_skips_failed_ones(tmp_path):
    """--plot-from draws prefill and graph-decode rows from result files; a decode row whose graph run failed (no
    graph_speedup) is left out rather than drawn as zero."""
    import json

    from benchmarks.end_to_end import plot  # matplotlib is in the test extra: no skip

    rows = [
        {"kind": "prefill", "tokens": 1024, "moba_s": 1.0, "dense_s": 2.0, "speedup": 2.0},
        {"kind": "decode", "context": 1024, "batch": 1, "moba_graph_tok_s": 9.0, "dense_graph_tok_s": 3.0,
         "graph_speedup": 3.0},
        {"kind": "decode", "context": 2048, "batch": 1, "moba_graph_tok_s": None, "errors": {"moba_graph": "x"}},
    ]  # fmt: skip
    src = tmp_path / "e2e.json"
    src.write_text(json.dumps({"gpu": "test", "torch": "t", "triton": "t", "rows": rows}))
    out = plot([src], tmp_path / "e2e.png")
    assert out is not None and out.stat().st_size > 1000
