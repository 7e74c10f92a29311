"""Fit the time estimate of :mod:`examples.reproduce.callplan` to the runs a results tree holds.

The planner's :class:`~examples.reproduce.callplan.Machine` (``step_model = "sum"``) says a training step alone on a
GPU takes ``step_floor_s + moba_layer_s * (MoBA layers) + (charged FLOPs) / tflops``, where a MoBA layer's attention
is charged ``moba_charge`` times full attention's FLOPs and its gate ``gate_charge`` times its own; that two processes
on one GPU each run ``tflops / shared_tflops`` times slower; that each run adds ``startup_s`` and each lane
``lane_startup_s``. :func:`calibrate` fits these to measurements:

- **Where each run ran.** The calls' summaries (``calls/**/call<N>.json``, as ``unpack`` stores them) give each lane's
  runs, GPU and seconds; the order its process trained them comes from the summary's ``order`` or, for older
  summaries, the lane's console log (:func:`examples.reproduce.callplan.lane_order`; ``sweep`` trains in the
  experiments' order, not the lane's). A run's start in its lane is the sum of the runs before it, with the lane's
  unexplained seconds spread evenly before each run. A stretch of a run is *shared* while another lane of its GPU is
  still running (it ends before that lane, by more than ``poll_s``), *alone* once that lane has ended, else *mixed*
  (left out of the step fit).
- **Steps.** Per run, phase (MoBA or full) and mode (alone or shared), the median seconds per step over the logged
  intervals without a validation (the first interval of a session holds the compilation and is left out). The alone
  medians are fitted by least squares of the relative error; the model is linear in ``(step_floor_s, moba_layer_s,
  1/tflops, moba_charge/tflops, gate_charge/tflops)``; a coefficient that comes out negative is held at 0 and the rest
  refitted. Without MoBA steps, ``moba_layer_s``, ``moba_charge`` and ``gate_charge`` keep the base machine's values.
  The shared medians give the slowdown of sharing (their median ratio to the fitted alone time), so ``shared_tflops =
  tflops / slowdown``; a slowdown of 2 or more means sharing gains nothing, and the fit sets ``procs_per_gpu = 1``.
- **Start-up.** Per run, the first interval's seconds beyond its steps (and its validation, if any) at the run's own
  measured step time: the compilation. Per lane, its seconds beyond its runs' logged wall times, regressed on the
  number of runs: the intercept is ``lane_startup_s`` (process start, imports, corpus), the slope the runs' own
  seconds outside their logs (model, checkpoint); ``startup_s`` is the mean compilation plus that slope.

Residuals: per step point (fitted vs measured step time), per run (the planner's estimate at the fitted machine vs the
run's logged wall time plus its share of the lane's unexplained seconds; a run partly shared is estimated in
proportion), and per lane (its ``lane_startup_s`` plus its runs' estimates vs its measured seconds). Validation passes
are not fitted (the model takes a third of a step per step's worth of sequences); their measured-to-estimated ratio is
reported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .callplan import Machine, estimate, lane_order
from .config import RunConfig
from .train import LOG_NAME

__all__ = [
    "Calibration",
    "Design",
    "LaneTiming",
    "RunTiming",
    "StepPoint",
    "calibrate",
    "design",
    "format_calibration",
    "load_timings",
    "machine_flags",
    "rounded",
]

#: Fields of :class:`~examples.reproduce.callplan.Machine` the fit sets, with their command-line flags.
FITTED = {
    "tflops": "--tflops",
    "shared_tflops": "--shared-tflops",
    "moba_charge": "--moba-charge",
    "gate_charge": "--gate-charge",
    "moba_layer_s": "--moba-layer",
    "step_floor_s": "--step-floor",
    "startup_s": "--startup",
    "lane_startup_s": "--lane-startup",
    "procs_per_gpu": "--procs-per-gpu",
}


@dataclass(frozen=True)
class Interval:
    """The steps between two records of a run's log.

    Attributes:
        steps: optimizer steps in it. seconds: their wall time. phase: the attention phase (``moba`` or ``full``).
        has_eval: it ends with a validation pass. mode: ``alone``, ``shared`` or ``mixed`` (see the module
        docstring). first: the first interval of a session (it holds the compilation).
    """

    steps: int
    seconds: float
    phase: str
    has_eval: bool
    mode: str
    first: bool


@dataclass
class RunTiming:
    """One run's measurements and where it ran.

    Attributes:
        name: the run. config: its configuration (from its log). call, lane: where it ran. start_s: its estimated
        start in the lane (s). wall_s: its logged wall time (the final one, or the last record's when unfinished).
        completed: whether it finished. intervals: its logged intervals. phases: its log's ``phases`` (per phase the
        layer plan and FLOPs per step).
    """

    name: str
    config: RunConfig
    call: int
    lane: str
    start_s: float
    wall_s: float
    completed: bool
    intervals: list[Interval] = field(default_factory=list)
    phases: dict[str, Any] = field(default_factory=dict)

    def shared_fraction(self) -> float:
        """The fraction of its steps run shared (mixed intervals count half)."""
        total = sum(i.steps for i in self.intervals)
        if not total:
            return 0.0
        weight = {"alone": 0.0, "shared": 1.0, "mixed": 0.5}
        return sum(i.steps * weight[i.mode] for i in self.intervals) / total


@dataclass
class LaneTiming:
    """One lane of one call: its GPU, measured seconds, runs in the order trained, and whether it finished cleanly."""

    call: int
    lane: str
    gpu: int
    seconds: float
    runs: list[str]
    clean: bool


@dataclass(frozen=True)
class StepPoint:
    """The median step time of one run's phase in one mode, and the fit's value for it.

    Attributes:
        run, phase, mode: which. steps: the steps measured. measured_s: median seconds per step. fitted_s: the
        fitted model's. design: what the step is made of (:class:`Design`).
    """

    run: str
    phase: str
    mode: str
    steps: int
    measured_s: float
    fitted_s: float
    design: Design


@dataclass
class Calibration:
    """The fit: the machine, its inputs and residuals (see the module docstring).

    Attributes:
        machine: the base machine with the fitted fields replaced. points: the step points. slowdown: the median
        shared-to-alone ratio (None without shared points). compile_s: mean compilation per run. run_gap_s,
        lane_gap_s: the lane regression's slope and intercept. eval_ratio: median measured / estimated validation
        pass (None without one). runs: per run ``(name, mode text, measured s, estimated s)``. lanes: per lane
        ``(call, lane, runs, measured s, estimated s)``.
    """

    machine: Machine
    points: list[StepPoint]
    slowdown: float | None
    compile_s: float
    run_gap_s: float
    lane_gap_s: float
    eval_ratio: float | None
    runs: list[tuple[str, str, float, float]]
    lanes: list[tuple[int, str, int, float, float]]


def _call_summaries(results: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``call<N>.json`` under ``results/calls`` (any depth), once per distinct content, in path order."""
    found, seen = [], set()
    for path in sorted((results / "calls").rglob("call*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        key = json.dumps(data, sort_keys=True)
        if "lanes" in data and key not in seen:
            seen.add(key)
            found.append((path, data))
    return found


def _intervals(log: dict[str, Any], start: float, partner_end: float, poll_s: float) -> list[Interval]:
    """A log's intervals, each classified against the time the other lane of its GPU ended (0: none)."""
    out: list[Interval] = []
    prev_step, prev_wall, prev_phase = 0, 0.0, None
    for rec in log["records"]:
        steps, seconds = rec["step"] - prev_step, rec["wall_s"] - prev_wall
        a, b = start + prev_wall, start + rec["wall_s"]
        mode = "alone" if a >= partner_end else "shared" if b <= partner_end - poll_s else "mixed"
        if steps > 0:
            phase = rec["phase"]
            first = prev_step == 0 or (prev_phase is not None and prev_phase != phase)
            out.append(Interval(steps, seconds, phase, rec["val_loss"] is not None, mode, first))
        prev_step, prev_wall, prev_phase = rec["step"], rec["wall_s"], rec["phase"]
    return out


def load_timings(results: str | Path, *, poll_s: float = 5.0) -> tuple[list[RunTiming], list[LaneTiming]]:
    """Read a results tree's run logs and call summaries into timings (see the module docstring).

    Args:
        results: a results tree (``runs/<name>/log.json``, ``calls/**/call<N>.json`` and the lanes' console logs).
        poll_s: how coarsely the calls measured their lanes' ends (``run_call``'s poll: 5 s for the mid scale's).

    Returns:
        ``(runs, lanes)``: every run that appears in a lane and has a log with records, and every lane.

    Raises:
        ValueError: no call summary, or none of its runs has a log.
    """
    results = Path(results)
    summaries = _call_summaries(results)
    if not summaries:
        raise ValueError(f"{results}: no calls/**/call<N>.json (unpack the calls' archives there)")
    logs: dict[str, dict[str, Any]] = {}
    for path in sorted((results / "runs").glob(f"*/{LOG_NAME}")):
        log = json.loads(path.read_text(encoding="utf-8"))
        if log.get("records"):
            logs[path.parent.name] = log
    runs: list[RunTiming] = []
    lanes: list[LaneTiming] = []
    placed: set[str] = set()
    for path, summary in summaries:
        for entry in summary["lanes"]:
            order = entry.get("order")
            console = path.parent / f"call{summary['call']}-{entry['lane']}.log"
            if order is None and console.is_file():
                order = lane_order(console.read_text(encoding="utf-8", errors="replace"))
            if order is None or sorted(order) != sorted(entry["runs"]):
                order = list(entry["runs"])
            ran = [name for name in order if name in logs and name not in placed]
            if not ran:
                continue
            clean = entry["returncode"] == 0 and all(logs[n].get("completed") for n in ran) and len(ran) == len(order)
            lanes.append(LaneTiming(summary["call"], entry["lane"], entry["gpu"], entry["seconds"], ran, clean))
            partners = [e for e in summary["lanes"] if e is not entry and e["gpu"] == entry["gpu"] and e["runs"]]
            partner_end = max((e["seconds"] for e in partners), default=0.0)
            walls = [_wall(logs[n]) for n in ran]
            gap = max(0.0, entry["seconds"] - sum(walls)) / len(ran)
            t = 0.0
            for name, wall in zip(ran, walls):
                t += gap
                log = logs[name]
                cfg = RunConfig(**log["config"])
                runs.append(
                    RunTiming(
                        name=name,
                        config=cfg,
                        call=summary["call"],
                        lane=entry["lane"],
                        start_s=t,
                        wall_s=wall,
                        completed=bool(log.get("completed")),
                        intervals=_intervals(log, t, partner_end, poll_s),
                        phases=log["phases"],
                    )
                )
                placed.add(name)
                t += wall
    if not runs:
        raise ValueError(f"{results}: no run of the calls' lanes has a log with records under runs/")
    return runs, lanes


def _wall(log: dict[str, Any]) -> float:
    """The run's logged wall time: its final one, or its last record's when unfinished."""
    if log.get("completed") and log.get("final"):
        return float(log["final"]["wall_s"])
    return float(log["records"][-1]["wall_s"])


@dataclass(frozen=True)
class Design:
    """What one training step of a phase is made of, for the step model.

    Attributes:
        moba_layers: MoBA layers. base_flops: FLOPs charged at 1 (matmuls, the dense layers' attention).
        moba_flops: full attention's FLOPs in the MoBA layers (charged ``moba_charge``). gate_flops: the gate's counted
        FLOPs (charged ``gate_charge``).
    """

    moba_layers: int
    base_flops: float
    moba_flops: float
    gate_flops: float

    def charged(self, machine: Machine) -> float:
        """The step's charged FLOPs under ``machine``'s charges."""
        return self.base_flops + machine.moba_charge * self.moba_flops + machine.gate_charge * self.gate_flops

    def step_s(self, machine: Machine, shared: bool = False) -> float:
        """The step's estimated seconds under ``machine``."""
        return machine.step_seconds(self.charged(machine), self.moba_layers, shared=shared)


def design(phases: dict[str, Any], phase: str) -> Design:
    """The :class:`Design` of one step of a phase, from a log's ``phases`` (layer plan and FLOPs per step).

    Args:
        phases: a log's ``phases``. phase: ``moba`` or ``full``.

    Returns:
        The design.
    """
    info = phases[phase]
    f = info["flops_per_step"]
    n_layers = len(info["layers"])
    n_moba = sum(layer["mode"] == "moba" for layer in info["layers"])
    per_layer = f["attention_full_equivalent"] / n_layers
    return Design(n_moba, f["dense"] + per_layer * (n_layers - n_moba), per_layer * n_moba, f["gate"])


def _median_steps(run: RunTiming) -> dict[tuple[str, str], tuple[float, int]]:
    """``{(phase, mode): (median seconds per step, steps)}`` over the run's clean intervals (two at least)."""
    groups: dict[tuple[str, str], list[Interval]] = {}
    for i in run.intervals:
        if not i.first and not i.has_eval and i.mode != "mixed":
            groups.setdefault((i.phase, i.mode), []).append(i)
    return {
        key: (statistics.median(i.seconds / i.steps for i in group), sum(i.steps for i in group))
        for key, group in groups.items()
        if len(group) >= 2
    }


def _least_squares(rows: list[list[float]], ys: list[float], columns: list[int]) -> list[float]:
    """Non-negative least squares of the relative error over ``columns`` (active set: negatives held at 0)."""
    active = list(columns)
    while True:
        a = torch.tensor([[row[c] / y for c in active] for row, y in zip(rows, ys)], dtype=torch.float64)
        # Columns span 1 (seconds) to 1e13 (FLOPs): scale each to unit size, or the solver drops the small ones.
        scale = a.abs().amax(dim=0).clamp_min(1e-300)
        b = torch.ones(len(ys), 1, dtype=torch.float64)
        solution = (torch.linalg.lstsq(a / scale, b, driver="gelsd").solution[:, 0] / scale).tolist()
        negative = [c for c, v in zip(active, solution) if v < 0]
        if not negative:
            coef = [0.0] * len(rows[0])
            for c, v in zip(active, solution):
                coef[c] = v
            return coef
        active = [c for c in active if c != negative[0]]
        if not active:
            raise ValueError("the step times do not determine the model: every coefficient came out negative")


def calibrate(results: str | Path, base: Machine | None = None, *, poll_s: float = 5.0) -> Calibration:
    """Fit the estimate's throughput and start-up to a results tree (see the module docstring).

    Args:
        results: the results tree. base: the machine whose other fields (limits, GPUs) the fitted one keeps, and
            whose MoBA fields are kept without MoBA measurements (default :class:`Machine`). poll_s: see
            :func:`load_timings`.

    Returns:
        The :class:`Calibration` (its ``machine`` has ``step_model = "sum"``).

    Raises:
        ValueError: no usable measurements (see :func:`load_timings`), fewer than two step points measured alone,
            or a fit that leaves the FLOP rate undetermined.
    """
    base = dataclasses.replace(base or Machine(), step_model="sum")
    runs, lanes = load_timings(results, poll_s=poll_s)
    medians = {run.name: _median_steps(run) for run in runs}
    by_name = {run.name: run for run in runs}
    raw: list[tuple[str, str, str, int, float, Design]] = []
    for run in runs:
        for (phase, mode), (seconds, steps) in sorted(medians[run.name].items()):
            raw.append((run.name, phase, mode, steps, seconds, design(run.phases, phase)))
    alone = [p for p in raw if p[2] == "alone"]
    if len(alone) < 2:
        raise ValueError(f"{results}: {len(alone)} step time(s) measured alone; the fit needs two at least")
    # Columns: the floor, MoBA layers, FLOPs at 1, MoBA attention, gate; coefficients floor, moba_layer_s, 1/rate,
    # moba_charge/rate, gate_charge/rate.
    rows = [[1.0, float(d.moba_layers), d.base_flops, d.moba_flops, d.gate_flops] for *_, d in alone]
    ys = [p[4] for p in alone]
    has_moba = any(d.moba_layers for *_, d in alone)
    if has_moba:
        coef = _least_squares(rows, ys, [0, 1, 2, 3, 4])
    else:
        # No MoBA measured: MoBA attention and the gate at the base machine's charges, its layers at its fixed cost.
        rows = [[1.0, 0.0, r[2] + base.moba_charge * r[3] + base.gate_charge * r[4], 0.0, 0.0] for r in rows]
        coef = _least_squares(rows, ys, [0, 2])
    if coef[2] <= 0:
        raise ValueError(f"{results}: the fit leaves the FLOP rate undetermined (step times do not grow with FLOPs)")
    fields: dict[str, float] = {"tflops": 1 / coef[2] / 1e12, "step_floor_s": coef[0]}
    if has_moba:
        fields["moba_layer_s"] = coef[1]
        fields["moba_charge"] = coef[3] / coef[2] if coef[3] > 0 else base.moba_charge
        fields["gate_charge"] = coef[4] / coef[2] if coef[4] > 0 else base.gate_charge
    machine = dataclasses.replace(base, **fields)
    shared = [p for p in raw if p[2] == "shared"]
    slowdown = statistics.median(p[4] / p[5].step_s(machine) for p in shared) if shared else None
    if slowdown is not None:
        # Two processes that each run at half speed or slower get nothing from sharing a GPU: one lane per GPU.
        procs = 1 if slowdown >= 2 else machine.procs_per_gpu
        machine = dataclasses.replace(machine, shared_tflops=machine.tflops / slowdown, procs_per_gpu=procs)
    points = [
        StepPoint(name, phase, mode, steps, seconds, d.step_s(machine, mode == "shared"), d)
        for name, phase, mode, steps, seconds, d in raw
    ]

    # Compilation: the first interval's seconds beyond its steps (at the run's own measured rate) and validation.
    compiles, eval_ratios = [], []
    for run in runs:
        share = run.config.eval_batches * run.config.micro / run.config.batch_size
        for k, i in enumerate(run.intervals):
            d = design(run.phases, i.phase)
            measured = medians[run.name].get((i.phase, i.mode), (None, 0))[0]
            step = measured if measured is not None else d.step_s(machine, i.mode == "shared")
            eval_est = machine.eval_seconds(d.charged(machine), 0.0, d.moba_layers, share, shared=i.mode == "shared")
            if k == 0:
                compiles.append(max(0.0, i.seconds - i.steps * step - (eval_est if i.has_eval else 0.0)))
            elif i.has_eval and not i.first and measured is not None:
                eval_ratios.append((i.seconds - i.steps * measured) / eval_est)
        if not run.intervals and run.completed:  # evaluate only: compilation and one validation pass
            d = design(run.phases, next(iter(run.phases)))
            compiles.append(max(0.0, run.wall_s - machine.eval_seconds(d.charged(machine), 0.0, d.moba_layers, share)))
    compile_s = statistics.fmean(compiles) if compiles else base.startup_s

    # Lanes: seconds beyond their runs' logged wall times = lane_startup + gap * runs.
    clean = [lane for lane in lanes if lane.clean]
    extra = [(len(lane.runs), lane.seconds - sum(by_name[n].wall_s for n in lane.runs)) for lane in clean]
    lane_gap, run_gap = _line(extra) if extra else (base.lane_startup_s, 0.0)
    machine = dataclasses.replace(machine, startup_s=compile_s + run_gap, lane_startup_s=lane_gap)

    def estimated(run: RunTiming) -> float:
        est = estimate(run.config, machine)
        f = run.shared_fraction()
        return est.seconds * (1 - f) + est.seconds_shared * f

    run_rows = []
    for run in runs:
        if not run.completed:
            continue
        f = run.shared_fraction()
        mode = "alone" if f == 0 else "shared" if f == 1 else f"{f:.0%} shared"
        run_rows.append((run.name, mode, run.wall_s + run_gap, estimated(run)))
    lane_rows = [
        (lane.call, lane.lane, len(lane.runs), lane.seconds, lane_gap + sum(estimated(by_name[n]) for n in lane.runs))
        for lane in clean
    ]
    return Calibration(
        machine=machine,
        points=points,
        slowdown=slowdown,
        compile_s=compile_s,
        run_gap_s=run_gap,
        lane_gap_s=lane_gap,
        eval_ratio=statistics.median(eval_ratios) if eval_ratios else None,
        runs=run_rows,
        lanes=lane_rows,
    )


def _line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """``(intercept, slope)`` of ``y = a + b n`` by least squares, both held non-negative (one alone when the other
    would be negative, or when every ``n`` is the same: the mean per lane)."""
    ns, ys = [float(n) for n, _ in points], [y for _, y in points]
    mean_n, mean_y = statistics.fmean(ns), statistics.fmean(ys)
    sxx = sum((n - mean_n) ** 2 for n in ns)
    if sxx == 0:
        return max(0.0, mean_y), 0.0
    b = sum((n - mean_n) * (y - mean_y) for n, y in zip(ns, ys)) / sxx
    a = mean_y - b * mean_n
    if b < 0:
        return max(0.0, mean_y), 0.0
    if a < 0:
        return 0.0, max(0.0, sum(n * y for n, y in zip(ns, ys)) / sum(n * n for n in ns))
    return a, b


def _rms(pairs: Sequence[tuple[float, float]]) -> float:
    """Root mean square of the relative errors ``estimate / measured - 1``."""
    return math.sqrt(statistics.fmean((e / m - 1) ** 2 for m, e in pairs)) if pairs else 0.0


def rounded(machine: Machine) -> Machine:
    """The machine with its fitted fields at the precision :func:`machine_flags` prints (4 significant digits).

    A plan printed from a fit must be the plan its printed command lines recompute on the GPU machine: both use these.

    Args:
        machine: a machine.

    Returns:
        The rounded machine.
    """
    fields = {key: float(f"{getattr(machine, key):.4g}") for key in FITTED if key != "procs_per_gpu"}
    return dataclasses.replace(machine, **fields)


def machine_flags(machine: Machine) -> list[str]:
    """The command-line flags that set a machine's fitted fields (``--tflops 498 ...``), for ``list`` and ``call``.

    Args:
        machine: a machine.

    Returns:
        Flag and value pairs, values to 4 significant digits.
    """
    out = []
    for key, flag in FITTED.items():
        value = getattr(machine, key)
        out += [flag, str(value) if isinstance(value, int) else f"{value:.4g}"]
    return out


def format_calibration(cal: Calibration) -> str:
    """The fit as text: the fitted values, the step points, the runs' and lanes' residuals.

    Args:
        cal: the fit.

    Returns:
        What ``python -m examples.reproduce calibrate DIR`` prints.
    """
    m = cal.machine
    slow = "no shared measurement" if cal.slowdown is None else f"sharing slows each process {cal.slowdown:.2f}x"
    evals = "-" if cal.eval_ratio is None else f"{cal.eval_ratio:.2f}"
    step_rms = _rms([(p.measured_s, p.fitted_s) for p in cal.points])
    run_rms, lane_rms = _rms([(r[2], r[3]) for r in cal.runs]), _rms([(r[3], r[4]) for r in cal.lanes])
    lines = [
        f"fitted ({len(cal.points)} step points, {len(cal.runs)} runs, {len(cal.lanes)} lanes):",
        f"  step alone = {m.step_floor_s:.4f} s + {m.moba_layer_s:.4f} s x MoBA layers + charged FLOPs at "
        f"{m.tflops:.0f} TFLOP/s, MoBA attention charged {m.moba_charge:.2f}x full's",
        f"  shared: {slow} (shared_tflops {m.shared_tflops:.0f}; {m.procs_per_gpu} lane(s) per GPU)",
        f"  start-up: {m.startup_s:.1f} s per run ({cal.compile_s:.1f} s compilation + {cal.run_gap_s:.1f} s outside "
        f"the log), {m.lane_startup_s:.1f} s per lane",
        f"  validation pass: measured / estimated, median {evals} (not fitted)",
        f"  flags: {' '.join(machine_flags(m))}",
        "",
        f"step points (median s per step; rms relative error {step_rms:.1%}):",
        f"  {'run':<30} {'phase':<5} {'mode':<6} {'steps':>5} {'measured':>9} {'fitted':>9} {'resid':>7}",
    ]
    for p in cal.points:
        resid = p.fitted_s / p.measured_s - 1
        lines.append(
            f"  {p.run:<30} {p.phase:<5} {p.mode:<6} {p.steps:>5} {p.measured_s:>9.4f} {p.fitted_s:>9.4f} "
            f"{resid:>+7.1%}"
        )
    lines += [
        "",
        f"runs (s: logged wall + {cal.run_gap_s:.1f} s outside the log, vs the planner's estimate at the fitted "
        f"values; rms {run_rms:.1%}):",
        f"  {'run':<30} {'mode':<12} {'measured':>9} {'estimate':>9} {'resid':>7}",
    ]
    for name, mode, measured, est in cal.runs:
        lines.append(f"  {name:<30} {mode:<12} {measured:>9.1f} {est:>9.1f} {est / measured - 1:>+7.1%}")
    lines += [
        "",
        f"lanes (s, measured vs lane start-up + its runs' estimates; rms {lane_rms:.1%}):",
        f"  {'call':>4} {'lane':<6} {'runs':>4} {'measured':>9} {'estimate':>9} {'resid':>7}",
    ]
    for call, lane, n, measured, est in cal.lanes:
        lines.append(f"  {call:>4} {lane:<6} {n:>4} {measured:>9.1f} {est:>9.1f} {est / measured - 1:>+7.1%}")
    return "\n".join(lines)
