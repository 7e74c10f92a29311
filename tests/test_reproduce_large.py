"""The large scale of examples/reproduce: its plan and budget, the larger corpus, the multi-call command, and the
calibration of the time estimate (on synthetic logs and on the mid-scale runs in the repository).

CPU only: the plan is computed from the configurations (no training), the corpus tests read temporary trees, the
calibration tests use hand-made logs or the committed mid-scale logs, and the multi-call test trains two smoke-scale
runs in subprocesses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from reproduce_logs import fake_log, write_log

from examples.reproduce import cli
from examples.reproduce.calibrate import calibrate, design, format_calibration, machine_flags
from examples.reproduce.callplan import (
    LARGE_MACHINE,
    MID_MACHINE,
    Call,
    Lane,
    Machine,
    call_command,
    check_dependencies,
    command_groups,
    estimate,
    lane_order,
    parse_call_range,
    plan_calls,
    run_calls,
)
from examples.reproduce.config import RunConfig, layer_plan
from examples.reproduce.corpus import CORPORA, SITE_PREFIX, load_corpus, site_files
from examples.reproduce.experiments import (
    LARGE_CORPUS,
    LARGE_EVAL_BATCHES,
    LARGE_GRANULARITY_SEEDED,
    LARGE_SEEDS,
    experiments,
    runs_by_name,
)
from examples.reproduce.flops import step_flops
from examples.reproduce.plots import write_plots, write_table
from examples.reproduce.train import planned

ROOT = Path(__file__).resolve().parents[1]
MID_RESULTS = ROOT / "benchmarks" / "results" / "reproduce-mid"
LARGE = experiments(large=True)
RUNS = runs_by_name(list(LARGE.values()))
ESTIMATES = {name: estimate(cfg, LARGE_MACHINE) for name, cfg in RUNS.items()}
PLAN = plan_calls(list(RUNS.values()), LARGE_MACHINE, ESTIMATES)


# --- the large plan -------------------------------------------------------------------------------------------------


def test_large_runs_are_the_planned_experiments() -> None:
    """(a) 4 sizes at 8K, (b) 3 at 32K, three seeds of each pair; (c) five settings, the ends seeded; (d); (e)."""

    def keys(exp: str) -> set[tuple[str, str, int]]:
        return {(er.run.attention, er.label.split(" ")[0], er.run.seed) for er in LARGE[exp].runs}

    assert LARGE_SEEDS == (0, 1, 2)
    sizes_a, sizes_b = ("l1", "l2", "l3", "l4"), ("l1", "l2", "l3")
    assert keys("scaling") == {(a, s, seed) for a in ("full", "moba") for s in sizes_a for seed in LARGE_SEEDS}
    assert keys("trailing") == {(a, s, seed) for a in ("full", "moba") for s in sizes_b for seed in LARGE_SEEDS}
    gran = LARGE["granularity"].runs
    seeds_of = {}
    for er in gran:
        seeds_of.setdefault(er.label, set()).add(er.run.seed)
    assert seeds_of == {
        "full": set(LARGE_SEEDS),
        "2/8": set(LARGE_SEEDS),
        "4/16": {0},
        "8/32": {0},
        "16/64": {0},
        "32/128": set(LARGE_SEEDS),
    }
    assert LARGE_GRANULARITY_SEEDED == (8, 128)
    hybrid = {er.run.name for er in LARGE["hybrid"].runs}
    assert {name.removeprefix("moba-32k-l3") for name in hybrid} >= {"", "-dense1", "-dense2", "-switch10", "-switch25"}
    conv = LARGE["conversion"].runs
    assert conv[0].run.name == "full-8k-l3" and all(er.run.init_from == "full-8k-l3" for er in conv[1:])
    assert len(conv) == 9
    # 24 + 18 + (5 + 4 seeded) + 4 + 8 distinct runs; no name shared with another scale.
    assert len(RUNS) == 63
    for other in (experiments(), experiments(quick=True), experiments(mid=True), experiments(smoke=True)):
        assert not set(RUNS) & set(runs_by_name(list(other.values())))
    # A seed changes nothing but the seed.
    for cfg in RUNS.values():
        if cfg.seed:
            base = RUNS[cfg.name.removesuffix(f"-seed{cfg.seed}")]
            assert dataclasses.replace(base, name=cfg.name, seed=cfg.seed) == cfg


def test_large_runs_use_the_larger_corpus_and_more_validation_windows() -> None:
    mid = runs_by_name(list(experiments(mid=True).values()))
    for cfg in RUNS.values():
        assert cfg.corpus == LARGE_CORPUS == "stdlib+site-packages"
        assert cfg.eval_batches == LARGE_EVAL_BATCHES
        # Validation tokens per evaluation: at least 3x the mid scale's (4 micro-batches).
        assert cfg.eval_batches * cfg.micro * cfg.context >= 3 * 4 * cfg.micro * cfg.context
        assert cfg.ckpt_every == max(1, cfg.steps)  # one checkpoint: nothing survives a call
    assert {cfg.corpus for cfg in mid.values()} == {"stdlib"}
    # The 8K runs of (a): at least 12 tokens per parameter, the three smaller sizes 16 or more (20: compute-optimal).
    for er in LARGE["scaling"].runs:
        per_param = planned(er.run)["tokens"] / planned(er.run)["params_matmul"]
        assert per_param >= 12
        if not er.label.startswith("l4"):
            assert per_param >= 16, er.run.name


def test_large_plan_fits_two_commands_of_the_2_gpu_machine() -> None:
    """Every lane under the budget, two calls per command inside the deadline, about 20 device minutes in all."""
    m = LARGE_MACHINE
    assert sorted(name for call in PLAN for name in call.runs) == sorted(RUNS)
    for call in PLAN:
        assert {lane.gpu for lane in call.lanes} <= set(range(m.gpus)) and not any(lane.shared for lane in call.lanes)
        for lane in call.lanes:
            assert lane.seconds == pytest.approx(m.lane_startup_s + sum(ESTIMATES[n].seconds for n in lane.runs))
            assert lane.seconds <= m.lane_budget_s
    check_dependencies(PLAN, list(RUNS.values()))
    groups = command_groups(PLAN, m)
    assert len(groups) == 2 and all(len(group) == 2 for group in groups)
    for group in groups:
        assert m.command_setup_s + sum(call.seconds + m.setup_s for call in group) <= m.deadline_s
    # Commands stop at the deadline and pack within 9 minutes; with the machine's start, about 20 device minutes.
    assert m.deadline_s + cli.PACK_RESERVE_S <= 540 < m.call_limit_s
    total = sum(m.command_setup_s + sum(c.seconds + m.setup_s for c in group) for group in groups)
    assert 15 * 60 <= total <= 19 * 60
    # The conversion lane: the source first, then its runs, in one lane.
    [lane] = [lane for call in PLAN for lane in call.lanes if "full-8k-l3" in lane.runs]
    assert lane.runs[0] == "full-8k-l3" and {er.run.name for er in LARGE["conversion"].runs} <= set(lane.runs)


def test_large_plan_prints_its_commands(capsys: pytest.CaptureFixture[str]) -> None:
    # In this process (``python -m examples.reproduce`` is ``sys.exit(cli.main())``; the module is started as a
    # process by test_calls_runs_what_fits_the_deadline_and_reports_the_rest's lanes).
    capsys.readouterr()
    code = cli.main(["list", "--large", "--results", "/nonexistent"])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "corpus stdlib+site-packages:" in text and "epochs" in text
    for name in RUNS:
        assert f"  {name} " in text
    for group in command_groups(PLAN, LARGE_MACHINE):
        line = call_command(
            group, out="/tmp/reproduce-large", archive_dir="$OUT", results="/nonexistent", scale="large"
        )
        assert f"$ {line}" in text and len(line) < 500
    assert "4 calls in 2 commands" in text


def test_list_can_plan_with_a_fresh_calibration(capsys: pytest.CaptureFixture[str]) -> None:
    """``list --mid --calibrate-from DIR`` plans with the fitted values and repeats them on every command line."""
    assert cli.main(["list", "--mid", "--results", "/nonexistent", "--calibrate-from", str(MID_RESULTS)]) == 0
    text = capsys.readouterr().out
    flags = " ".join(machine_flags(calibrate(MID_RESULTS, MID_MACHINE).machine))
    assert f"--results /nonexistent {flags}" in text
    assert "a step takes" in text  # the fitted (sum) model, not the mid plan's assumption


# --- calibration ----------------------------------------------------------------------------------------------------


TRUTH = Machine(
    tflops=400.0,
    shared_tflops=200.0,
    moba_charge=1.5,
    gate_charge=800.0,
    moba_layer_s=0.003,
    step_floor_s=0.04,
    startup_s=3.5,
    lane_startup_s=9.0,
)
COMPILE_S, GAP_S = 3.0, 0.5  # startup_s = compilation + the seconds outside the log


def _phases(cfg: RunConfig) -> dict[str, Any]:
    """The log's ``phases`` of a run (as train writes them)."""
    params = planned(cfg)["params_matmul"]
    names = ["full"] if cfg.attention == "full" else ["moba"] + (["full"] if cfg.switch_to_full_frac else [])
    out = {}
    for phase in names:
        plan = layer_plan(cfg, phase)
        out[phase] = {
            "layers": [{"mode": p.mode, "chunk_size": p.chunk_size, "topk": p.topk} for p in plan],
            "flops_per_step": step_flops(cfg, plan, params),
        }
    return out


def _synthetic_log(cfg: RunConfig, shared: bool) -> dict[str, Any]:
    """A completed log whose times follow TRUTH exactly: compilation, then steps and validations."""
    phases = _phases(cfg)
    d = design(phases, next(iter(phases)))
    step = d.step_s(TRUTH, shared)
    share = cfg.eval_batches * cfg.micro / cfg.batch_size
    eval_s = TRUTH.eval_seconds(d.charged(TRUTH), 0.0, d.moba_layers, share, shared=shared)
    records, wall = [], COMPILE_S
    for done in range(16, cfg.steps + 1, 16):
        has_eval = done % cfg.eval_every == 0
        wall += 16 * step + (eval_s if has_eval else 0.0)
        phase = next(iter(phases))
        records.append({"step": done, "wall_s": wall, "phase": phase, "val_loss": 1.0 if has_eval else None})
    return {
        "name": cfg.name,
        "config": cfg.to_dict(),
        "phases": phases,
        "records": records,
        "completed": True,
        "final": {"wall_s": wall},
    }


def _write_tree(tmp_path: Path, lanes: list[tuple[int, str, list[RunConfig], bool]]) -> Path:
    """A results tree: the logs and one call summary whose lanes' seconds follow TRUTH (runs in lane order)."""
    tree = tmp_path / "tree"
    entries = []
    for gpu, tag, configs, shared in lanes:
        seconds = TRUTH.lane_startup_s
        for cfg in configs:
            log = _synthetic_log(cfg, shared)
            path = tree / "runs" / cfg.name / "log.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(log))
            seconds += GAP_S + log["final"]["wall_s"]
        entries.append(
            {
                "lane": tag,
                "gpu": gpu,
                "runs": [c.name for c in configs],
                "order": [c.name for c in configs],
                "returncode": 0,
                "seconds": seconds,
            }
        )
    call = tree / "calls" / "x-call1" / "call1.json"
    call.parent.mkdir(parents=True)
    call.write_text(json.dumps({"call": 1, "lanes": entries}))
    return tree


def _cfg(name: str, layers: int, width: int, steps: int, **kw: Any) -> RunConfig:
    base = dict(n_layers=layers, d_model=width, n_heads=width // 64, context=8192, batch_size=16, steps=steps)
    base.update(eval_every=32, eval_batches=4, compiler="aot_eager")
    base.update(kw)
    return RunConfig(name=name, **base)


def test_calibration_recovers_the_model_from_synthetic_logs(tmp_path: Path) -> None:
    """Logs made from known values: the fit returns them (steps, sharing, start-up per run and per lane)."""
    alone0 = [
        _cfg("full-a", 3, 192, 96, attention="full"),
        _cfg("full-b", 6, 384, 96, attention="full"),
        _cfg("full-c", 4, 256, 96, attention="full", context=32768, batch_size=4),
    ]
    alone1 = [
        _cfg("moba-a", 3, 192, 96, attention="moba", chunk_size=512, topk=3),
        _cfg("moba-b", 6, 384, 96, attention="moba", chunk_size=128, topk=8),
        _cfg("moba-c", 4, 256, 96, attention="moba", chunk_size=64, topk=32, dense_last=1),
        _cfg("moba-d", 5, 320, 64, attention="moba", chunk_size=1024, topk=2),
    ]
    shared_a = [
        _cfg("moba-s", 4, 256, 96, attention="moba", chunk_size=512, topk=3),
        _cfg("full-s", 5, 320, 96, attention="full"),
    ]
    tree = _write_tree(tmp_path, [(0, "gpu0", alone0, False), (1, "gpu1", alone1, False), (2, "gpu2a", shared_a, True)])
    # Lane a's partner on GPU 2 runs until long after it (a run without a log here: nothing of it is measured), so
    # every step of lane a is shared.
    summary = json.loads((tree / "calls" / "x-call1" / "call1.json").read_text())
    summary["lanes"].append({"lane": "gpu2b", "gpu": 2, "runs": ["filler"], "returncode": 0, "seconds": 10_000.0})
    (tree / "calls" / "x-call1" / "call1.json").write_text(json.dumps(summary))

    cal = calibrate(tree, Machine(), poll_s=1.0)
    m = cal.machine
    for key in ("tflops", "moba_charge", "gate_charge", "moba_layer_s", "step_floor_s", "shared_tflops"):
        assert getattr(m, key) == pytest.approx(getattr(TRUTH, key), rel=1e-3), key
    assert cal.slowdown == pytest.approx(2.0, rel=1e-3)
    assert cal.compile_s == pytest.approx(COMPILE_S, abs=1e-3)
    assert m.startup_s == pytest.approx(COMPILE_S + GAP_S, abs=1e-3)
    assert m.lane_startup_s == pytest.approx(TRUTH.lane_startup_s, abs=1e-3)
    assert all(p.fitted_s == pytest.approx(p.measured_s, rel=1e-6) for p in cal.points)
    assert {p.mode for p in cal.points} == {"alone", "shared"}
    assert cal.eval_ratio == pytest.approx(1.0, rel=1e-3)
    # Every run's and lane's residual is ~0: the planner's estimate at the fitted values is the truth.
    for _name, _mode, measured, est in cal.runs:
        assert est == pytest.approx(measured, rel=0.02)
    text = format_calibration(cal)
    assert "flags: --tflops 400" in text and "moba-c" in text and "sharing slows each process 2.00x" in text


def test_calibration_needs_measurements(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no calls"):
        calibrate(tmp_path)
    tree = _write_tree(tmp_path, [(0, "gpu0", [_cfg("full-a", 3, 192, 96, attention="full")], False)])
    with pytest.raises(ValueError, match="measured alone"):
        calibrate(tree)


def test_the_defaults_are_the_fit_to_the_mid_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """Machine()'s throughput and start-up are ``calibrate benchmarks/results/reproduce-mid``, to 4 digits."""
    cal = calibrate(MID_RESULTS)
    default = Machine()
    for key in ("tflops", "shared_tflops", "moba_charge", "gate_charge", "step_floor_s", "startup_s", "lane_startup_s"):
        assert getattr(cal.machine, key) == pytest.approx(getattr(default, key), rel=5e-4), key
    assert cal.machine.moba_layer_s == pytest.approx(default.moba_layer_s, abs=1e-6)
    assert len(cal.runs) == 45 and len(cal.lanes) == 28
    # The fit explains the lanes (what the plan budgets) to about 10% rms, every lane within 25%.
    assert all(abs(est / measured - 1) < 0.25 for *_, measured, est in cal.lanes)
    assert cal.slowdown is not None and cal.slowdown > 1.9  # two processes on one GPU: no gain
    assert cli.main(["calibrate", str(MID_RESULTS)]) == 0
    out = capsys.readouterr().out
    assert "flags: --tflops 552.2" in out and "moba-8k-m2-blocks128-top32" in out and "lanes (s" in out


def test_lane_order_reads_the_console_log() -> None:
    console = "[1/3] full-8k-m1\nwarning\n[2/3] moba-8k-m1: done, skipped\n[3/3] moba-32k-m1\n"
    assert lane_order(console) == ["full-8k-m1", "moba-32k-m1"]


# --- the multi-call command and the deadline ------------------------------------------------------------------------


def test_call_ranges_and_command_groups() -> None:
    assert parse_call_range("2", 4) == [2] and parse_call_range("1-3", 4) == [1, 2, 3]
    for bad in ("0", "3-2", "1-5", "x", "1-"):
        with pytest.raises(ValueError, match="calls"):
            parse_call_range(bad, 4)
    m = dataclasses.replace(LARGE_MACHINE, deadline_s=300.0, command_setup_s=20.0, setup_s=5.0)
    calls = [Call(i, [Lane(0, 0, False, [f"r{i}"], s)]) for i, s in enumerate((100.0, 150.0, 200.0, 400.0), 1)]
    # 20 + 105 + 155 = 280 fits 300; 205 starts a new command; 405 alone is over it but still gets one.
    assert [[c.index for c in g] for g in command_groups(calls, m)] == [[1, 2], [3], [4]]
    assert "calls 1-2 --archive $OUT/large-calls1-2.tar.gz" in call_command(
        calls[:2], out="/tmp/x", archive_dir="$OUT", results=None, scale="large"
    )


def test_a_deadline_shorter_than_the_call_is_refused_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``call N --deadline S`` with S below the call's estimate says why and what to do (the old refusal did not)."""
    archive = str(tmp_path / "a.tar.gz")
    assert cli.main(["--mid", "--out", str(tmp_path), "call", "1", "--archive", archive, "--deadline", "390"]) == 1
    err = capsys.readouterr().err
    assert "estimated at 418 s, more than the 390 s deadline" in err and "--lane-budget" in err and "'calls'" in err
    # A deadline at or past the command limit is no deadline.
    assert cli.main(["--mid", "--out", str(tmp_path), "call", "1", "--archive", archive, "--deadline", "600"]) == 1
    assert "deadline_s" in capsys.readouterr().err
    # A deadline the call fits is accepted (this machine then lacks the GPUs).
    assert cli.main(["--mid", "--out", str(tmp_path), "call", "5", "--archive", archive, "--deadline", "390"]) == 1
    err = capsys.readouterr().err
    assert "deadline" not in err and ("needs 2 GPUs" in err or "stopped" in err)
    with pytest.raises(ValueError, match="deadline_s"):
        Machine(deadline_s=600.0)


def test_calls_runs_what_fits_the_deadline_and_reports_the_rest(tmp_path: Path) -> None:
    """Two smoke calls in one command: both run with time to spare; with a short deadline the long one is not started
    (its estimate does not fit), and the next one that fits still runs."""
    smoke = runs_by_name(list(experiments(smoke=True).values()))
    out = tmp_path / "out"
    # Lanes polled every 0.2 s (the default 1 s only adds waiting after each lane's exit).
    common: dict[str, Any] = dict(
        runs=list(smoke.values()), done={}, scale_args=["--smoke"], deadline_s=300, reserve_s=5, poll_s=0.2
    )
    first = Call(1, [Lane(0, 0, False, ["full-128-t1"], 1.0)])
    second = Call(2, [Lane(0, 0, False, ["moba-128-t1"], 1.0)])
    summary = run_calls([first, second], out, **common)
    assert summary["started"] == [1, 2] and summary["not_started"] == [] and summary["ok"]
    for name in ("full-128-t1", "moba-128-t1"):
        assert json.loads((out / "runs" / name / "log.json").read_text())["completed"]
    assert json.loads((out / "calls" / "call1.json").read_text())["lanes"][0]["order"] == ["full-128-t1"]

    too_long = Call(3, [Lane(0, 0, False, ["full-128-t2"], 10_000.0)])
    fits = Call(4, [Lane(0, 0, False, ["moba-128-t2"], 1.0)])
    summary = run_calls([too_long, fits], out, **common)
    assert summary["started"] == [4] and [c["call"] for c in summary["not_started"]] == [3] and not summary["ok"]
    assert not (out / "runs" / "full-128-t2").exists()
    assert json.loads((out / "runs" / "moba-128-t2" / "log.json").read_text())["completed"]


def test_calls_reads_the_corpus_once_and_reports_other_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the lanes start, ``calls`` reads a non-default corpus and names completed runs of another digest."""
    import torch

    from examples.reproduce import corpus as corpus_mod

    fake = corpus_mod.Corpus(
        torch.zeros(10, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8), "/x", 1, 1, "abc", "3"
    )
    seen: list[str] = []

    def load(**kw: Any) -> corpus_mod.Corpus:
        seen.append(kw["kind"])
        return fake

    monkeypatch.setattr(corpus_mod, "load_corpus", load)
    cfg = next(iter(RUNS.values()))
    done = {
        "a": {"corpus": {"kind": LARGE_CORPUS, "sha256": "def"}},
        "b": {"corpus": {"sha256": "zzz"}},  # a stdlib run: another corpus, not another digest of this one
    }
    report = cli._warm_corpus([cfg, cfg], done)
    assert seen == [LARGE_CORPUS] and report[LARGE_CORPUS]["other_digests"] == ["def"]
    assert cli._warm_corpus([dataclasses.replace(cfg, corpus="stdlib")], done) == {}


# --- the corpus -----------------------------------------------------------------------------------------------------


def _tree(base: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = base / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return base


def test_the_site_packages_corpus_on_a_temp_tree(tmp_path: Path) -> None:
    stdlib = _tree(
        tmp_path / "lib", {"os.py": "import sys\n", "json/__init__.py": "x = 1\n", "a/__pycache__/c.py": "!"}
    )
    site1 = _tree(
        tmp_path / "site1",
        {
            "pkg/__init__.py": "A = 1\n",
            "pkg/mod.py": "def f():\n    return 2\n",
            "dup.py": "first\n",
            "pkg/data.txt": "not python",
            "pkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: Pkg\nVersion: 1.0\n",
        },
    )
    site2 = _tree(tmp_path / "site2", {"dup.py": "second\n", "zeta.py": "z = 26\n"})
    (site2 / "gone.py").symlink_to(site2 / "missing.py")  # a dangling link: skipped, not an error
    files, skipped = site_files([site1, site2])
    assert [key for key, _ in files] == [
        f"{SITE_PREFIX}{k}" for k in ("dup.py", "pkg/__init__.py", "pkg/mod.py", "zeta.py")
    ]
    assert dict(files)[f"{SITE_PREFIX}dup.py"].read_text() == "first\n" and skipped == [f"{SITE_PREFIX}dup.py"]

    plain = load_corpus(500, str(stdlib))
    both = load_corpus(500, str(stdlib), "stdlib+site-packages", (str(site1), str(site2)))
    again = load_corpus(500, str(stdlib), "stdlib+site-packages", (str(site1), str(site2)))
    assert both is again  # cached per process
    d = both.describe()
    assert d["kind"] == "stdlib+site-packages" and d["site_roots"] == [str(site1), str(site2)]
    assert d["files_stdlib"] == 2 and d["files_site_packages"] == 4 and d["duplicates_skipped"] == 1
    assert d["bytes_stdlib"] == plain.train.numel() + plain.val.numel()
    assert d["bytes_stdlib"] + d["bytes_site_packages"] == both.train.numel() + both.val.numel()
    assert d["packages"] == {"pkg": "1.0"}
    assert both.files_train + both.files_val == 6 and both.sha256 != plain.sha256
    # The standard library's files keep their split and order: the stdlib corpus is a prefix of each split.
    assert both.train[: plain.train.numel()].tolist() == plain.train.tolist()
    assert both.val[: plain.val.numel()].tolist() == plain.val.tolist()
    # The stdlib corpus's description is as it was before the second corpus existed (logs compare nothing else).
    assert set(plain.describe()) == {"root", "python", "files_train", "files_val", "bytes_train", "bytes_val", "sha256"}
    with pytest.raises(FileNotFoundError, match="no .py files"):
        load_corpus(500, str(stdlib), "stdlib+site-packages", (str(tmp_path / "lib" / "a"),))
    with pytest.raises(ValueError, match="corpus 'web'"):
        load_corpus(500, str(stdlib), "web")


def test_the_corpus_is_part_of_a_runs_identity_only_when_not_the_default() -> None:
    cfg = RunConfig("x")
    assert cfg.corpus == CORPORA[0] == "stdlib" and "corpus" not in cfg.identity()
    other = dataclasses.replace(cfg, corpus="stdlib+site-packages")
    assert other.identity()["corpus"] == "stdlib+site-packages" and other.identity() != cfg.identity()
    with pytest.raises(ValueError, match="corpus='web'"):
        RunConfig("x", corpus="web")
    # The mid logs (written before the field existed) still match their registry runs.
    mid = runs_by_name(list(experiments(mid=True).values()))
    log = json.loads((MID_RESULTS / "runs" / "full-8k-m1" / "log.json").read_text())
    assert log["identity"] == mid["full-8k-m1"].identity()


# --- charts and tables with seeded granularity settings -------------------------------------------------------------


def test_granularity_table_and_chart_average_the_seeds(tmp_path: Path) -> None:
    values = {"full": 2.0, "2/8": 1.9, "4/16": 1.95, "8/32": 1.96, "16/64": 1.97, "32/128": 2.1}
    for er in LARGE["granularity"].runs:
        value = values[er.label] + 0.01 * er.run.seed
        write_log(tmp_path, fake_log(er.run, value))
    table = write_table(tmp_path, [LARGE["granularity"]]).read_text()
    # Each seeded MoBA run against the full run of its own seed.
    assert "| moba-8k-l3-blocks8-top2-seed2 |" in table and "| -0.1000 |" in table
    assert "full attention: 3 seeds, mean 2.0100, range 0.0200" in table
    assert "| 2/8 | 3 | 1.9100 | 0.0200 | -0.1000 | 0.0200 | yes |" in table
    assert "| 32/128 | 3 | 2.1100 | 0.0200 | +0.1000 | 0.0200 | yes |" in table
    pngs = write_plots(tmp_path, [LARGE["granularity"]])
    assert pngs[0].read_bytes()[:4] == b"\x89PNG"


# --- the docs -------------------------------------------------------------------------------------------------------


def test_the_docs_show_the_large_plan_and_the_fit() -> None:
    doc = (ROOT / "docs" / "reproduction.md").read_text(encoding="utf-8")
    section = doc[doc.index("## Large scale (next)") : doc.index("## Commands")]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    for call in PLAN:
        row = rows[str(call.index)]
        assert sorted(row.count(f"`{name}`") for name in call.runs) == [1] * len(call.runs), call.index
        assert f"| {call.seconds:.0f} s |" in row
    default = Machine()
    assert f"{default.tflops:g} TFLOP/s" in section and f"{default.step_floor_s:g} s" in section
    assert f"{len(RUNS)} runs" in section
