"""Time estimates for runs and their grouping into calls of the GPU machine (the mid and large scales' plans).

The GPU machine this project borrows keeps nothing between calls: one command runs at most 10 minutes, at most 8
files of 16 MiB come back from it, and a session has 30 device minutes. A run that does not finish inside one command
is lost (its checkpoint, with the optimizer, is far over 16 MiB), so every run of these scales must fit one call, and a
call's runs come back as one archive of their logs (:mod:`examples.reproduce.archive`).

**The estimate** of a run's wall time, on one GPU (:class:`Machine`; two step models):

- ``step_model = "sum"`` (the default, fitted to the 45 mid-scale runs on the 2x H200 machine by
  :mod:`examples.reproduce.calibrate`; its numbers and residuals are in docs/reproduction.md): a training step takes
  ``step_floor_s`` (launches, Python, data: eager kernels of small models are launch-bound) plus ``moba_layer_s`` per
  MoBA layer (a fixed cost of its kernels; fitted 0: the gate's charge explains it) plus its *charged* FLOPs at
  ``tflops``; a validation pass over one step's worth of sequences takes a third of that (forward only). Two processes
  on one GPU each run at ``shared_tflops / tflops`` of their speed alone, launches included (measured: about 2.2x
  slower each, as if the GPU time-sliced between them; sharing gains nothing, so ``procs_per_gpu`` is 1).
- ``step_model = "max"`` (the assumption the mid scale was planned with, :data:`MID_MACHINE`, kept so that its call
  numbers still name the runs they ran): a step takes its charged FLOPs at ``tflops`` (``shared_tflops`` with two
  processes on the GPU), but never less than ``step_floor_s``; validation its forward FLOPs at the same rate.

Each run adds ``startup_s`` (model, compilation of its graphs, checkpoint), each lane ``lane_startup_s`` (the process:
Python, torch and the corpus), each call ``setup_s`` (starting it, packing the logs).

*Charged* FLOPs are the repository's count (:mod:`examples.reproduce.flops`) with two changes: a MoBA layer's attention
is charged ``moba_charge`` times the FLOPs **full** attention would cost in that layer, not its attended pairs (its
cost follows the kernels' work more than the pairs it attends; fitted: 1.22), and the gate's counted FLOPs
``gate_charge`` times (its scores and top-k are memory- and launch-bound; fitted: 1696, which is what makes 128 chunks
of 64 cost 0.13 s per step where 16 chunks of 512 cost 0.08).

**Grouping** (:func:`plan_calls`): runs go into *lanes* (the runs one process trains one after the other in a call)
whose estimated total stays under ``lane_budget_s``; a call has ``gpus`` GPUs, each running one lane, or two lanes side
by side when ``procs_per_gpu`` is 2 and both lanes' runs fit in memory (estimated by :func:`memory_gib`, up to half the
GPU each) and their estimate at the shared rate still fits. Best-fit decreasing, largest runs first, so the first call
also measures the largest runs. A run that starts from another run's final checkpoint (``init_from``: the conversion
experiment) is placed with it as one unit, after it in the same lane, since that checkpoint exists only inside the call
that trained the source (:func:`check_dependencies` refuses any other placement). Several calls can run one after the
other in one command (``calls A-B``, :func:`command_groups`): each starts only when its estimate fits the time left
before the command's deadline.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
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
    "LARGE_CORPUS_READ_S",
    "LARGE_MACHINE",
    "MID_MACHINE",
    "STEP_MODELS",
    "Call",
    "Lane",
    "Machine",
    "RunEstimate",
    "call_command",
    "call_range",
    "check_dependencies",
    "command_groups",
    "dependency_groups",
    "estimate",
    "format_plan",
    "lane_order",
    "memory_gib",
    "parse_call_range",
    "plan_calls",
    "run_call",
    "run_calls",
    "runs_to_skip",
]

#: Bytes of saved activations per token, per layer, per unit of model width: a rough upper estimate for training
#: without fusion (the ``aot_eager`` compiler) under bfloat16 autocast, fp32 residual stream and norms; nothing
#: measured yet (the logs' ``max_memory_gib`` will say).
ACTIVATION_BYTES = 100


#: The step models of :class:`Machine` (see the module docstring).
STEP_MODELS = ("sum", "max")


@dataclass(frozen=True)
class Machine:
    """The GPU machine's limits and the throughput model of the estimate (see the module docstring).

    The defaults are the 2x H200 machine's, the throughput fitted to the mid-scale runs made there
    (``python -m examples.reproduce calibrate benchmarks/results/reproduce-mid`` prints the fit and its residuals).

    Attributes:
        call_limit_s: the longest one command may run (the machine stops it then).
        lane_budget_s: the most estimated seconds one process (a lane) may be given in a call.
        deadline_s: when a command stops lanes still running and packs what is there (before ``call_limit_s``); the
            default ``--deadline`` of ``call`` and ``calls``.
        gpus: GPUs per call. gpu_memory_gib: memory of one GPU. procs_per_gpu: at most this many lanes per GPU.
        tflops: charged-FLOP rate of one process alone on a GPU. shared_tflops: per process, two on one GPU.
        moba_charge: a MoBA layer's attention is charged this many times full attention's FLOPs in that layer.
        gate_charge: the MoBA gate's counted FLOPs (a score per query and earlier chunk) are charged this many times
            (the scores and their top-k run far below the matmuls' rate: fine chunks make them costly).
        moba_layer_s: fixed seconds per MoBA layer and training step (``"sum"`` model only).
        startup_s: per run, besides its steps and validations. lane_startup_s: per lane (its process).
        step_floor_s: ``"sum"``: the fixed seconds of every step; ``"max"``: no step is estimated faster.
        setup_s: per call, on top of its longest lane (``"max"`` plans: starting the command and packing the logs).
        command_setup_s: per command of consecutive calls (``calls A-B``): starting it, reading the corpus once,
            packing the logs.
        step_model: ``"sum"`` or ``"max"`` (:data:`STEP_MODELS`).

    Raises:
        ValueError: on construction, for limits out of order (``0 < lane_budget_s < call_limit_s``, ``0 < deadline_s
            < call_limit_s``), no GPU, ``procs_per_gpu`` not 1 or 2, a rate or charge not positive, a negative time,
            or an unknown ``step_model``.
    """

    call_limit_s: float = 600.0
    lane_budget_s: float = 240.0
    deadline_s: float = 540.0
    gpus: int = 2
    gpu_memory_gib: float = 139.0
    procs_per_gpu: int = 1
    tflops: float = 552.2
    shared_tflops: float = 249.5
    moba_charge: float = 1.224
    gate_charge: float = 1696.0
    moba_layer_s: float = 0.0
    startup_s: float = 4.693
    lane_startup_s: float = 11.62
    step_floor_s: float = 0.05021
    setup_s: float = 5.0
    command_setup_s: float = 10.0
    step_model: str = "sum"

    def __post_init__(self) -> None:
        if not 0 < self.lane_budget_s < self.call_limit_s or not 0 < self.deadline_s < self.call_limit_s:
            raise ValueError(
                f"need 0 < lane_budget_s ({self.lane_budget_s:g}) < call_limit_s ({self.call_limit_s:g}) and "
                f"0 < deadline_s ({self.deadline_s:g}) < call_limit_s"
            )
        if self.gpus < 1 or self.procs_per_gpu not in (1, 2):
            raise ValueError("gpus must be >= 1 and procs_per_gpu 1 or 2")
        if min(self.tflops, self.shared_tflops, self.moba_charge, self.gate_charge) <= 0:
            raise ValueError("rates, moba_charge and gate_charge must be positive")
        times = (self.moba_layer_s, self.startup_s, self.lane_startup_s, self.step_floor_s, self.setup_s)
        if min(*times, self.command_setup_s) < 0:
            raise ValueError("times must not be negative")
        if self.step_model not in STEP_MODELS:
            raise ValueError(f"step_model {self.step_model!r}: allowed {', '.join(STEP_MODELS)}")

    def step_seconds(self, charged_flops: float, moba_layers: int, *, shared: bool = False) -> float:
        """Estimated seconds of one training step.

        Args:
            charged_flops: the step's charged FLOPs (MoBA layers at ``moba_charge``). moba_layers: MoBA layers in the
                step's phase. shared: another process trains on the same GPU.

        Returns:
            ``"sum"``: ``(step_floor_s + moba_layer_s * moba_layers + charged / tflops)``, times ``tflops /
            shared_tflops`` when shared; ``"max"``: ``max(step_floor_s, charged / rate)`` at ``tflops`` or
            ``shared_tflops``.
        """
        if self.step_model == "max":
            rate = (self.shared_tflops if shared else self.tflops) * 1e12
            return max(self.step_floor_s, charged_flops / rate)
        alone = self.step_floor_s + self.moba_layer_s * moba_layers + charged_flops / (self.tflops * 1e12)
        return alone * (self.tflops / self.shared_tflops if shared else 1.0)

    def eval_seconds(
        self,
        charged_step_flops: float,
        charged_eval_flops: float,
        moba_layers: int,
        share: float,
        *,
        shared: bool = False,
    ) -> float:
        """Estimated seconds of one validation pass.

        Args:
            charged_step_flops: the charged FLOPs of a training step of the phase. charged_eval_flops: those of the
                pass (forward only). moba_layers: the phase's MoBA layers. share: the pass's sequences over a step's
                (``eval_batches * micro / batch_size``). shared: another process trains on the same GPU.

        Returns:
            ``"sum"``: a third of a step (forward only) times ``share``; ``"max"``: ``charged_eval_flops`` at the
            rate, with no floor (the mid plan's assumption).
        """
        if self.step_model == "max":
            return charged_eval_flops / ((self.shared_tflops if shared else self.tflops) * 1e12)
        return self.step_seconds(charged_step_flops, moba_layers, shared=shared) / 3 * share


#: The assumptions the mid scale was planned and run with (before any measurement): 60 TFLOP/s alone, 35 shared, MoBA
#: charged 2x, 30 s start-up per run, steps no faster than 0.1 s, 420 s lanes, two lanes per GPU when they fit. Kept
#: as they were so that ``list --mid`` and ``call N --mid`` still give the calls that ran (the results' ``calls/``).
MID_MACHINE = Machine(
    lane_budget_s=420.0,
    procs_per_gpu=2,
    tflops=60.0,
    shared_tflops=35.0,
    moba_charge=2.0,
    gate_charge=1.0,
    moba_layer_s=0.0,
    startup_s=30.0,
    lane_startup_s=0.0,
    step_floor_s=0.1,
    setup_s=30.0,
    step_model="max",
)


#: Seconds each lane of the large scale is assumed to spend reading its larger corpus (the stdlib and the installed
#: packages' sources, some 10^8 bytes, from the page cache once ``calls`` has read it before the lanes start): not
#: measured yet; the ``corpus`` entry of a ``calls`` summary records the first read.
LARGE_CORPUS_READ_S = 10.0

#: The large scale's machine: the fitted defaults; lanes of at most 235 s, so that two calls fit one command (each call
#: starts only when its estimate fits the time left: a slow first call moves the second to the next command instead of
#: losing runs to the deadline); commands stopped at 520 s (with packing, inside 9 minutes); 25 s
#: per command (its start, the first read of the corpus, packing) and 5 s per call (starting its lanes).
LARGE_MACHINE = Machine(
    lane_budget_s=235.0,
    deadline_s=520.0,
    lane_startup_s=Machine.lane_startup_s + LARGE_CORPUS_READ_S,
    setup_s=5.0,
    command_setup_s=25.0,
)


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
    """The runs one process trains in sequence in a call, on GPU ``gpu`` (slot 0 or 1 of that GPU).

    ``seconds`` is the lane's estimate: its process's ``lane_startup_s`` plus its runs' estimates.
    """

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


def _phase_cost(
    cfg: RunConfig, params: int, phase: str, charge: float, gate_charge: float
) -> tuple[float, float, int, float, float]:
    """``(charged FLOPs per step, charged and counted FLOPs per validation pass, MoBA layers, validation share)``."""
    plan = layer_plan(cfg, phase)
    f = step_flops(cfg, plan, params)
    per_layer_full = f["attention_full_equivalent"] / len(plan)
    n_moba = sum(layer.mode == "moba" for layer in plan)
    charged_attention = per_layer_full * ((len(plan) - n_moba) + charge * n_moba)
    step = f["dense"] + charged_attention + gate_charge * f["gate"]
    # Validation: the forward pass only (a third of 2 + 4 for the matmuls, of 4D + 8D per attended pair; the gate
    # has no backward anyway), over eval_batches micro-batches instead of a step's batch_size sequences.
    share = cfg.eval_batches * cfg.micro / cfg.batch_size
    charged_eval = ((f["dense"] + charged_attention) / 3 + gate_charge * f["gate"]) * share
    counted_eval = ((f["dense"] + f["attention"]) / 3 + f["gate"]) * share
    return step, charged_eval, n_moba, counted_eval, share


def estimate(cfg: RunConfig, machine: Machine | None = None) -> RunEstimate:
    """Estimate one run's compute, wall time (alone and sharing a GPU) and memory (see the module docstring).

    Args:
        cfg: the run. machine: limits and assumptions (default :class:`Machine`).

    Returns:
        The estimate (``seconds`` include the run's ``startup_s``, not its lane's ``lane_startup_s``).
    """
    machine = machine or Machine()
    plan = planned(cfg)
    params = plan["params_matmul"]
    phases = ["full"] if cfg.attention == "full" else ["moba", "full"]
    costs = {phase: _phase_cost(cfg, params, phase, machine.moba_charge, machine.gate_charge) for phase in phases}
    sw = switch_step(cfg)
    steps = {"full": cfg.steps} if cfg.attention == "full" else {"moba": sw, "full": cfg.steps - sw}
    evals = sorted({*range(cfg.eval_every, cfg.steps + 1, cfg.eval_every), cfg.steps})
    eval_phases = [eval_phase(cfg, done) for done in evals]
    charged = sum(costs[p][0] * n for p, n in steps.items()) + sum(costs[p][1] for p in eval_phases)
    counted_eval = sum(costs[p][3] for p in eval_phases)

    def seconds(shared: bool) -> float:
        train = sum(n * machine.step_seconds(costs[p][0], costs[p][2], shared=shared) for p, n in steps.items())
        valid = sum(machine.eval_seconds(*costs[p][:3], costs[p][4], shared=shared) for p in eval_phases)
        return machine.startup_s + train + valid

    return RunEstimate(
        name=cfg.name,
        flops=float(plan["flops"]["total"]),
        eval_flops=counted_eval,
        charged_flops=charged,
        seconds=seconds(False),
        seconds_shared=seconds(True),
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
    first = machine.lane_startup_s  # every lane starts with its process
    units = dependency_groups(runs)
    too_big = [
        f"{' + '.join(unit)} ({first + sum(est[n].seconds for n in unit):.0f} s with the lane's start-up)"
        for unit in units
        if first + sum(est[n].seconds for n in unit) > budget
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
        if can_share and first + shared <= machine.lane_budget_s:
            gpu = _Gpu(True, [Lane(0, 0, True, list(unit), first + shared), Lane(0, 1, True, [], first)])
        else:
            gpu = _Gpu(False, [Lane(0, 0, False, list(unit), first + alone)])
        gpus.append(gpu)
    for gpu in gpus:
        if gpu.shared and not gpu.lanes[1].runs:
            lane = gpu.lanes[0]
            gpu.shared = False
            gpu.lanes = [Lane(0, 0, False, lane.runs, first + sum(est[n].seconds for n in lane.runs))]
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


def command_groups(calls: Sequence[Call], machine: Machine | None = None) -> list[list[Call]]:
    """Consecutive calls grouped into commands of the GPU machine (``calls A-B``), each within the deadline.

    A command takes calls in order while ``command_setup_s`` plus their estimates (each call's longest lane plus
    ``setup_s``) stay within ``machine.deadline_s``; a call alone over it still gets a command of its own (``calls``
    then reports it as not started).

    Args:
        calls: the plan's calls, in order. machine: limits and assumptions.

    Returns:
        The groups, in order; every call in exactly one.
    """
    machine = machine or Machine()
    groups: list[list[Call]] = []
    used = 0.0
    for call in calls:
        need = call.seconds + machine.setup_s
        if groups and used + need <= machine.deadline_s:
            groups[-1].append(call)
            used += need
        else:
            groups.append([call])
            used = machine.command_setup_s + need
    return groups


def call_range(calls: Sequence[Call]) -> str:
    """The ``calls`` argument naming consecutive calls: ``"3"`` or ``"1-2"``.

    Args:
        calls: consecutive calls (at least one).

    Returns:
        The range text.
    """
    first, last = calls[0].index, calls[-1].index
    return str(first) if first == last else f"{first}-{last}"


def parse_call_range(text: str, count: int) -> list[int]:
    """The call numbers of ``calls A-B`` (or ``calls N``), checked against the plan's ``count`` calls.

    Args:
        text: ``"N"`` or ``"A-B"`` with ``A <= B``. count: calls in the plan.

    Returns:
        ``[A, ..., B]``.

    Raises:
        ValueError: malformed, empty, or outside ``1..count``.
    """
    first, sep, last = text.partition("-")
    try:
        a, b = int(first), int(last) if sep else int(first)
    except ValueError:
        raise ValueError(f"calls {text!r}: expected N or A-B (call numbers of 'list')") from None
    if not 1 <= a <= b <= count:
        raise ValueError(f"calls {text}: the plan has calls 1..{count}, and A-B needs A <= B")
    return list(range(a, b + 1))


def call_command(
    call: Call | Sequence[Call],
    *,
    out: str,
    archive_dir: str,
    results: str | None,
    extra: Sequence[str] = (),
    scale: str = "mid",
) -> str:
    """The shell command of one call (``call N``), or of consecutive calls in one command (``calls A-B``).

    Args:
        call: the call, or consecutive calls (a list: ``calls A-B``, one deadline for all). out: where the runs
            train there (checkpoints stay there). archive_dir: where the archive of the logs goes (``$OUT`` on the GPU
            machine, whose files come back). results: a results tree in the working tree whose completed runs the call
            skips (None: none). extra: further options (``--tflops ...``). scale: the scale flag's name (``mid``,
            ``large``).

    Returns:
        The command line.
    """
    parts = ["python", "-m", "examples.reproduce", f"--{scale}", "--out", out, "--no-progress"]
    if isinstance(call, Call):
        parts += ["call", str(call.index), "--archive", f"{archive_dir}/{scale}-call{call.index}.tar.gz"]
    else:
        span = call_range(call)
        parts += ["calls", span, "--archive", f"{archive_dir}/{scale}-calls{span}.tar.gz"]
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
    command: dict[str, Any] | None = None,
    scale: str = "mid",
) -> str:
    """The plan as text: per-run compute and estimates, the calls with their lanes, totals, and the commands.

    Args:
        runs: the runs. machine: limits and assumptions. done: runs already complete (marked, still planned, so call
            numbers never move). command: ``call_command`` keyword arguments ``out``, ``archive_dir``, ``results``,
            ``extra`` (default: ``/tmp/reproduce-<scale>``, ``$OUT``, none, none). scale: ``mid`` (one command per
            call, as that plan ran) or ``large`` (``calls A-B``: consecutive calls per command, :func:`command_groups`).

    Returns:
        The text ``list --mid`` or ``list --large`` prints.

    Raises:
        ValueError: a run over the lane budget (see :func:`plan_calls`).
    """
    machine = machine or Machine()
    est = {cfg.name: estimate(cfg, machine) for cfg in runs}
    calls = plan_calls(runs, machine, est)
    opts = {"out": f"/tmp/reproduce-{scale}", "archive_dir": "$OUT", "results": None, **(command or {})}
    if machine.step_model == "max":
        assumed = (
            f"  assumed: {machine.tflops:g} TFLOP/s per process alone, {machine.shared_tflops:g} per process with two "
            f"on a GPU, MoBA layers charged {machine.moba_charge:g}x full attention's FLOPs, {machine.startup_s:g} s "
            f"start-up per run, steps no faster than {machine.step_floor_s:g} s"
        )
    else:
        assumed = (
            f"  model: a step takes {machine.step_floor_s:g} s + {machine.moba_layer_s:g} s per MoBA layer + its "
            f"charged FLOPs at {machine.tflops:g} TFLOP/s (MoBA attention charged {machine.moba_charge:g}x full's); "
            f"two processes on a GPU run at {machine.shared_tflops:g}/{machine.tflops:g} of that speed each; "
            f"{machine.startup_s:g} s per run, {machine.lane_startup_s:g} s per lane"
        )
    lines = [
        f"{scale.capitalize()}-scale plan: every run fits one GPU call (estimates; see examples/reproduce/callplan.py)",
        assumed,
        f"  limits: {machine.call_limit_s:g} s per command, lanes up to {machine.lane_budget_s:g} s, stop and pack at "
        f"{machine.deadline_s:g} s; {machine.gpus} GPUs of {machine.gpu_memory_gib:g} GiB per call, "
        f"{machine.procs_per_gpu} lane(s) per GPU",
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
    groups = [[call] for call in calls] if scale == "mid" else command_groups(calls, machine)
    for group in groups:
        for call in group:
            lines.append(f"  call {call.index}: estimated {call.seconds:.0f} s of runs + {machine.setup_s:g} s setup")
            for lane in call.lanes:
                share = " (shares the GPU)" if lane.shared else ""
                lines.append(f"    {lane.tag}{share}: {', '.join(lane.runs)}  [{lane.seconds:.0f} s]")
        if scale == "mid":
            lines.append(f"    $ {call_command(group[0], scale=scale, **opts)}")
        else:
            span = machine.command_setup_s + sum(call.seconds + machine.setup_s for call in group)
            lines.append(f"  command: calls {call_range(group)}, estimated {span:.0f} s")
            lines.append(f"    $ {call_command(group, scale=scale, **opts)}")
    if scale == "mid":
        sessions = math.ceil(len(calls) / 2)
        lines += [
            "",
            f"  {len(calls)} calls, {device_s / 60:.1f} estimated device minutes of commands (plus each session's "
            f"machine start-up); at two calls per 30-minute session: {sessions} sessions",
        ]
    else:
        device_s += machine.command_setup_s * len(groups)
        lines += [
            "",
            f"  {len(calls)} calls in {len(groups)} commands, {device_s / 60:.1f} estimated device minutes of commands "
            "(plus the session's machine start-up)",
        ]
    return "\n".join(lines)


#: A run's start line in a sweep's console output: ``[3/9] full-8k-m2`` (``... : done, skipped`` when it was not run).
_RUN_LINE = re.compile(r"^\[\d+/\d+\] (\S+?)(: done, skipped)?$", re.MULTILINE)


def lane_order(console: str) -> list[str]:
    """The runs a lane's process trained, in the order it trained them, from its console output.

    ``sweep --only`` trains in the experiments' order, which need not be the order of the lane's list; the start
    times of the runs (for :mod:`examples.reproduce.calibrate`) follow from this order and their logs' wall times.

    Args:
        console: the lane's console log (``calls/call<N>-<lane>.log``).

    Returns:
        The names of the runs started (runs skipped as done are left out).
    """
    return [m.group(1) for m in _RUN_LINE.finditer(console) if not m.group(2)]


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
    poll_s: float = 1.0,
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
        The summary: per lane its tag, runs, skipped runs, exit status (None when stopped), seconds, and ``order``
        (the runs in the order its process started them, :func:`lane_order`); and the call's ``seconds`` and
        ``stopped`` lanes.
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
            console = logs_dir / f"call{call.index}-{entry['lane']}.log"
            entry["order"] = lane_order(console.read_text(encoding="utf-8", errors="replace"))
    summary = {"call": call.index, "seconds": elapsed, "deadline_s": deadline_s, "stopped": stopped, "lanes": lanes}
    write_json(logs_dir / f"call{call.index}.json", summary)
    return summary


def run_calls(
    calls: Sequence[Call],
    out: Path,
    *,
    runs: Sequence[RunConfig],
    done: dict[str, dict[str, Any]],
    scale_args: Sequence[str],
    deadline_s: float,
    reserve_s: float = 0.0,
    start: float | None = None,
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """Run calls one after the other in one command, one deadline for all (``calls A-B``; ``call N`` is one call).

    Before each call the time left is ``deadline_s`` minus the time since ``start`` minus ``reserve_s`` (kept for
    stopping lanes and packing); a call whose estimate (its longest lane) exceeds it is not started, and the next
    calls are still tried (a smaller one may fit). A started call gets the time left as its deadline
    (:func:`run_call`). Runs complete in ``done`` are skipped (:func:`runs_to_skip`).

    Args:
        calls: the calls, in order. out: the output directory. runs: the plan's configurations. done: logs of runs
            complete in the results tree. scale_args: the scale option. deadline_s: seconds from ``start``.
        reserve_s: see above. start: ``time.monotonic()`` when the command started (default: now). poll_s: how
            often each call checks its lanes.

    Returns:
        ``{"calls", "deadline_s", "started", "not_started", "stopped", "ok", "seconds"}``: the call numbers asked
        for, those started, per call not started its estimate and the time that was left, the lanes stopped at
        their deadline (``"call N gpu0"``), whether every call started and every lane exited 0, and the seconds
        since ``start``.
    """
    start = time.monotonic() if start is None else start
    summary: dict[str, Any] = {
        "calls": [call.index for call in calls],
        "deadline_s": deadline_s,
        "started": [],
        "not_started": [],
        "stopped": [],
        "ok": True,
    }
    for call in calls:
        left = deadline_s - (time.monotonic() - start) - reserve_s
        if call.seconds > left:
            print(f"call {call.index}: not started, estimated {call.seconds:.0f} s, {left:.0f} s left", flush=True)
            summary["not_started"].append({"call": call.index, "estimate_s": call.seconds, "left_s": left})
            summary["ok"] = False
            continue
        # Complete runs are skipped, except a source whose converted runs still need its checkpoint in this call.
        skip = runs_to_skip(call, runs, done)
        result = run_call(call, out, scale_args=scale_args, skip=skip, deadline_s=left, poll_s=poll_s)
        summary["started"].append(call.index)
        summary["stopped"] += [f"call {call.index} {lane}" for lane in result["stopped"]]
        if result["stopped"] or any(lane["returncode"] not in (0, None) for lane in result["lanes"]):
            summary["ok"] = False
    summary["seconds"] = time.monotonic() - start
    return summary
