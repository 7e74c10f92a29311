"""Command line: ``python -m examples.reproduce [--smoke] [--out DIR] COMMAND ...`` (run from the repository root).

Commands:

- ``list [EXPERIMENT ...]``: the experiments' runs with model size, context, steps, tokens, epochs of the corpus, and
  planned compute (computed, not measured).
- ``train RUN [--resume] [--stop-after N] [--set KEY=VALUE ...]``: train one run of the registry.
- ``sweep EXPERIMENT ... | all [--resume] [--restart] [--only RUN,...]``: train an experiment's runs in sequence.
  Completed runs with the same configuration are skipped; unfinished ones continue from their checkpoint with
  ``--resume`` (else restart). ``--only`` trains only the named runs of those experiments.
- ``resume-check RUN [--stop-after N]``: train a copy of a completed run, interrupted, then resumed; check that its
  losses equal the uninterrupted run's.
- ``plot``: charts (PNG) and ``results.md`` from the logs.
- ``call N --archive FILE [--results DIR] [--deadline S]``: the GPU machine's call ``N`` of the plan ``list --mid``
  (or ``--large``) prints: its lanes side by side (one ``sweep --only`` process per lane, each on its GPU), stopped at
  a deadline before the machine's limit, then the logs packed into one archive; runs complete in ``DIR`` are skipped.
  Refused when the call's estimate does not fit the deadline.
- ``calls A-B --archive FILE [--results DIR] [--deadline S]``: calls ``A`` to ``B`` one after the other in one
  command, one deadline for all: each call starts only when its estimate fits the time left (the rest are reported
  as not started), then one archive of every started call's logs.
- ``calibrate DIR``: fit the estimate's throughput and start-up to the logs and call summaries of a results tree;
  print the fitted values, the flags that set them, and the residuals per step point, run and lane.
- ``pack FILE``: the logs of ``--out`` (``runs/*/log.json``, ``calls/*``; no checkpoint) into one ``.tar.gz``.
- ``unpack FILE ...``: archives of ``pack`` merged into the results tree ``--out``.
- ``all``: ``sweep all``, then (smoke scale) ``resume-check`` on the hybrid switching run, then ``plot``.

``--smoke`` selects the tiny configurations (default output ``runs/reproduce-smoke``) and, without a command, runs
``all``: the whole pipeline on the CPU in under a minute. ``--quick``, ``--mid`` and ``--large`` select the reduced
GPU scales (``runs/reproduce-quick``, ``runs/reproduce-mid``, ``runs/reproduce-large``; the mid and large scales' runs
each fit one call of the GPU machine). Without any, runs are GPU-sized (default output ``runs/reproduce``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .archive import completed_runs, pack, unpack
from .callplan import (
    LARGE_MACHINE,
    MID_MACHINE,
    Machine,
    call_range,
    format_plan,
    parse_call_range,
    plan_calls,
    run_calls,
)
from .config import RunConfig, apply_overrides
from .experiments import EXPERIMENT_NAMES, Experiment, experiments, runs_by_name
from .jsonio import write_json
from .train import RunError, moba_call_count, planned, read_log, train

__all__ = [
    "LARGE_RESULTS",
    "MID_RESULTS",
    "SMOKE_BANNER",
    "build_parser",
    "list_runs",
    "main",
    "resume_check",
    "run_pipeline",
    "run_plots",
    "scale_machine",
    "sweep",
]

#: Where the mid scale's results tree lives in the repository: ``unpack`` merges each call's archive there, ``call
#: --results`` skips the runs complete there, ``plot`` draws from it.
MID_RESULTS = "benchmarks/results/reproduce-mid"
#: The large scale's results tree, likewise.
LARGE_RESULTS = "benchmarks/results/reproduce-large"

#: Seconds a ``calls`` command keeps after its last call for stopping lanes and packing the logs.
PACK_RESERVE_S = 15.0

#: The plan options (``list``, ``call``, ``calls``) and the :class:`Machine` fields they set; unset options take the
#: scale's machine's values (:func:`scale_machine`), and given ones are repeated on the printed command lines.
_PLAN_FLAGS = {
    "tflops": ("--tflops", float, "charged TFLOP/s of one process alone on a GPU"),
    "shared_tflops": ("--shared-tflops", float, "TFLOP/s per process, two on one GPU"),
    "moba_charge": ("--moba-charge", float, "MoBA attention charged as N x full attention's FLOPs"),
    "gate_charge": ("--gate-charge", float, "the MoBA gate's FLOPs charged N x"),
    "moba_layer_s": ("--moba-layer", float, "fixed seconds per MoBA layer and step"),
    "step_floor_s": ("--step-floor", float, "fixed seconds per step"),
    "startup_s": ("--startup", float, "seconds per run besides its steps"),
    "lane_startup_s": ("--lane-startup", float, "seconds per lane (its process)"),
    "lane_budget_s": ("--lane-budget", float, "most estimated seconds per lane (regroups the plan)"),
    "procs_per_gpu": ("--procs-per-gpu", int, "lanes per GPU, 1 or 2"),
}

SMOKE_BANNER = "CPU smoke test of the pipeline (tiny models, 8 steps): not a result"

_LOSS_KEYS = ("loss", "loss_avg", "val_loss", "val_trailing_loss")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m examples.reproduce``.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="python -m examples.reproduce",
        description="Reproduce the MoBA paper's charts at small scale with moba-compile.",
    )
    _common_options(parser, argparse.SUPPRESS)
    parser.set_defaults(smoke=False, quick=False, mid=False, large=False, out=None, no_progress=False)
    # The same options after the command (python -m examples.reproduce sweep scaling --smoke); SUPPRESS keeps a value
    # given before the command when they are absent after it.
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, parents=[common])

    # The estimate's assumptions (examples/reproduce/callplan.py): the plan of calls that list --mid/--large prints and
    # the one call N runs must be computed with the same values, so both commands take them (default: the scale's).
    plan = argparse.ArgumentParser(add_help=False)
    for key, (flag, kind, text) in _PLAN_FLAGS.items():
        plan.add_argument(flag, dest=key, type=kind, default=None, help=f"{text} (default: the scale's machine)")
    plan.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"results tree of completed runs (mid: {MID_RESULTS}; large: {LARGE_RESULTS})",
    )

    p = sub.add_parser("list", help="show the runs and their planned compute", parents=[common, plan])
    p.add_argument("experiments", nargs="*", metavar="EXPERIMENT", help=f"any of {', '.join(EXPERIMENT_NAMES)}")
    p.add_argument(
        "--calibrate-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="plan with the estimate fitted to this results tree (given plan options still win)",
    )

    p = add("train", "train one run")
    p.add_argument("run", help="run name (see 'list')")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = add("sweep", "train the runs of experiments, in sequence")
    p.add_argument("experiments", nargs="+", choices=[*EXPERIMENT_NAMES, "all"], metavar="EXPERIMENT")
    p.add_argument("--resume", action="store_true", help="continue unfinished runs from their checkpoints")
    p.add_argument("--restart", action="store_true", help="retrain completed runs too")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--only", action="append", default=[], metavar="RUN[,RUN...]", help="train only these runs of the experiments"
    )
    p.add_argument("--results", type=Path, default=None, help="skip the runs complete in this results tree")

    p = sub.add_parser(
        "call", help="one GPU call of the plan: its lanes side by side, then pack", parents=[common, plan]
    )
    p.add_argument("index", type=int, help="the call's number in 'list --mid' or 'list --large'")
    p.add_argument("--archive", type=Path, required=True, help="the .tar.gz to write the call's logs into")
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="stop lanes still running after this many seconds (default: the "
        "scale machine's deadline_s); must cover the call's estimate",
    )

    p = sub.add_parser(
        "calls", help="consecutive GPU calls in one command, one deadline for all, then pack", parents=[common, plan]
    )
    p.add_argument("range", metavar="A-B", help="call numbers of 'list': N or A-B")
    p.add_argument("--archive", type=Path, required=True, help="the .tar.gz to write the calls' logs into")
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds from the start: no call starts unless its estimate fits "
        "before it, and lanes still running then are stopped (default: the scale machine's deadline_s)",
    )

    p = add("calibrate", "fit the time estimate to a results tree's logs; print the values and residuals")
    p.add_argument("results_dir", type=Path, metavar="DIR", help="a results tree (runs/*/log.json, calls/**)")
    p.add_argument(
        "--poll", type=float, default=5.0, help="how coarsely its calls timed their lanes (s; 5 for the mid runs)"
    )

    p = add("pack", "the logs of --out (no checkpoints) into one .tar.gz")
    p.add_argument("archive", type=Path)

    p = add("unpack", "merge archives of 'pack' into the results tree --out")
    p.add_argument("archives", type=Path, nargs="+", metavar="ARCHIVE")

    p = add("resume-check", "interrupt and resume a copy of a completed run; compare the losses")
    p.add_argument("run", help="run name")
    p.add_argument("--stop-after", type=int, default=None, help="interrupt after this many steps (default: half)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    add("plot", "charts and results.md from the logs")

    p = add("all", "sweep every experiment, then plot")
    p.add_argument("--resume", action="store_true", help="continue unfinished runs from their checkpoints")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _common_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--smoke", action="store_true", default=default, help="tiny CPU configurations; without a command, run 'all'"
    )
    parser.add_argument(
        "--quick", action="store_true", default=default, help="reduced GPU configurations: one session's device time"
    )
    parser.add_argument(
        "--mid", action="store_true", default=default, help="GPU configurations whose every run fits one GPU call"
    )
    parser.add_argument(
        "--large", action="store_true", default=default, help="the next scale: larger corpus, three seeds"
    )
    parser.add_argument(
        "--out", type=Path, default=default, help="output directory (runs/reproduce[-smoke|-quick|-mid|-large])"
    )
    parser.add_argument("--no-progress", action="store_true", default=default, help="no tqdm progress bars")


def _select(registry: dict[str, Experiment], names: Sequence[str]) -> list[Experiment]:
    if not names or "all" in names:
        return list(registry.values())
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown experiment(s) {', '.join(unknown)}; known: {', '.join(registry)}")
    return [registry[n] for n in dict.fromkeys(names)]


def _find_run(registry: dict[str, Experiment], name: str) -> RunConfig:
    runs = runs_by_name(list(registry.values()))
    if name not in runs:
        raise SystemExit(f"unknown run {name!r}; known runs: {', '.join(runs)}")
    return runs[name]


def list_runs(selected: Sequence[Experiment], smoke: bool) -> None:
    """Print every selected experiment's runs with size, data and planned compute (computed, not measured).

    The corpus of the runs (each corpus they name, read here: the local one, which may differ from the GPU
    machine's) is printed first, with its size; every run's ``epochs`` column is its tokens over that corpus's
    training bytes.

    Args:
        selected: the experiments. smoke: whether these are the smoke configurations (for the heading).
    """
    from .corpus import load_corpus
    from .flops import to_pflop_s_days
    from .plots import describe_attention

    kinds = list(dict.fromkeys(er.run.corpus for exp in selected for er in exp.runs)) or ["stdlib"]
    corpora = {kind: load_corpus(kind=kind) for kind in kinds}
    for kind, corpus in corpora.items():
        what = f"Python {corpus.python} stdlib" + (" + the installed packages" if kind != "stdlib" else "")
        print(
            f"corpus {kind}: {corpus.files_train} + {corpus.files_val} files, {corpus.train.numel():,} train / "
            f"{corpus.val.numel():,} val bytes ({what}; sha256 {corpus.sha256[:12]})"
        )
    for exp in selected:
        print(f"\n{exp.title}{'  [smoke]' if smoke else ''}\n  paper: {exp.claim}")
        head = (
            f"  {'run':<34} {'model':<13} {'params':>7} {'ctx':>6} {'batch':>5} {'steps':>5} {'tokens':>12} "
            f"{'epochs':>6} {'PFLOP/s-d':>9} {'attn':>5}  attention"
        )
        print(head)
        for er in exp.runs:
            cfg = er.run
            plan = planned(cfg)
            flops = plan["flops"]
            # An evaluate-only run (a converted model, 0 steps) trains nothing: no attention share to print.
            share = f"{flops['attention'] / flops['total']:>5.0%}" if flops["total"] else f"{'-':>5}"
            epochs = plan["tokens"] / corpora[cfg.corpus].train.numel()
            print(
                f"  {cfg.name:<34} {f'{cfg.n_layers}L x {cfg.d_model}':<13} {plan['params_matmul'] / 1e6:>6.2f}M "
                f"{cfg.context:>6} {cfg.batch_size:>5} {cfg.steps:>5} {plan['tokens']:>12,} "
                f"{epochs:>6.2f} {to_pflop_s_days(flops['total']):>9.2e} "
                f"{share}  {describe_attention(cfg.to_dict())}"
            )


def sweep(
    selected: Sequence[Experiment],
    out: Path,
    *,
    resume: bool,
    restart: bool = False,
    overrides: Sequence[str] = (),
    progress: bool = True,
    only: Sequence[str] = (),
    done: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train the distinct runs of the selected experiments, one after the other.

    Args:
        selected: the experiments. out: output directory (runs in ``out/runs/<name>``).
        resume: continue unfinished runs from their checkpoints (else they restart).
        restart: retrain completed runs too. overrides: ``KEY=VALUE`` applied to every run. progress: tqdm bars.
        only: train only these runs (empty: all), in the experiments' order.
        done: logs of runs complete elsewhere (a results tree, :func:`examples.reproduce.archive.completed_runs`):
            skipped like the runs complete in ``out``.

    Returns:
        ``{run name: log}``.

    A run complete only in ``done`` is trained again when a run to train starts from it (``init_from``): its checkpoint
    is not in ``out``.

    Raises:
        RunError: a completed run in ``out`` or ``done`` has another configuration (use ``--restart`` or another
            ``--out``), or a run failed (see :func:`examples.reproduce.train.train`; a run whose ``init_from`` has no
            final checkpoint in ``out``).
        ValueError: a name of ``only`` is not a run of the selected experiments.
    """
    logs = {}
    runs = runs_by_name(list(selected))
    if only:
        unknown = [name for name in only if name not in runs]
        if unknown:
            raise ValueError(f"--only: {', '.join(unknown)} not among the selected experiments' runs")
        runs = {name: cfg for name, cfg in runs.items() if name in set(only)}
    configs = [apply_overrides(cfg, list(overrides)) for cfg in runs.values()]
    existing_logs: dict[str, dict[str, Any] | None] = {}
    from_done: set[str] = set()
    for cfg in configs:
        existing = read_log(out / "runs" / cfg.name)
        if done and cfg.name in done and not (existing is not None and existing.get("completed")):
            existing = done[cfg.name]  # complete in the results tree: a run of an earlier call
            from_done.add(cfg.name)
        existing_logs[cfg.name] = existing
    # A source complete only in the results tree has no checkpoint here (none comes back from a call): when a run that
    # starts from it is still to train, the source trains again first (it comes earlier in the experiments' order).
    pending = [c for c in configs if restart or not (existing_logs[c.name] or {}).get("completed")]
    while pending:
        source = pending.pop().init_from
        if source in from_done:
            from_done.discard(source)
            existing_logs[source] = None
            pending += [c for c in configs if c.name == source]
    for i, cfg in enumerate(configs):
        run_dir = out / "runs" / cfg.name
        existing = existing_logs[cfg.name]
        if existing is not None and existing.get("completed") and not restart:
            if existing["identity"] != cfg.identity():
                raise RunError(
                    f"{cfg.name}: {run_dir} or the results tree holds a completed run with another configuration; "
                    "--restart or --out"
                )
            print(f"[{i + 1}/{len(runs)}] {cfg.name}: done, skipped", flush=True)
            logs[cfg.name] = existing
            continue
        print(f"[{i + 1}/{len(runs)}] {cfg.name}", flush=True)
        logs[cfg.name] = train(cfg, run_dir, resume=resume and not restart, progress=progress)
    return logs


def resume_check(cfg: RunConfig, out: Path, *, stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a copy of ``cfg`` interrupted after ``stop_after`` steps, resume it, and compare with the original run.

    The original must be completed in ``out/runs/<name>`` (it is trained first otherwise). The copy lives in
    ``out/resume-check/<name>``; the result is written to ``out/resume_check.json``.

    Args:
        cfg: the run. out: output directory. stop_after: interruption point (default: half the steps).
        progress: tqdm bars.

    Returns:
        ``{"run", "stopped_at", "checkpoint_step", "uninterrupted", "resumed", "identical"}``; the two loss dicts hold
        the final ``loss``, ``loss_avg``, ``val_loss``, ``val_trailing_loss``; ``identical`` compares them and every
        record's losses exactly.

    Raises:
        RunError: the resumed run differs from the uninterrupted one.
    """
    original = read_log(out / "runs" / cfg.name)
    if original is None or not original.get("completed") or original["identity"] != cfg.identity():
        original = train(cfg, out / "runs" / cfg.name, progress=progress)
    stop = stop_after if stop_after is not None else max(1, cfg.steps // 2)
    copy = dataclasses.replace(cfg, name=f"{cfg.name}--resume-check")
    copy_dir = out / "resume-check" / copy.name
    interrupted = train(copy, copy_dir, stop_after=stop, progress=progress)
    checkpoint_step = torch.load(copy_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["step"]
    resumed = train(copy, copy_dir, resume=True, progress=progress)

    def losses(log: dict[str, Any]) -> dict[str, Any]:
        return {key: log["final"][key] for key in _LOSS_KEYS}

    def records(log: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [(r["step"], *(r[k] for k in _LOSS_KEYS)) for r in log["records"]]

    result = {
        "run": cfg.name,
        "stopped_at": stop,
        "checkpoint_step": checkpoint_step,
        "interrupted_completed": interrupted["completed"],
        "sessions": resumed["sessions"],
        "uninterrupted": losses(original),
        "resumed": losses(resumed),
        "identical": losses(original) == losses(resumed) and records(original) == records(resumed),
    }
    write_json(out / "resume_check.json", result)
    if not result["identical"]:
        raise RunError(f"resume check failed for {cfg.name}: {result}")
    return result


def run_plots(out: Path, selected: Sequence[Experiment], smoke: bool) -> tuple[list[Path], Path]:
    """Draw the charts and write the table.

    Args:
        out: output directory. selected: experiments. smoke: label everything as a smoke test.

    Returns:
        ``(png paths, results.md path)``.
    """
    from .plots import write_plots, write_table

    banner = SMOKE_BANNER if smoke else None
    pngs = write_plots(out, selected, banner=banner)
    table = write_table(out, selected, banner=banner, plots=pngs)
    return pngs, table


def run_pipeline(
    out: Path,
    *,
    smoke: bool,
    resume: bool,
    overrides: Sequence[str],
    progress: bool,
    quick: bool = False,
    mid: bool = False,
    large: bool = False,
) -> dict[str, Any]:
    """``all``: sweep every experiment, check resuming (smoke scale), plot; print and return a summary.

    Args:
        out: output directory. smoke: tiny configurations. resume: continue unfinished runs.
        overrides: ``KEY=VALUE`` for every run. progress: tqdm bars. quick, mid, large: the reduced GPU scales.

    Returns:
        ``{"runs", "moba_calls", "resume_check", "plots", "table", "seconds"}``, also written to ``out/summary.json``.
    """
    start = time.perf_counter()
    calls = moba_call_count()
    registry = experiments(smoke, quick=quick, mid=mid, large=large)
    selected = list(registry.values())
    logs = sweep(selected, out, resume=resume, overrides=overrides, progress=progress)
    check = None
    if smoke:
        switching = next(er.run for er in registry["hybrid"].runs if er.run.switch_to_full_frac)
        check = resume_check(apply_overrides(switching, list(overrides)), out, progress=progress)
        print(f"resume check ({check['run']}, stopped at step {check['stopped_at']}): identical={check['identical']}")
    pngs, table = run_plots(out, selected, smoke)
    summary = {
        "smoke": smoke,
        "runs": {name: log["final"] for name, log in logs.items()},
        "moba_calls": moba_call_count() - calls,
        "resume_check": check,
        "plots": [str(p) for p in pngs],
        "table": str(table),
        "seconds": time.perf_counter() - start,
    }
    write_json(out / "summary.json", summary)
    print(f"{len(logs)} runs, {summary['moba_calls']} MoBA op executions; charts in {out / 'plots'}; table {table}")
    print(f"pipeline finished in {summary['seconds']:.1f} s")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m examples.reproduce``.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when a run failed (the message is printed), 2 on usage errors.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command or ("all" if args.smoke else None)
    if command is None:
        parser.print_help()
        return 2
    given = [flag for flag in ("smoke", "quick", "mid", "large") if getattr(args, flag)]
    if len(given) > 1:
        parser.error(f"{' and '.join('--' + flag for flag in given)} pick different scales; give one")
    scale = f"-{given[0]}" if given else ""
    out: Path = args.out or Path("runs") / f"reproduce{scale}"
    if args.smoke:
        # Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine they contend (measured here:
        # 3-5x more wall time per smoke run with 2 threads).
        torch.set_num_threads(1)
    progress = not args.no_progress
    registry = experiments(args.smoke, quick=args.quick, mid=args.mid, large=args.large)
    overrides = list(getattr(args, "overrides", []) or [])
    try:
        if command == "list":
            list_runs(_select(registry, args.experiments), args.smoke)
            if args.mid or args.large:
                runs = list(runs_by_name(list(registry.values())).values())
                results = str(args.results or (MID_RESULTS if args.mid else LARGE_RESULTS))
                done = completed_runs(results)
                machine, extra = _machine(args), _plan_extra(args)
                if args.calibrate_from is not None:
                    from .calibrate import calibrate, machine_flags, rounded

                    # The printed commands carry the fitted values (4 digits): plan with exactly those.
                    fitted = rounded(calibrate(args.calibrate_from, machine).machine)
                    flags = machine_flags(fitted)
                    machine = dataclasses.replace(fitted, **_given(args))
                    given = {_PLAN_FLAGS[key][0] for key in _given(args)}
                    kept = [pair for pair in zip(flags[::2], flags[1::2]) if pair[0] not in given]
                    extra = [*(item for pair in kept for item in pair), *extra]
                print()
                print(
                    format_plan(
                        runs,
                        machine,
                        done=done,
                        command={"results": results, "extra": extra},
                        scale="mid" if args.mid else "large",
                    )
                )
        elif command in ("call", "calls"):
            return _calls(args, registry, out)
        elif command == "calibrate":
            from .calibrate import calibrate, format_calibration

            print(format_calibration(calibrate(args.results_dir, poll_s=args.poll)))
        elif command == "pack":
            members = pack(out, args.archive)
            print(f"{args.archive}: {len(members)} files ({args.archive.stat().st_size:,} bytes) from {out}")
        elif command == "unpack":
            for archive in args.archives:
                actions = unpack(archive, out)
                counts: dict[str, int] = {}
                for action in actions.values():
                    counts[action] = counts.get(action, 0) + 1
                print(f"{archive} -> {out}: " + ", ".join(f"{n} {action}" for action, n in sorted(counts.items())))
        elif command == "train":
            cfg = apply_overrides(_find_run(registry, args.run), overrides)
            log = train(cfg, out / "runs" / cfg.name, resume=args.resume, stop_after=args.stop_after, progress=progress)
            done = log["sessions"][-1]["end_step"] if log["sessions"] else 0
            print(
                f"{cfg.name}: {done}/{cfg.steps} steps, completed={log['completed']}, log in {out / 'runs' / cfg.name}"
            )
        elif command == "sweep":
            sweep(
                _select(registry, args.experiments),
                out,
                resume=args.resume,
                restart=args.restart,
                overrides=overrides,
                progress=progress,
                only=[name for item in args.only for name in item.split(",") if name],
                done=completed_runs(args.results),
            )
        elif command == "resume-check":
            cfg = apply_overrides(_find_run(registry, args.run), overrides)
            result = resume_check(cfg, out, stop_after=args.stop_after, progress=progress)
            print(f"resume check {cfg.name}: identical={result['identical']}")
        elif command == "plot":
            pngs, table = run_plots(out, list(registry.values()), args.smoke)
            print("\n".join(str(p) for p in [*pngs, table]))
        else:
            run_pipeline(
                out,
                smoke=args.smoke,
                resume=getattr(args, "resume", False),
                overrides=overrides,
                progress=progress,
                quick=args.quick,
                mid=args.mid,
                large=args.large,
            )
    except (RunError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def scale_machine(*, mid: bool = False, large: bool = False) -> Machine:
    """The machine a scale's plan is made with: :data:`MID_MACHINE` (the mid plan as it ran), :data:`LARGE_MACHINE`,
    else the default :class:`Machine` (the fit to the mid runs).

    Args:
        mid, large: the scale.

    Returns:
        The machine.
    """
    return MID_MACHINE if mid else LARGE_MACHINE if large else Machine()


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The plan options given on the command line, as :class:`Machine` fields."""
    return {key: getattr(args, key) for key in _PLAN_FLAGS if getattr(args, key, None) is not None}


def _machine(args: argparse.Namespace) -> Machine:
    """The :class:`Machine` of the scale with the given plan options (``--tflops`` ...) and ``--deadline``.

    Raises:
        ValueError: the options make an invalid machine (a deadline at or past the command limit...).
    """
    fields = _given(args)
    if getattr(args, "deadline", None) is not None:
        fields["deadline_s"] = args.deadline
    return dataclasses.replace(scale_machine(mid=args.mid, large=args.large), **fields)


def _plan_extra(args: argparse.Namespace) -> list[str]:
    """The plan options given, to repeat on each printed ``call``/``calls`` command line (same plan there)."""
    extra = []
    for key, value in _given(args).items():
        extra += [_PLAN_FLAGS[key][0], f"{value:g}"]
    return extra


def _calls(args: argparse.Namespace, registry: dict[str, Experiment], out: Path) -> int:
    """``call N`` or ``calls A-B``: run calls of the plan (skipping runs complete in ``--results``), then pack.

    ``call N`` refuses a call whose estimate (its longest lane) exceeds the deadline; ``calls A-B`` runs its calls in
    order and starts each only when its estimate fits the time left before the deadline (keeping
    :data:`PACK_RESERVE_S` for packing), reporting the others as not started. Before the first call, a corpus other
    than the standard library's is read once here (it then comes from the page cache in every lane), and its digest
    compared with the completed runs' in the results tree.

    Returns:
        0 when every call started, every lane finished and exited 0, else 1 (the archive is written either way).

    Raises:
        ValueError: no such call, a deadline the call's estimate does not fit (``call``), a run complete in
            ``--results`` with another configuration, too few GPUs, or nothing to pack.
    """
    runs = runs_by_name(list(registry.values()))
    machine = _machine(args)
    plan = plan_calls(list(runs.values()), machine)
    single = args.command == "call"
    if single and not 1 <= args.index <= len(plan):
        raise ValueError(f"call {args.index}: the plan has calls 1..{len(plan)}")
    indices = [args.index] if single else parse_call_range(args.range, len(plan))
    chosen = [plan[i - 1] for i in indices]
    if single and chosen[0].seconds > machine.deadline_s:
        raise ValueError(
            f"call {args.index}: its longest lane is estimated at {chosen[0].seconds:.0f} s, more than the "
            f"{machine.deadline_s:g} s deadline: a lane could be stopped before its last run ends. Give a later "
            f"--deadline (below the {machine.call_limit_s:g} s command limit), or plan with --lane-budget "
            f"{machine.deadline_s:g} or less (in 'list' and here alike: the calls regroup), or run 'calls', which "
            "starts a call only when its estimate fits the time left"
        )
    done = completed_runs(args.results)
    for call in chosen:
        for name in call.runs:
            if name in done and done[name]["identity"] != runs[name].identity():
                raise ValueError(f"{name}: {args.results} holds a completed run of another configuration")
    needed = max(lane.gpu for call in chosen for lane in call.lanes) + 1
    if torch.cuda.device_count() < needed:
        # Without this check a lane on a missing GPU would train on the CPU (device "auto") for hours.
        raise ValueError(f"{args.command} {indices[0]} needs {needed} GPUs, {torch.cuda.device_count()} visible")
    start = time.monotonic()
    warmed = _warm_corpus([runs[n] for call in chosen for n in call.runs], done)
    summary = run_calls(
        chosen,
        out,
        runs=list(runs.values()),
        done=done,
        scale_args=[f"--{flag}" for flag in ("smoke", "quick", "mid", "large") if getattr(args, flag)],
        deadline_s=machine.deadline_s,
        reserve_s=0.0 if single else PACK_RESERVE_S,
        start=start,
    )
    summary["corpus"] = warmed
    if not single:
        write_json(out / "calls" / f"calls{call_range(chosen)}.json", summary)
    members = pack(out, args.archive, runs=[n for call in chosen for n in call.runs])
    print(f"{args.archive}: {len(members)} files; stopped lanes: {', '.join(summary['stopped']) or 'none'}")
    return 0 if summary["ok"] else 1


def _warm_corpus(configs: Sequence[RunConfig], done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Read each corpus other than the standard library's that ``configs`` use, once, before the lanes start.

    The lanes' processes then read its files from the page cache. A completed run of the results tree trained on
    another digest of that corpus (another machine image) is reported: its results and this call's would not be
    comparable.

    Returns:
        ``{corpus kind: {"seconds", "bytes_train", "sha256", "other_digests"}}`` (empty when every run uses the
        standard library).
    """
    from .corpus import load_corpus

    report: dict[str, Any] = {}
    for kind in dict.fromkeys(cfg.corpus for cfg in configs):
        if kind == "stdlib":
            continue
        t0 = time.monotonic()
        corpus = load_corpus(kind=kind)
        seconds = time.monotonic() - t0
        others = sorted(
            {
                log["corpus"]["sha256"]
                for log in done.values()
                if log["corpus"].get("kind", "stdlib") == kind and log["corpus"]["sha256"] != corpus.sha256
            }
        )
        print(
            f"corpus {kind}: {corpus.train.numel():,} train bytes, sha256 {corpus.sha256[:12]}, read in "
            f"{seconds:.1f} s",
            flush=True,
        )
        if others:
            print(
                f"warning: the results tree holds runs trained on other {kind} corpora "
                f"({', '.join(d[:12] for d in others)}): another machine image; do not compare them with this call's "
                "runs",
                flush=True,
            )
        report[kind] = {
            "seconds": seconds,
            "bytes_train": int(corpus.train.numel()),
            "sha256": corpus.sha256,
            "other_digests": others,
        }
    return report
