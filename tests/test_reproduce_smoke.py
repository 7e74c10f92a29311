"""The small-scale reproduction pipeline (examples/reproduce) end to end, at smoke scale on the CPU.

One subprocess runs ``python -m examples.reproduce --smoke`` (all five experiments through the ``moba`` backend with the
``aot_eager`` compiler, a resume check, the charts and the table) into a temporary directory; the tests then read what
it wrote. A few in-process checks cover the FLOP accounting against the real MoBA gate. The conversion experiment's
runs start from a trained run's weights, so the checks of runs trained from scratch leave them out and
``test_conversion_*`` check them instead.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from examples.reproduce.experiments import experiments, runs_by_name
from examples.reproduce.flops import causal_pairs, moba_pairs
from moba_compile import reference

ROOT = Path(__file__).resolve().parents[1]
ALL_RUNS = runs_by_name(list(experiments(smoke=True).values()))
#: The runs trained from scratch (every run but the conversion's converted ones).
RUNS = {name: cfg for name, cfg in ALL_RUNS.items() if cfg.init_from is None}
CONVERTED = {name: cfg for name, cfg in ALL_RUNS.items() if cfg.init_from is not None}
LOSS_FIELDS = ("loss", "loss_avg")
UNIFORM = math.log(256)  # the loss of predicting every byte uniformly


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the smoke pipeline once in a subprocess (fresh Dynamo state, 1 thread) and return its output directory."""
    import matplotlib  # noqa: F401  (the test extra installs it: the charts must be drawn)

    out = tmp_path_factory.mktemp("reproduce-smoke")
    proc = subprocess.run(
        [sys.executable, "-m", "examples.reproduce", "--smoke", "--out", str(out), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"smoke pipeline failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _log(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / "runs" / name / "log.json").read_text())


@pytest.mark.parametrize("name", list(RUNS))
def test_every_run_logged_and_loss_decreases(smoke_out: Path, name: str) -> None:
    log = _log(smoke_out, name)
    cfg = RUNS[name]
    assert log["completed"] and log["final"]["step"] == cfg.steps
    assert log["config"]["name"] == name and log["corpus"]["bytes_train"] > 0
    records = log["records"]
    assert [r["step"] for r in records] == list(range(cfg.log_every, cfg.steps + 1, cfg.log_every))
    for rec in records:
        for key in (*LOSS_FIELDS, "tokens", "pflop_s_days", "wall_s", "flops", "val_loss", "val_trailing_loss"):
            assert key in rec
        assert all(math.isfinite(rec[key]) for key in LOSS_FIELDS)
        assert rec["flops"]["total"] == rec["flops"]["dense"] + rec["flops"]["attention"] + rec["flops"]["gate"]
    evals = [r for r in records if r["val_loss"] is not None]
    assert len(evals) == cfg.steps // cfg.eval_every
    # Decreasing-ish: the last interval's mean training loss is below the first's, and validation ends below uniform.
    assert records[-1]["loss_avg"] < records[0]["loss_avg"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < UNIFORM
    assert evals[-1]["val_trailing_loss"] < UNIFORM
    assert [r["pflop_s_days"] for r in records] == sorted(r["pflop_s_days"] for r in records)


@pytest.mark.parametrize("name", list(RUNS))
def test_moba_runs_went_through_the_moba_op(smoke_out: Path, name: str) -> None:
    log = _log(smoke_out, name)
    decisions = {s["decision"] for phase in log["sites"].values() for s in phase}
    if RUNS[name].attention == "moba":
        assert log["moba_calls"] > 0  # moba_compile.ops.CALLS grew during the run
        assert "moba" in {s["decision"] for s in log["sites"]["moba"]}
        assert log["final"]["flops"]["attention"] < log["final"]["flops"]["attention_full_equivalent"]
    else:
        assert log["moba_calls"] == 0 and decisions == {"dense"}
    assert [s["module"] for s in next(iter(log["sites"].values()))] == [
        f"layers.{i}.attn" for i in range(RUNS[name].n_layers)
    ]


@pytest.mark.parametrize("name", list(ALL_RUNS))
def test_checkpoints_exist(smoke_out: Path, name: str) -> None:
    ckpt = torch.load(smoke_out / "runs" / name / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == ALL_RUNS[name].steps
    assert set(ckpt) >= {"model", "optimizer", "rng_cpu", "log"}


def test_resume_reproduces_the_uninterrupted_run(smoke_out: Path) -> None:
    check = json.loads((smoke_out / "resume_check.json").read_text())
    name = check["run"]
    original = _log(smoke_out, name)
    resumed = json.loads((smoke_out / "resume-check" / f"{name}--resume-check" / "log.json").read_text())
    assert check["checkpoint_step"] == check["stopped_at"] < RUNS[name].steps
    assert [(s["start_step"], s["end_step"]) for s in resumed["sessions"]] == [
        (0, check["stopped_at"]),
        (check["stopped_at"], RUNS[name].steps),
    ]
    assert RUNS[name].switch_to_full_frac > 0  # the check also crosses the switch to full attention
    for key in ("loss", "loss_avg", "val_loss", "val_trailing_loss"):
        assert resumed["final"][key] == original["final"][key]
    assert [r["loss"] for r in resumed["records"]] == [r["loss"] for r in original["records"]]
    assert check["identical"] is True


def test_plots_and_table_written(smoke_out: Path) -> None:
    for name in ("scaling", "trailing", "granularity", "hybrid", "conversion"):
        png = smoke_out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = (smoke_out / "results.md").read_text()
    assert "not a result" in table
    for name in ALL_RUNS:
        assert f"| {name} |" in table
    summary = json.loads((smoke_out / "summary.json").read_text())
    assert summary["moba_calls"] > 0 and summary["smoke"] is True


@pytest.mark.parametrize("length,chunk,topk", [(37, 5, 3), (64, 8, 2), (50, 7, 1), (33, 4, 20)])
def test_moba_pair_count_matches_the_reference_gate(length: int, chunk: int, topk: int) -> None:
    """``moba_pairs`` counts exactly the (query, key) pairs the reference MoBA attends to."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, length, 8), torch.randn(1, 1, length, 8)
    selected = reference.select_chunks(q, k, chunk_size=chunk, topk=topk)[0, 0]
    attended = 0
    for p in range(length):
        attended += p - (p // chunk) * chunk + 1  # own chunk, causally
        attended += sum(min(chunk, length - c * chunk) for c in selected[p].tolist() if c >= 0)
    assert moba_pairs(length, chunk, topk) == attended
    if topk >= -(-length // chunk):
        assert attended == causal_pairs(length)


def test_quick_scale_keeps_every_experiment_at_one_session_size() -> None:
    """The ``--quick`` plan: the four experiments' structure, 200-step runs, sizes q1..q3, shared runs named once."""
    quick = experiments(quick=True)
    full = experiments()
    assert list(quick) == list(full)
    for name, exp in quick.items():
        assert exp.metric == full[name].metric
        assert {er.run.steps for er in exp.runs} == {200}
        assert {er.run.batch_size * er.run.context for er in exp.runs} == {131072}
    assert [er.run.name for er in quick["granularity"].runs][1:] == [
        f"moba-8k-q2-blocks{b}-top{b // 4}" for b in (8, 16, 32, 64, 128)
    ]
    assert {er.run.n_layers for er in quick["scaling"].runs} == {2, 4, 6}
    assert {er.run.dense_last for er in quick["hybrid"].runs} == {0, 1, 2}
    runs = runs_by_name(list(quick.values()))
    assert len(runs) == 19  # the shared full/MoBA runs of (a)/(c) and (b)/(d) are trained once
    with pytest.raises(ValueError, match="pick one scale"):
        experiments(smoke=True, quick=True)


def test_quick_and_smoke_flags_are_exclusive_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    # An argparse refusal: status 2 in this process exactly as in ``python -m examples.reproduce``'s (whose entry
    # point the smoke_out fixture runs).
    from examples.reproduce.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--smoke", "list"])
    assert exc.value.code == 2 and "--smoke and --quick" in capsys.readouterr().err


def test_conversion_runs_start_from_the_source_and_log_like_trained_runs(smoke_out: Path) -> None:
    """The smoke conversion end to end: 0-step and continued runs from the trained dense run, their records, sites."""
    exp = experiments(smoke=True)["conversion"]
    source = exp.runs[0].run
    assert source.init_from is None and source.attention == "full" and source.name in RUNS
    src = _log(smoke_out, source.name)
    assert set(CONVERTED) == {er.run.name for er in exp.runs[1:]} and len(CONVERTED) == 8
    for name, cfg in CONVERTED.items():
        log = _log(smoke_out, name)
        assert cfg.init_from == source.name and log["completed"] and log["final"]["step"] == cfg.steps
        assert log["init_from"] == {
            "run": source.name,
            "step": source.steps,
            "val_loss": src["final"]["val_loss"],
            "val_trailing_loss": src["final"]["val_trailing_loss"],
        }
        evals = [r for r in log["records"] if r["val_loss"] is not None]
        assert evals and evals[-1]["step"] == cfg.steps
        for rec in evals:
            assert math.isfinite(rec["val_loss"]) and math.isfinite(rec["val_trailing_loss"])
            assert rec["val_loss"] < UNIFORM  # a trained model's loss, not a fresh initialisation's
        decisions = {s["decision"] for phase in log["sites"].values() for s in phase}
        if cfg.attention == "moba":
            assert log["moba_calls"] > 0 and decisions == {"moba"}
        else:
            assert log["moba_calls"] == 0 and decisions == {"dense"}
        if cfg.steps == 0:
            # Evaluate only: one record at step 0, no training loss, no training compute.
            [rec] = log["records"]
            assert rec["step"] == 0 and rec["loss"] is None and rec["flops"]["total"] == 0
        else:
            assert log["final"]["flops"]["total"] > 0 and cfg.steps < source.steps
            assert cfg.lr == source.lr * source.min_lr_ratio  # continued from where the source's schedule ended


def test_conversion_dense_baseline_reproduces_the_source(smoke_out: Path) -> None:
    """The 0-step dense run evaluates the source's weights through the same path: the source's final losses exactly."""
    exp = experiments(smoke=True)["conversion"]
    source = exp.runs[0].run
    [baseline] = [er.run for er in exp.runs if er.run.init_from and er.run.attention == "full" and er.run.steps == 0]
    src, base = _log(smoke_out, source.name), _log(smoke_out, baseline.name)
    assert base["final"]["val_loss"] == src["final"]["val_loss"]
    assert base["final"]["val_trailing_loss"] == src["final"]["val_trailing_loss"]
    table = (smoke_out / "results.md").read_text()
    section = table[table.index("(e) Converting") :]
    assert "reproduces the source's final validation loss" in section and "(difference +0.00e+00)" in section
    top = next(er.run for er in exp.runs if er.run.attention == "moba" and er.run.steps == 0)
    assert f"| {top.name} | MoBA C={top.chunk_size} k={top.topk}, from {source.name} |" in section
