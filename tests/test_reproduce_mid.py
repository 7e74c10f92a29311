"""The mid scale of examples/reproduce (every run fits one GPU call), its plan of calls, and the call archives.

CPU only and fast: the plan is computed from the configurations (no training), the archive tests use hand-written
logs, and the call runner trains one smoke-scale run in a subprocess.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest
from reproduce_logs import fake_log, write_log

from examples.reproduce import callplan
from examples.reproduce.archive import ARCHIVE_LIMIT_BYTES, completed_runs, pack, unpack
from examples.reproduce.callplan import MID_MACHINE, Call, Lane, estimate, plan_calls, run_call
from examples.reproduce.cli import sweep
from examples.reproduce.experiments import MID_SEEDS, experiments, runs_by_name
from examples.reproduce.plots import write_plots, write_table
from examples.reproduce.train import RunError

ROOT = Path(__file__).resolve().parents[1]
MID = experiments(mid=True)
RUNS = runs_by_name(list(MID.values()))
MACHINE = MID_MACHINE
ESTIMATES = {name: estimate(cfg, MACHINE) for name, cfg in RUNS.items()}


def test_mid_run_names_are_unique_and_the_other_scales_keep_theirs() -> None:
    names = [er.run.name for exp in MID.values() for er in exp.runs]
    # A name appears twice only for a run shared by two experiments, with one configuration (runs_by_name checks).
    # 37 runs of the four experiments, and the conversion's 8 (its source is (a)'s full-8k-m2, shared by name).
    assert len(RUNS) == len(set(names)) == 45
    assert sum(cfg.init_from is not None for cfg in RUNS.values()) == 8
    others = [runs_by_name(list(experiments(**kw).values())) for kw in ({}, {"quick": True}, {"smoke": True})]
    for other in others:
        assert not set(other) & set(RUNS)
        assert not any("seed" in name for name in other)  # the existing scales' names are unchanged
    # The smoke scale has the conversion's 8 runs too; the GPU and quick scales do not have the experiment.
    assert [len(o) for o in others] == [23, 19, 13 + 8]
    assert {name.split("-")[2] for name in RUNS} == {"m1", "m2", "m3", "m4"}
    with pytest.raises(ValueError, match="pick one scale"):
        experiments(quick=True, mid=True)


def test_mid_plan_covers_the_four_experiments_and_the_second_seeds() -> None:
    def keys(exp: str) -> set[tuple[str, str, int]]:
        return {(er.run.attention, er.label.split(" ")[0], er.run.seed) for er in MID[exp].runs}

    # (a) 4 sizes at 8K, (b) 3 sizes at 32K, each full and MoBA, each with both seeds.
    sizes_a, sizes_b = ("m1", "m2", "m3", "m4"), ("m1", "m2", "m3")
    assert keys("scaling") == {(a, s, seed) for a in ("full", "moba") for s in sizes_a for seed in MID_SEEDS}
    assert keys("trailing") == {(a, s, seed) for a in ("full", "moba") for s in sizes_b for seed in MID_SEEDS}
    assert {er.run.context for er in MID["scaling"].runs} == {8192}
    assert {er.run.context for er in MID["trailing"].runs} == {32768}
    assert len(MID_SEEDS) >= 2
    # A second seed changes nothing but the seed: the spread it measures is the seed's alone.
    for exp in ("scaling", "trailing"):
        for er in MID[exp].runs:
            if er.run.seed:
                base = RUNS[er.run.name.removesuffix(f"-seed{er.run.seed}")]
                assert dataclasses.replace(base, name=er.run.name, seed=er.run.seed) == er.run
    # (c) the five granularities at 75% sparsity at one size, against full attention.
    gran = MID["granularity"].runs
    assert len({er.run.n_layers for er in gran}) == 1 and gran[0].run.attention == "full"
    assert sorted((er.run.topk, er.run.context // er.run.chunk_size) for er in gran[1:]) == [
        (2, 8),
        (4, 16),
        (8, 32),
        (16, 64),
        (32, 128),
    ]
    # (d) the hybrid recipes at one size at 32K: last 1 or 2 layers dense, full attention for the last 10% / 25%.
    hybrid = MID["hybrid"].runs
    assert {er.run.context for er in hybrid} == {32768} and len({er.run.n_layers for er in hybrid}) == 1
    assert {er.run.dense_last for er in hybrid} == {0, 1, 2}
    assert {er.run.switch_to_full_frac for er in hybrid} == {0.0, 0.1, 0.25}


@pytest.mark.parametrize("name", list(RUNS))
def test_every_mid_run_fits_one_call_at_the_assumed_rate(name: str) -> None:
    est = ESTIMATES[name]
    assert est.seconds <= MACHINE.lane_budget_s < MACHINE.deadline_s < MACHINE.call_limit_s
    # MoBA is charged at least its counted FLOPs; an evaluate-only run (a converted model, 0 steps) trains nothing.
    assert (est.flops > 0 or RUNS[name].steps == 0) and est.charged_flops >= est.flops
    assert est.memory_gib < MACHINE.gpu_memory_gib / 2


def test_a_run_too_big_for_one_call_is_refused() -> None:
    """Making a mid run 2x longer pushes it over the budget: the plan refuses it instead of losing it on the GPU."""
    biggest = max(RUNS.values(), key=lambda cfg: ESTIMATES[cfg.name].seconds)
    longer = dataclasses.replace(biggest, steps=biggest.steps * 2)
    assert estimate(longer, MACHINE).seconds > MACHINE.lane_budget_s
    with pytest.raises(ValueError, match="lane budget"):
        plan_calls([*RUNS.values(), longer], MACHINE)


def test_the_estimate_follows_its_assumptions() -> None:
    cfg = RUNS["full-8k-m4"]
    fast = estimate(cfg, dataclasses.replace(MACHINE, tflops=2 * MACHINE.tflops))
    base = ESTIMATES["full-8k-m4"]
    assert fast.seconds - MACHINE.startup_s == pytest.approx((base.seconds - MACHINE.startup_s) / 2, rel=1e-6)
    # Full attention is charged its counted FLOPs (plus validation); MoBA's attention at moba_charge x full's.
    assert base.charged_flops == pytest.approx(base.flops + 3 * base.eval_flops, rel=0.05)
    moba = RUNS["moba-8k-m4"]
    cheap = estimate(moba, dataclasses.replace(MACHINE, moba_charge=1.0))
    assert cheap.charged_flops < ESTIMATES["moba-8k-m4"].charged_flops
    # At charge 1 a MoBA run costs what full attention costs, plus its gate.
    assert cheap.charged_flops == pytest.approx(base.charged_flops, rel=0.05)


def test_the_plan_places_every_run_once_within_the_machine() -> None:
    calls = plan_calls(list(RUNS.values()), MACHINE)
    placed = [name for call in calls for name in call.runs]
    assert sorted(placed) == sorted(RUNS)
    for call in calls:
        assert {lane.gpu for lane in call.lanes} <= set(range(MACHINE.gpus))
        for gpu in {lane.gpu for lane in call.lanes}:
            lanes = [lane for lane in call.lanes if lane.gpu == gpu]
            assert len(lanes) <= MACHINE.procs_per_gpu
            assert all(lane.shared == (len(lanes) == 2) for lane in lanes)
            if len(lanes) == 2:  # side by side only when both fit in memory with margin
                assert sum(max(ESTIMATES[n].memory_gib for n in lane.runs) for lane in lanes) <= MACHINE.gpu_memory_gib
        for lane in call.lanes:
            per_run = [ESTIMATES[n].seconds_shared if lane.shared else ESTIMATES[n].seconds for n in lane.runs]
            assert lane.seconds == pytest.approx(sum(per_run)) and lane.seconds <= MACHINE.lane_budget_s
        assert call.seconds + MACHINE.setup_s < MACHINE.deadline_s
    # The same inputs give the same calls: call N on the GPU machine recomputes the plan list --mid printed.
    again = plan_calls(list(RUNS.values()), MACHINE)
    assert [(c.index, [(lane.tag, lane.runs) for lane in c.lanes]) for c in again] == [
        (c.index, [(lane.tag, lane.runs) for lane in c.lanes]) for c in calls
    ]
    # One process per GPU: no lane shares.
    alone = plan_calls(list(RUNS.values()), dataclasses.replace(MACHINE, procs_per_gpu=1))
    assert not any(lane.shared for call in alone for lane in call.lanes)


def test_list_mid_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    # In this process: `python -m examples.reproduce` exits with main()'s status (its __main__), and the smoke
    # pipeline's test starts it as a process.
    from examples.reproduce.cli import main

    capsys.readouterr()
    assert main(["list", "--mid", "--results", "/nonexistent"]) == 0
    text = capsys.readouterr().out
    calls = plan_calls(list(RUNS.values()), MACHINE)
    for name in RUNS:
        assert f"  {name} " in text
    assert f"{len(calls)} calls" in text and f"{len(RUNS)} runs" in text and "training FLOPs" in text
    for call in calls:
        assert f"call {call.index} --archive $OUT/mid-call{call.index}.tar.gz --results /nonexistent" in text
    # An argparse refusal: status 2 here exactly as in the command's own process.
    with pytest.raises(SystemExit) as exc:
        main(["--mid", "--quick", "list"])
    assert exc.value.code == 2 and "--quick and --mid pick different scales" in capsys.readouterr().err


def test_sweep_only_refuses_unknown_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope"):
        sweep(list(MID.values()), tmp_path, resume=False, only=["full-8k-m1", "nope"])


def test_sweep_skips_runs_complete_in_the_results_tree(tmp_path: Path) -> None:
    """A run complete in the results tree (an earlier call's) is not trained again; one of another config is refused."""
    cfg = RUNS["full-8k-m1"]
    logs = sweep(list(MID.values()), tmp_path, resume=False, only=[cfg.name], done={cfg.name: fake_log(cfg, 2.0)})
    assert logs[cfg.name]["final"]["val_loss"] == 2.0 and not (tmp_path / "runs").exists()
    stale = fake_log(dataclasses.replace(cfg, lr=1.0), 2.0)
    with pytest.raises(RunError, match="another configuration"):
        sweep(list(MID.values()), tmp_path, resume=False, only=[cfg.name], done={cfg.name: stale})


def test_pack_unpack_round_trips_the_logs_and_leaves_checkpoints(tmp_path: Path) -> None:
    out, tree = tmp_path / "out", tmp_path / "tree"
    done, unfinished = RUNS["full-8k-m1"], RUNS["moba-8k-m1"]
    write_log(out, fake_log(done, 2.0))
    write_log(out, fake_log(unfinished, 2.1, completed=False, steps=64))
    (out / "runs" / done.name / "checkpoint.pt").write_bytes(b"\0" * 4096)
    (out / "calls").mkdir()
    (out / "calls" / "call1-gpu0.log").write_text("[1/1] full-8k-m1\n")
    archive = tmp_path / "ret" / "mid-call1.tar.gz"
    members = pack(out, archive)
    assert members == [
        "runs/full-8k-m1/log.json",
        "runs/moba-8k-m1/log.json",
        "calls/call1-gpu0.log",
    ]
    with tarfile.open(archive) as tar:
        assert not any("checkpoint" in m.name for m in tar.getmembers())
    assert archive.stat().st_size < ARCHIVE_LIMIT_BYTES

    actions = unpack(archive, tree)
    assert set(actions.values()) == {"added"}
    for cfg in (done, unfinished):
        mine = tree / "runs" / cfg.name / "log.json"
        assert json.loads(mine.read_text()) == json.loads((out / "runs" / cfg.name / "log.json").read_text())
    assert (tree / "calls" / "mid-call1" / "call1-gpu0.log").read_text() == "[1/1] full-8k-m1\n"
    assert not list(tree.rglob("checkpoint.pt"))
    assert set(completed_runs(tree)) == {done.name}

    # A second archive (a later call): its complete run replaces the unfinished copy; an unfinished copy of a run
    # complete in the tree does not replace it; a completed run of another configuration is refused.
    later = tmp_path / "later"
    write_log(later, fake_log(unfinished, 2.05))
    write_log(later, fake_log(done, 9.0, completed=False, steps=16))
    pack(later, tmp_path / "mid-call2.tar.gz")
    unpack(tmp_path / "mid-call2.tar.gz", tree)
    assert set(completed_runs(tree)) == {done.name, unfinished.name}
    assert completed_runs(tree)[done.name]["final"]["val_loss"] == 2.0
    other = tmp_path / "other"
    write_log(other, fake_log(dataclasses.replace(done, lr=1.0), 1.0))
    pack(other, tmp_path / "other.tar.gz")
    with pytest.raises(ValueError, match="other configurations"):
        unpack(tmp_path / "other.tar.gz", tree)


def test_unpack_skips_anything_but_logs_and_call_files(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("../escape.txt", "/abs.txt", "runs/x/checkpoint.pt", "runs/../../y/log.json", "calls/a/b.log"):
            data = b"{}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    actions = unpack(archive, tmp_path / "tree")
    assert set(actions.values()) == {"skipped"}
    assert not (tmp_path / "escape.txt").exists() and not list((tmp_path / "tree").rglob("*.*"))


def test_nothing_to_pack_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to pack"):
        pack(tmp_path, tmp_path / "a.tar.gz")


def test_plot_and_table_average_the_seeds(tmp_path: Path) -> None:
    # matplotlib is in the test extra: the plot is drawn, never skipped
    values = {"full": {0: 2.00, 1: 2.02}, "moba": {0: 1.90, 1: 1.91}}
    for er in MID["scaling"].runs:
        if er.label.startswith("m1") or er.label.startswith("m2"):
            write_log(tmp_path, fake_log(er.run, values[er.run.attention][er.run.seed]))
    table = write_table(tmp_path, [MID["scaling"]]).read_text()
    # Δ of a seed-1 MoBA run is against the seed-1 full run.
    assert "| moba-8k-m1-seed1 |" in table and "-0.1100 |" in table and "-0.1000 |" in table
    assert "| m1 (3L x 192) | MoBA (chunk 512, top-3) | 2 | -0.1050 | 0.0200 | yes |" in table
    pngs = write_plots(tmp_path, [MID["scaling"]])
    assert pngs[0].read_bytes()[:4] == b"\x89PNG"


def test_call_runs_its_lanes_and_stops_them_at_the_deadline(tmp_path: Path) -> None:
    """One lane trains a smoke run through ``sweep --only`` in a subprocess; a deadline of 0 stops a lane at once."""
    out = tmp_path / "out"
    call = Call(1, [Lane(0, 0, False, ["full-128-t1", "moba-128-t1"], 1.0)])
    summary = run_call(call, out, scale_args=["--smoke"], skip={"moba-128-t1"}, deadline_s=300, poll_s=0.2)
    assert summary["stopped"] == [] and summary["lanes"][0]["returncode"] == 0
    assert summary["lanes"][0]["runs"] == ["full-128-t1"] and summary["lanes"][0]["skipped"] == ["moba-128-t1"]
    assert json.loads((out / "runs" / "full-128-t1" / "log.json").read_text())["completed"]
    assert not (out / "runs" / "moba-128-t1").exists()
    assert "full-128-t1" in (out / "calls" / "call1-gpu0.log").read_text()
    members = pack(out, tmp_path / "call1.tar.gz", runs=call.runs)
    assert "runs/full-128-t1/log.json" in members and "calls/call1.json" in members

    late = run_call(Call(2, [Lane(1, 0, False, ["full-128-t2"], 1.0)]), out, scale_args=["--smoke"], deadline_s=0)
    assert late["stopped"] == ["gpu1"] and late["lanes"][0]["returncode"] is None
    assert json.loads((out / "calls" / "call2.json").read_text())["stopped"] == ["gpu1"]


def test_call_command_lines_stay_short() -> None:
    """The GPU tool takes commands of at most 2,000 characters: a call's line must fit, with room for a wrapper."""
    for call in plan_calls(list(RUNS.values()), MACHINE):
        line = callplan.call_command(call, out="/tmp/reproduce-mid", archive_dir="$OUT", results="x/y")
        assert len(line) < 500 and "$OUT/mid-call" in line and "'" not in line


def test_the_docs_show_the_plan_the_code_makes() -> None:
    """docs/reproduction.md's tables of mid runs and calls are those of ``list --mid`` at the default assumptions."""
    doc = (ROOT / "docs" / "reproduction.md").read_text(encoding="utf-8")
    section = doc[doc.index("## Mid scale (runs that fit one GPU call)") : doc.index("## Large scale (next)")]
    calls = plan_calls(list(RUNS.values()), MACHINE)
    assert f"**{len(calls)} calls" in section and f"{len(RUNS)} runs" in section
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    for call in calls:
        row = rows[str(call.index)]
        assert sorted(row.count(f"`{name}`") for name in call.runs) == [1] * len(call.runs)
        assert f"| {call.seconds:.0f} s |" in row
    for name, cfg in RUNS.items():
        if name.endswith("-seed1"):
            continue
        row = next(line for key, line in rows.items() if key.startswith(f"`{name}`"))
        assert f"| {cfg.steps} |" in row and f"| {ESTIMATES[name].seconds / 60:.1f} |" in row


def test_call_refuses_a_missing_call_and_missing_gpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``call`` on a machine without the GPUs of the call stops before training (a lane would fall back to the CPU)."""
    import torch

    from examples.reproduce.cli import main

    archive = str(tmp_path / "a.tar.gz")
    assert main(["--mid", "--out", str(tmp_path), "call", "99", "--archive", archive]) == 1
    assert "the plan has calls 1.." in capsys.readouterr().err
    if torch.cuda.device_count() < 2:
        assert main(["--mid", "--out", str(tmp_path), "call", "1", "--archive", archive]) == 1
        assert "needs 2 GPUs" in capsys.readouterr().err
    assert not (tmp_path / "a.tar.gz").exists() and not (tmp_path / "runs").exists()


def test_pack_and_unpack_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from examples.reproduce.cli import main

    write_log(tmp_path / "out", fake_log(RUNS["full-8k-m1"], 2.0))
    archive = tmp_path / "mid-call3.tar.gz"
    assert main(["--out", str(tmp_path / "out"), "pack", str(archive)]) == 0
    assert main(["--out", str(tmp_path / "tree"), "unpack", str(archive), str(archive)]) == 0
    out = capsys.readouterr().out
    assert "1 added" in out and "1 kept existing" in out
    assert set(completed_runs(tmp_path / "tree")) == {"full-8k-m1"}
