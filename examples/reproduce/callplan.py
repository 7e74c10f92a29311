"""Time estimates for runs and their grouping into calls of the GPU machine (the mid scale's plan).

The GPU machine this project borrows keeps nothing between calls: one command runs at most 10 minutes, at most 8
files of 16 MiB come back from it, and a session has 30 device minutes. A run that does not finish inside one call is
lost (its checkpoint, with the optimizer, is far over 16 MiB), so every run of the mid scale must fit one call, and a
call's runs come back as one archive of their logs (:mod:`examples.reproduce.archive`).

**The estimate** of a run's wall time, on one GPU, is an assumption to replace with measurements (each log records
the wall time of every record; the ``max_memory_gib`` of its sessions):

- ``startup_s`` per run (process start, corpus, model, compilation: the quick-scale runs on an H100 logged 3-34 s up
  to their first record, its 10 steps included, with the ``aot_eager`` compiler the mid scale uses; 30 s assumed);
- per optimizer step, the step's *charged* FLOPs at ``tflops`` (60 TFLOP/s per process alone on an H200: a conservative
  assumption; three concurrent processes on one H100 measured 87 TFLOP/s together), but never less than
  ``step_floor_s`` (0.1 s: the smallest quick-scale models took 110-160 ms per step whatever their FLOPs, a floor of
  launches, Python and data);
- validation: a forward pass (a third of the dense and attention FLOPs, plus the gate) over ``eval_batches``
  micro-batches, at every ``eval_every`` steps and at the end.

*Charged* FLOPs are the repository's count (:mod:`examples.reproduce.flops`) with one change: a MoBA layer's attention
is charged ``moba_charge`` (2.0) times the FLOPs **full** attention would cost in that layer, not its attended pairs.
The quick-scale H100 runs show why: every MoBA run took longer than its full-attention partner (1.1-1.9x the wall
time, although it counts a third to a half of the FLOPs), so counted MoBA FLOPs ran at a fifth to two fifths of full
attention's rate. The kernel benchmarks have improved since (MoBA's fwd+bwd 0.88x of dense SDPA's time at 8K C512 K3,
0.65x at 32K C2048 K3 on an H200), so 2.0 is an upper bound that keeps a MoBA run from overrunning its call. Lower it
after measuring.

**Grouping** (:func:`plan_calls`): runs go into *lanes* (the runs one process trains one after the other in a call)
whose estimated total stays under ``lane_budget_s`` (7 minutes: the call's 10 leave 3 for starting the processes,
packing the logs, and an assumed rate that was too high); a call has ``gpus`` GPUs, each running one lane, or two
lanes side by side when both lanes' runs fit in memory (estimated by :func:`memory_gib`, up to half the GPU each) and
their estimate at ``shared_tflops`` (35 TFLOP/s per process, 70 per GPU: between the 60 assumed for one process and
the 87 measured for three on one H100) still fits. Small models leave the GPU partly idle (the step floor above), so
two of them side by side finish sooner than one after the other; large models would only take longer, so they run
alone. Best-fit decreasing, largest runs first, so the first call also measures the largest runs. A run that starts
from another run's final checkpoint (``init_from``: the conversion experiment) is placed with it as one unit, after it
in the same lane, since that checkpoint exists only inside the call that trained the source (:func:`check_dependencies`
refuses any other placement).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig, eval_phase, layer_plan, switch_step
from .flops import step_flops
from .jsonio import write_json
from .train import planned

__all__ = [
    "Call",
    "Lane",
    "Machine",
    "RunEstimate",
    "call_command",
    "check_dependencies",
    "dependency_groups",
    "estimate",
    "format_plan",
    "memory_gib",
    "plan_calls",
    "run_call",
    "runs_to_skip",
]

#: Bytes of saved activations per token, per layer, per unit of model width: a rough upper estimate for training
#: without fusion (the ``aot_eager`` compiler) under bfloat16 autocast, fp32 residual stream and norms; nothing
#: measured yet (the logs' ``max_memory_gib`` will say).
ACTIVATION_BYTES = 100


@dataclass(frozen=True)
class Machine:
    """The GPU machine's limits and the throughput assumptions of the estimate (see the module docstring).

    Attributes:
        call_limit_s: the longest one command may run (the machine stops it then).
        lane_budget_s: the most estimated seconds of runs one process may be given in a call.
        deadline_s: when ``call`` stops lanes still running and packs what is there (before ``call_limit_s``).
        gpus: GPUs per call. gpu_memory_gib: memory of one GPU. procs_per_gpu: at most this many lanes per GPU.
        tflops: counted-FLOP rate of one process alone on a GPU. shared_tflops: per process, two on one GPU.
        moba_charge: a MoBA layer's attention is charged this many times full attention's FLOPs in that layer.
        startup_s: per run, before its first step. step_floor_s: no step is estimated faster than this.
        setup_s: per call, on top of its longest lane: starting the command and packing the logs.
    """

    call_limit_s: float = 600.0
    lane_budget_s: float = 420.0
    deadline_s: float = 540.0
    gpus: int = 2
    gpu_memory_gib: float = 139.0
    procs_per_gpu: int = 2
    tflops: float = 60.0
    shared_tflops: float = 35.0
    moba_charge: float = 2.0
    startup_s: float = 30.0
    step_floor_s: float = 0.1
    setup_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.lane_budget_s <= self.deadline_s < self.call_limit_s:
            raise ValueError("need 0 < lane_budget_s <= deadline_s < call_limit_s")
        if self.gpus < 1 or self.procs_per_gpu not in (1, 2):
            raise ValueError("gpus must be >= 1 and procs_per_gpu 1 or 2")
        if min(self.tflops, self.shared_tflops, self.moba_charge) <= 0:
            raise ValueError("rates and moba_charge must be positive")


@dataclass(frozen=True)
class RunEstimate:
    """One run's compute and estimated wall time and memory on the :class:`Machine`.

    Attributes:
        name: the run. flops: counted training FLOPs (``planned(cfg)["flops"]["total"]``). eval_flops: counted FLOPs
            of its validation passes. charged_flops: training plus validation FLOPs as charged for time (MoBA layers
            at ``moba_charge`` x full attention). seconds: estimated wall time alone on a GPU. seconds_shared: with
            another process on the GPU. memory_gib: estimated peak memory (:func:`memory_gib`).
    """

    name: str
    flops: float
    eval_flops: float
    charged_flops: float
    seconds: float
    seconds_shared: float
    memory_gib: float


@dataclass
class Lane:
    """The runs one process trains in sequence in a call, on GPU ``gpu`` (slot 0 or 1 of that GPU)."""

    gpu: int
    slot: int
    shared: bool
    runs: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tag(self) -> str:
        """``gpu0``, or ``gpu0a`` / ``gpu0b`` when two lanes share the GPU (names the lane's console log)."""
        return f"gpu{self.gpu}" + ("ab"[self.slot] if self.shared else "")


@dataclass
class Call:
    """One command on the GPU machine: its lanes (all started at once) and its estimated wall time."""

    index: int
    lanes: list[Lane]

    @property
    def seconds(self) -> float:
        """The longest lane's estimate (the lanes run in parallel)."""
        return max((lane.seconds for lane in self.lanes), default=0.0)

    @property
    def runs(self) -> list[str]:
        """Every run of the call, lane by lane."""
        return [name for lane in self.lanes for name in lane.runs]


def memory_gib(cfg: RunConfig, params_total: int) -> float:
    """A rough upper estimate of a run's peak GPU memory in GiB (not measured; see :data:`ACTIVATION_BYTES`).

    Args:
        cfg: the run. params_total: its parameters.

    Returns:
        Activations of one micro-batch (``micro * context * n_layers * d_model * ACTIVATION_BYTES``), its logits and
        their gradient (12 bytes per token per vocabulary entry), and 16 bytes per parameter (fp32 weights and
        gradients, two AdamW states).
    """
    tokens = cfg.micro * cfg.context
    activations = tokens * cfg.n_layers * cfg.d_model * ACTIVATION_BYTES
    logits = tokens * 256 * 12
    return (activations + logits + 16 * params_total) / 2**30


def _phase_cost(cfg: RunConfig, params: int, phase: str, charge: float) -> tuple[float, float, float]:
    """``(charged FLOPs per step, charged FLOPs per validation pass, counted FLOPs per validation pass)``."""
    plan = layer_plan(cfg, phase)
    f = step_flops(cfg, plan, params)
    per_layer_full = f["attention_full_equivalent"] / len(plan)
    n_moba = sum(layer.mode == "moba" for layer in plan)
    charged_attention = per_layer_full * ((len(plan) - n_moba) + charge * n_moba)
    step = f["dense"] + charged_attention + f["gate"]
    # Validation: the forward pass only (a third of 2 + 4 for the matmuls, of 4D + 8D per attended pair; the gate
    # has no backward anyway), over eval_batches micro-batches instead of a step's batch_size sequences.
    share = cfg.eval_batches * cfg.micro / cfg.batch_size
    charged_eval = ((f["dense"] + charged_attention) / 3 + f["gate"]) * share
    counted_eval = ((f["dense"] + f["attention"]) / 3 + f["gate"]) * share
    return step, charged_eval, counted_eval


def estimate(cfg: RunConfig, machine: Machine | None = None) -> RunEstimate:
    """Estimate one run's compute, wall time (alone and sharing a GPU) and memory (see the module docstring).

    Args:
        cfg: the run. machine: limits and assumptions (default :class:`Machine`).

    Returns:
        The estimate.
    """
    machine = machine or Machine()
    plan = planned(cfg)
    params = plan["params_matmul"]
    phases = ["full"] if cfg.attention == "full" else ["moba", "full"]
    costs = {phase: _phase_cost(cfg, params, phase, machine.moba_charge) for phase in phases}
    sw = switch_step(cfg)
    steps = {"full": cfg.steps} if cfg.attention == "full" else {"moba": sw, "full": cfg.steps - sw}
    evals = sorted({*range(cfg.eval_every, cfg.steps + 1, cfg.eval_every), cfg.steps})
    eval_phases = [eval_phase(cfg, done) for done in evals]
    charged = sum(costs[p][0] * n for p, n in steps.items()) + sum(costs[p][1] for p in eval_phases)
    counted_eval = sum(costs[p][2] for p in eval_phases)

    def seconds(rate_tflops: float) -> float:
        rate = rate_tflops * 1e12
        train = sum(n * max(machine.step_floor_s, costs[p][0] / rate) for p, n in steps.items())
        return machine.startup_s + train + sum(costs[p][1] for p in eval_phases) / rate

    return RunEstimate(
        name=cfg.name,
        flops=float(plan["flops"]["total"]),
        eval_flops=counted_eval,
        charged_flops=charged,
        seconds=seconds(machine.tflops),
        seconds_shared=seconds(machine.shared_tflops),
        memory_gib=memory_gib(cfg, plan["params_total"]),
    )


@dataclass
class _Gpu:
    shared: bool
    lanes: list[Lane]


def dependency_groups(runs: Sequence[RunConfig]) -> list[list[str]]:
    """The runs as groups that must share a lane: a run with ``init_from`` joins the group of the run it starts from.

    A converted run needs its source's final checkpoint, which exists only on the GPU machine, inside the call that
    trained the source (a checkpoint never comes back from a call), so a source and everything converted from it
    (transitively) are one group, trained by one process in order.

    Args:
        runs: the runs (distinct names).

    Returns:
        One list of run names per group, each source before the runs that start from it (else in the order of
        ``runs``); groups in the order of their first run. A run without dependencies is a group of one.

    Raises:
        ValueError: a run starts from a run that is not among ``runs``, or ``init_from`` forms a cycle.
    """
    by_name = {cfg.name: cfg for cfg in runs}
    missing = [f"{cfg.name} (from {cfg.init_from})" for cfg in runs if cfg.init_from and cfg.init_from not in by_name]
    if missing:
        raise ValueError(f"runs starting from a run the plan does not train: {', '.join(missing)}")

    def chain(name: str) -> list[str]:
        # The run, its source, the source's source... up to a run without init_from.
        seen = [name]
        while (parent := by_name[seen[-1]].init_from) is not None:
            if parent in seen:
                raise ValueError(f"init_from forms a cycle: {' -> '.join([*seen, parent])}")
            seen.append(parent)
        return seen

    order = {cfg.name: i for i, cfg in enumerate(runs)}
    groups: dict[str, list[str]] = {}
    depth: dict[str, int] = {}
    for cfg in runs:
        path = chain(cfg.name)
        depth[cfg.name] = len(path) - 1
        groups.setdefault(path[-1], []).append(cfg.name)
    out = [sorted(members, key=lambda n: (depth[n], order[n])) for members in groups.values()]
    return sorted(out, key=lambda members: min(order[n] for n in members))


def check_dependencies(calls: Sequence[Call], runs: Sequence[RunConfig]) -> None:
    """Fail loudly when a plan puts a run that starts from another run's checkpoint anywhere but after it, in its lane.

    Args:
        calls: a plan (from :func:`plan_calls` or built by hand). runs: the runs' configurations.

    Raises:
        ValueError: a run with ``init_from`` whose source is not planned, or is in another call, another lane, or
            later in the same lane (its checkpoint would not exist when the run starts).
    """
    where = {
        name: (call.index, lane.tag, pos) for call in calls for lane in call.lanes for pos, name in enumerate(lane.runs)
    }
    problems = []
    for cfg in runs:
        if cfg.init_from is None or cfg.name not in where:
            continue
        mine, theirs = where[cfg.name], where.get(cfg.init_from)
        if theirs is None:
            problems.append(f"{cfg.name} starts from {cfg.init_from}, which no call trains")
        elif mine[:2] != theirs[:2] or theirs[2] > mine[2]:
            problems.append(
                f"{cfg.name} (call {mine[0]} {mine[1]}, position {mine[2] + 1}) starts from {cfg.init_from} (call "
                f"{theirs[0]} {theirs[1]}, position {theirs[2] + 1}), whose final checkpoint exists only in the "
                "call and lane that train it, until the call ends: it must come after it in the same lane"
            )
    if problems:
        raise ValueError("; ".join(problems))


def plan_calls(
    runs: Sequence[RunConfig], machine: Machine | None = None, estimates: dict[str, RunEstimate] | None = None
) -> list[Call]:
    """Group runs into calls: lanes under the budget, one or two lanes per GPU, ``machine.gpus`` GPUs per call.

    The grouping depends only on the runs and the machine, so the same arguments always give the same calls (``call
    N`` on the GPU machine recomputes it). Runs that depend on each other (``init_from``, see
    :func:`dependency_groups`) are placed as one unit, in order, in one lane; every other run is a unit of its own.
    Best-fit decreasing by estimated time alone: a unit goes into the lane it fills most (at the lane's rate: alone or
    shared), else into a new GPU, shared when it fits there (memory and time), alone otherwise. A shared GPU left with
    one lane becomes an alone one. GPUs fill calls in order.

    Args:
        runs: the runs (distinct names). machine: limits and assumptions. estimates: precomputed estimates by name.

    Returns:
        The calls, numbered from 1 (checked by :func:`check_dependencies`).

    Raises:
        ValueError: a run, or a group of dependent runs, whose estimate alone exceeds ``machine.lane_budget_s`` (it
            can never finish in one call); or a dependency the plan cannot satisfy (see :func:`dependency_groups`).
    """
    machine = machine or Machine()
    est = estimates or {cfg.name: estimate(cfg, machine) for cfg in runs}
    budget = machine.lane_budget_s
    units = dependency_groups(runs)
    too_big = [
        f"{' + '.join(unit)} ({sum(est[n].seconds for n in unit):.0f} s)"
        for unit in units
        if sum(est[n].seconds for n in unit) > budget
    ]
    if too_big:
        raise ValueError(f"runs over the {machine.lane_budget_s:.0f} s lane budget: {', '.join(too_big)}")
    share_memory = machine.gpu_memory_gib / 2
    gpus: list[_Gpu] = []
    for unit in sorted(units, key=lambda u: (-sum(est[n].seconds for n in u), u[0])):
        alone = sum(est[n].seconds for n in unit)
        shared = sum(est[n].seconds_shared for n in unit)
        can_share = machine.procs_per_gpu == 2 and max(est[n].memory_gib for n in unit) <= share_memory
        best: tuple[float, Lane] | None = None
        for gpu in gpus:
            if gpu.shared and not can_share:
                continue
            t = shared if gpu.shared else alone
            for lane in gpu.lanes:
                room = machine.lane_budget_s - lane.seconds - t
                if room >= 0 and (best is None or room < best[0]):
                    best = (room, lane)
        if best is not None:
            best[1].runs.extend(unit)
            best[1].seconds += shared if best[1].shared else alone
            continue
        if can_share and shared <= machine.lane_budget_s:
            gpu = _Gpu(True, [Lane(0, 0, True, list(unit), shared), Lane(0, 1, True)])
        else:
            gpu = _Gpu(False, [Lane(0, 0, False, list(unit), alone)])
        gpus.append(gpu)
    for gpu in gpus:
        if gpu.shared and not gpu.lanes[1].runs:
            lane = gpu.lanes[0]
            gpu.shared = False
            gpu.lanes = [Lane(0, 0, False, lane.runs, sum(est[n].seconds for n in lane.runs))]
    calls = []
    for i in range(0, len(gpus), machine.gpus):
        lanes = []
        for g, gpu in enumerate(gpus[i : i + machine.gpus]):
            lanes += [dataclasses.replace(lane, gpu=g) for lane in gpu.lanes]
        calls.append(Call(len(calls) + 1, lanes))
    check_dependencies(calls, runs)
    return calls


def runs_to_skip(call: Call, runs: Sequence[RunConfig], done: Collection[str]) -> set[str]:
    """The runs of a call to leave out because they are complete in the results tree, keeping needed sources.

    A source complete in the results tree (an earlier call's) is trained again when a run of this call that starts
    from it is not complete: its checkpoint did not survive that earlier call.

    Args:
        call: the call. runs: the runs' configurations (at least the call's). done: names complete elsewhere.

    Returns:
        The names to skip.
    """
    by_name = {cfg.name: cfg for cfg in runs}
    skip = {name for name in call.runs if name in done}
    pending = [name for name in call.runs if name not in skip]
    while pending:
        source = by_name[pending.pop()].init_from
        if source is not None and source in skip:
            skip.discard(source)
            pending.append(source)  # its own source, if any, is needed too
    return skip


def call_command(call: Call, *, out: str, archive_dir: str, results: str | None, extra: Sequence[str] = ()) -> str:
    """The shell command of one call on the GPU machine (``python -m examples.reproduce --mid call N ...``).

    Args:
        call: the call. out: where the runs train there (checkpoints stay there). archive_dir: where the archive of
            the logs goes (``$OUT`` on the GPU machine, whose files come back). results: a results tree in the
            working tree whose completed runs the call skips (None: none). extra: further options (``--tflops ...``).

    Returns:
        The command line.
    """
    parts = ["python", "-m", "examples.reproduce", "--mid", "--out", out, "--no-progress", "call", str(call.index)]
    parts += ["--archive", f"{archive_dir}/mid-call{call.index}.tar.gz"]
    if results:
        parts += ["--results", results]
    parts += list(extra)
    # $OUT must reach the shell unquoted to expand; everything else is quoted as needed.
    return " ".join(p if p.startswith("$OUT") else shlex.quote(p) for p in parts)


def format_plan(
    runs: Sequence[RunConfig],
    machine: Machine | None = None,
    *,
    done: Collection[str] = (),
    command: dict[str, str] | None = None,
) -> str:
    """The plan as text: per-run compute and estimates, the calls with their lanes, totals, and the commands.

    Args:
        runs: the runs. machine: limits and assumptions. done: runs already complete (marked, still planned, so call
            numbers never move). command: ``call_command`` keyword arguments ``out``, ``archive_dir``, ``results``
            (default: ``/tmp/reproduce-mid``, ``$OUT``, none).

    Returns:
        The text ``list --mid`` prints.

    Raises:
        ValueError: a run over the lane budget (see :func:`plan_calls`).
    """
    machine = machine or Machine()
    est = {cfg.name: estimate(cfg, machine) for cfg in runs}
    calls = plan_calls(runs, machine, est)
    opts = {"out": "/tmp/reproduce-mid", "archive_dir": "$OUT", "results": None, **(command or {})}
    lines = [
        "Mid-scale plan: every run fits one GPU call (estimates, not measurements; see examples/reproduce/callplan.py)",
        f"  assumed: {machine.tflops:g} TFLOP/s per process alone, {machine.shared_tflops:g} per process with two on a "
        f"GPU, MoBA layers charged {machine.moba_charge:g}x full attention's FLOPs, {machine.startup_s:g} s start-up "
        f"per run, steps no faster than {machine.step_floor_s:g} s",
        f"  limits: {machine.call_limit_s:g} s per call, lanes up to {machine.lane_budget_s:g} s, stop and pack at "
        f"{machine.deadline_s:g} s; {machine.gpus} GPUs of {machine.gpu_memory_gib:g} GiB per call",
        "",
        f"  {'run':<30} {'counted FLOPs':>13} {'eval':>8} {'charged':>9} {'est. s':>7} {'shared s':>8} {'mem GiB':>7}"
        "  call/lane",
    ]
    where = {name: (call.index, lane.tag) for call in calls for lane in call.lanes for name in lane.runs}
    for cfg in runs:
        e = est[cfg.name]
        c, tag = where[cfg.name]
        mark = "  (done)" if cfg.name in done else ""
        lines.append(
            f"  {cfg.name:<30} {e.flops:>13.3e} {e.eval_flops:>8.1e} {e.charged_flops:>9.2e} {e.seconds:>7.0f} "
            f"{e.seconds_shared:>8.0f} {e.memory_gib:>7.1f}  {c}/{tag}{mark}"
        )
    total = sum(e.flops for e in est.values())
    total_eval = sum(e.eval_flops for e in est.values())
    device_s = sum(call.seconds + machine.setup_s for call in calls)
    lines += [
        "",
        f"  {len(runs)} runs, {total:.3e} training FLOPs ({total / 8.64e19:.2e} PFLOP/s-days) + {total_eval:.2e} of "
        f"validation; largest run estimate {max(e.seconds for e in est.values()):.0f} s alone",
        "",
    ]
    for call in calls:
        lines.append(f"  call {call.index}: estimated {call.seconds:.0f} s of runs + {machine.setup_s:g} s setup")
        for lane in call.lanes:
            share = " (shares the GPU)" if lane.shared else ""
            lines.append(f"    {lane.tag}{share}: {', '.join(lane.runs)}  [{lane.seconds:.0f} s]")
        lines.append(f"    $ {call_command(call, **opts)}")
    sessions = math.ceil(len(calls) / 2)
    lines += [
        "",
        f"  {len(calls)} calls, {device_s / 60:.1f} estimated device minutes of commands (plus each session's machine "
        f"start-up); at two calls per 30-minute session: {sessions} sessions",
    ]
    return "\n".join(lines)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process group a lane started (its own session); a group already gone is not an error."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the lane exited between the poll and the signal
        pass


def run_call(
    call: Call,
    out: Path,
    *,
    scale_args: Sequence[str],
    skip: Collection[str] = (),
    deadline_s: float = 540.0,
    poll_s: float = 5.0,
) -> dict[str, Any]:
    """Run one call's lanes side by side, one ``sweep --only`` process per lane, and stop them at the deadline.

    Each lane's process sees only its GPU (``CUDA_VISIBLE_DEVICES``) and writes its console output to
    ``out/calls/call<N>-<lane tag>.log``. At ``deadline_s`` after the start, lanes still running are stopped (their
    process group: SIGTERM, then SIGKILL after 10 s), so that the logs can be packed before the machine's own limit
    ends the command; an unfinished run's log keeps the records it wrote. The summary goes to
    ``out/calls/call<N>.json``.

    Args:
        call: the call. out: the output directory of the sweeps. scale_args: the scale option (``["--mid"]``).
        skip: runs already complete elsewhere (a results tree): left out of their lanes. deadline_s: see above.
        poll_s: how often to check the lanes.

    Returns:
        The summary: per lane its tag, runs, skipped runs, exit status (None when stopped), and seconds; and the
        call's ``seconds`` and ``stopped`` lanes.
    """
    logs_dir = out / "calls"
    logs_dir.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[2]  # the repository root: where ``-m examples.reproduce`` resolves
    start = time.monotonic()
    lanes: list[dict[str, Any]] = []
    procs: list[subprocess.Popen[bytes] | None] = []
    for lane in call.lanes:
        names = [n for n in lane.runs if n not in skip]
        entry: dict[str, Any] = {
            "lane": lane.tag,
            "gpu": lane.gpu,
            "runs": names,
            "skipped": [n for n in lane.runs if n in skip],
            "estimate_s": lane.seconds,
            "returncode": None,
            "seconds": 0.0,
        }
        lanes.append(entry)
        if not names:
            procs.append(None)
            continue
        cmd = [sys.executable, "-m", "examples.reproduce", *scale_args, "--out", str(out), "--no-progress"]
        cmd += ["sweep", "all", "--only", ",".join(names)]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(lane.gpu)}
        with open(logs_dir / f"call{call.index}-{lane.tag}.log", "wb") as console:
            # A new session per lane: stopping it at the deadline stops its compile workers too, and nothing else.
            procs.append(
                subprocess.Popen(
                    cmd, cwd=root, env=env, stdout=console, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        print(f"call {call.index} {lane.tag}: {', '.join(names)}", flush=True)
    stopped: list[str] = []
    finished: dict[int, float] = {}  # lane index -> seconds from the start to its exit
    while True:
        now = time.monotonic() - start
        for i, proc in enumerate(procs):
            if proc is not None and i not in finished and proc.poll() is not None:
                finished[i] = now
        running = [i for i, proc in enumerate(procs) if proc is not None and i not in finished]
        if not running:
            break
        if now > deadline_s:
            live = [(i, proc) for i, proc in enumerate(procs) if proc is not None and i in running]
            for i, proc in live:
                stopped.append(lanes[i]["lane"])
                _signal_group(proc, signal.SIGTERM)
            for i, proc in live:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
                finished[i] = time.monotonic() - start
            break
        time.sleep(poll_s)
    elapsed = time.monotonic() - start
    for i, (entry, proc) in enumerate(zip(lanes, procs)):
        if proc is not None:
            entry["returncode"] = None if entry["lane"] in stopped else proc.returncode
            entry["seconds"] = finished[i]
    summary = {"call": call.index, "seconds": elapsed, "deadline_s": deadline_s, "stopped": stopped, "lanes": lanes}
    write_json(logs_dir / f"call{call.index}.json", summary)
    return summary
