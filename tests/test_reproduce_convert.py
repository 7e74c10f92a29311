"""Converting a trained model (examples/reproduce ``conversion``): ``init_from`` runs, their errors, and their place in
the plan of GPU calls.

CPU only and fast: the plan is computed from the configurations; the errors and the sweep test train one or two
smoke-scale runs in process (seconds). The smoke conversion end to end is in ``test_reproduce_smoke.py`` (the smoke
pipeline trains it with everything else).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from examples.reproduce.callplan import (
    MID_MACHINE,
    Call,
    Lane,
    check_dependencies,
    dependency_groups,
    estimate,
    plan_calls,
    runs_to_skip,
)
from examples.reproduce.cli import sweep
from examples.reproduce.config import RunConfig, apply_overrides
from examples.reproduce.experiments import MID_CONVERSION_TOPK, conversion_runs, experiments, runs_by_name
from examples.reproduce.train import RunError, read_log, train

MID = experiments(mid=True)
RUNS = runs_by_name(list(MID.values()))
MACHINE = MID_MACHINE
CONV = MID["conversion"]
SOURCE = CONV.runs[0].run
CONVERTED = [er.run for er in CONV.runs[1:]]
SMOKE = experiments(smoke=True)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from threads on this shared 2-core machine (see cli.main's --smoke).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_mid_conversion_is_the_planned_experiment() -> None:
    """Source: the dense 8K m2 run of (a); per top-k a 0-step and a 10%-continued MoBA run; dense likewise."""
    assert SOURCE.name == "full-8k-m2" and SOURCE == RUNS["full-8k-m2"]
    assert all(cfg.init_from == SOURCE.name for cfg in CONVERTED)
    moba = [cfg for cfg in CONVERTED if cfg.attention == "moba"]
    assert sorted({cfg.topk for cfg in moba}) == sorted(MID_CONVERSION_TOPK) and 3 <= len(MID_CONVERSION_TOPK) <= 4
    assert {cfg.chunk_size for cfg in moba} == {512} and {cfg.dense_last for cfg in moba} == {0}
    assert {cfg.steps for cfg in CONVERTED} == {0, round(SOURCE.steps / 10)}
    dense = [cfg for cfg in CONVERTED if cfg.attention == "full"]
    assert sorted(cfg.steps for cfg in dense) == [0, round(SOURCE.steps / 10)]
    for cfg in CONVERTED:
        # Same model, data shape and validation as the source: only the attention and the schedule change.
        for key in ("n_layers", "d_model", "n_heads", "mlp_ratio", "context", "batch_size", "eval_batches", "seed"):
            assert getattr(cfg, key) == getattr(SOURCE, key), key


def test_the_source_is_the_largest_dense_8k_run_whose_conversion_fits_a_lane() -> None:
    """m2's lane (source + 8 converted runs) fits the budget; the same conversion of m3 or m4 does not."""
    for key, fits in (("m2", True), ("m3", False), ("m4", False)):
        source = RUNS[f"full-8k-{key}"]
        steps = round(source.steps / 10)
        runs = [source, *(er.run for er in conversion_runs(source, f"8k-{key}", 512, MID_CONVERSION_TOPK, steps, 6))]
        total = sum(estimate(cfg, MACHINE).seconds for cfg in runs)
        assert (total <= MACHINE.lane_budget_s) == fits, (key, total)
        if not fits:
            with pytest.raises(ValueError, match="lane budget: full-8k-"):
                plan_calls(runs, MACHINE)


def test_the_plan_puts_converted_runs_after_their_source_in_its_lane() -> None:
    calls = plan_calls(list(RUNS.values()), MACHINE)
    [(call, lane)] = [(c, lane) for c in calls for lane in c.lanes if SOURCE.name in lane.runs]
    assert lane.runs[0] == SOURCE.name and set(lane.runs[1:]) >= {cfg.name for cfg in CONVERTED}
    assert lane.seconds <= MACHINE.lane_budget_s and not lane.shared
    others = [name for c in calls for other in c.lanes if other is not lane for name in other.runs]
    assert not {cfg.name for cfg in CONVERTED} & set(others)
    check_dependencies(calls, list(RUNS.values()))  # no error
    groups = dependency_groups(list(RUNS.values()))
    assert [SOURCE.name, *(cfg.name for cfg in CONVERTED)] in groups
    assert sum(len(g) for g in groups) == len(RUNS) and sum(len(g) > 1 for g in groups) == 1


def _lane(gpu: int, runs: list[str], slot: int = 0, shared: bool = False) -> Lane:
    return Lane(gpu, slot, shared, runs, 1.0)


@pytest.mark.parametrize(
    "calls,where",
    [
        # The converted run in another call.
        ([Call(1, [_lane(0, ["src"])]), Call(2, [_lane(0, ["conv"])])], "call 2 gpu0"),
        # In another lane of the same call (another process: the checkpoint is there, but maybe not yet).
        ([Call(1, [_lane(0, ["src"]), _lane(1, ["conv"])])], "call 1 gpu1"),
        ([Call(1, [_lane(0, ["src"], 0, True), _lane(0, ["conv"], 1, True)])], "call 1 gpu0b"),
        # Before its source in the same lane.
        ([Call(1, [_lane(0, ["conv", "src"])])], "position 1"),
        # Its source in no call.
        ([Call(1, [_lane(0, ["conv"])])], "no call trains"),
    ],
)
def test_check_dependencies_refuses_a_converted_run_away_from_its_source(calls: list[Call], where: str) -> None:
    src = RunConfig("src", context=256, batch_size=2, steps=8, attention="full")
    conv = dataclasses.replace(src, name="conv", init_from="src", steps=0)
    with pytest.raises(ValueError, match="conv") as err:
        check_dependencies(calls, [src, conv])
    assert where in str(err.value)
    check_dependencies([Call(1, [_lane(0, ["src", "conv"])])], [src, conv])  # the one good placement


def test_plan_refuses_a_converted_run_without_its_source_or_with_a_cycle() -> None:
    with pytest.raises(ValueError, match=r"does not train: conv-8k-m2-dense-0 \(from full-8k-m2\), conv-8k-m2-top2-0"):
        plan_calls([cfg for cfg in RUNS.values() if cfg.name != SOURCE.name], MACHINE)
    a = RunConfig("a", steps=1, init_from="b")
    b = RunConfig("b", steps=1, init_from="a")
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        dependency_groups([a, b])


def test_a_call_retrains_a_source_whose_converted_runs_are_not_done() -> None:
    """The source's checkpoint died with its earlier call: skipping it leaves its converted runs nothing to load."""
    calls = plan_calls(list(RUNS.values()), MACHINE)
    call = next(c for c in calls if SOURCE.name in c.runs)
    others = [n for n in call.runs if n != SOURCE.name and n not in {cfg.name for cfg in CONVERTED}]
    runs = list(RUNS.values())
    assert runs_to_skip(call, runs, {SOURCE.name, *others}) == set(others)
    assert runs_to_skip(call, runs, set(call.runs)) == set(call.runs)
    half = {SOURCE.name, CONVERTED[0].name}
    assert runs_to_skip(call, runs, half) == {CONVERTED[0].name}


def test_config_rules_for_init_from() -> None:
    with pytest.raises(ValueError, match="steps must be >= 1"):
        RunConfig("x", steps=0)
    with pytest.raises(ValueError, match="names the run itself"):
        RunConfig("x", init_from="x")
    assert RunConfig("x", steps=0, init_from="y").steps == 0
    # Unset, it stays out of the identity: logs written before the field existed still match their configurations.
    assert "init_from" not in RunConfig("x").identity() and RunConfig("x", init_from="y").identity()["init_from"]
    cfg = apply_overrides(RunConfig("x"), ["init_from=y", "steps=0"])
    assert cfg.init_from == "y" and cfg.steps == 0
    assert apply_overrides(cfg, ["init_from=none", "steps=3"]).init_from is None


def _smoke(name: str) -> RunConfig:
    return dataclasses.replace(runs_by_name(list(SMOKE.values()))[name], device="cpu")


def test_init_from_errors_name_both_runs(tmp_path: Path) -> None:
    """No checkpoint, an unfinished checkpoint, and another model shape: each a RunError naming both runs."""
    source = _smoke("full-128-t1")
    conv = dataclasses.replace(source, name="conv-t1", init_from=source.name, steps=0, eval_every=1, ckpt_every=1)
    runs = tmp_path / "runs"
    with pytest.raises(RunError, match=r"conv-t1: init_from='full-128-t1', but .*checkpoint.pt does not exist"):
        train(conv, runs / conv.name, progress=False)
    train(source, runs / source.name, stop_after=2, progress=False)
    with pytest.raises(RunError, match=r"conv-t1: init_from='full-128-t1', but .* is not a final checkpoint \(step 2"):
        train(conv, runs / conv.name, progress=False)
    train(source, runs / source.name, resume=True, progress=False)
    wider = dataclasses.replace(conv, name="conv-wide", d_model=64, n_heads=4)
    with pytest.raises(RunError, match=r"conv-wide \(1L x 64, 4 heads.*cannot start from full-128-t1 \(1L x 32"):
        train(wider, runs / wider.name, progress=False)
    deeper = dataclasses.replace(conv, name="conv-deep", n_layers=2)
    with pytest.raises(RunError, match=r"conv-deep .*full-128-t1.*model shapes differ \(layers\.1\."):
        train(deeper, runs / deeper.name, progress=False)
    # The error leaves nothing behind that a later sweep would take for a run.
    log = read_log(runs / conv.name)
    assert log is None or not log["completed"]


def test_sweep_retrains_a_source_complete_only_in_the_results_tree(tmp_path: Path) -> None:
    """sweep --results: a source done in an earlier call has no checkpoint here, so it trains again before its runs."""
    exp = SMOKE["conversion"]
    source = exp.runs[0].run
    baseline = next(er.run for er in exp.runs if er.run.init_from and er.run.attention == "full" and not er.run.steps)
    earlier = {"name": source.name, "identity": source.identity(), "completed": True, "final": {"val_loss": 9.0}}
    only = [source.name, baseline.name]
    logs = sweep([exp], tmp_path, resume=False, progress=False, only=only, done={source.name: earlier})
    assert logs[source.name] is not earlier and (tmp_path / "runs" / source.name / "checkpoint.pt").exists()
    assert logs[baseline.name]["final"]["val_loss"] == logs[source.name]["final"]["val_loss"]
    # Once its converted runs are done too, the source is skipped like any complete run.
    again = sweep([exp], tmp_path, resume=False, progress=False, only=[baseline.name], done={source.name: earlier})
    assert again[baseline.name]["final"] == logs[baseline.name]["final"]
