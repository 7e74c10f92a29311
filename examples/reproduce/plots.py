"""Charts (PNG) and a markdown table from the runs' JSON logs.

One chart per experiment, in ``<out>/plots/<experiment>.png``:

- ``scaling`` and ``trailing``: the experiment's metric against training compute (PFLOP/s-days), log-log as in the
  paper; every run's validation curve (thin), its final point (marker, joined per series), and a power-law fit
  ``L = a * C^b`` per series when it has at least three sizes;
- ``granularity``: final validation and trailing validation loss against the number of blocks (log-2 axis, labels
  ``top-k/blocks``), full attention as a dashed line;
- ``hybrid``: trailing validation loss against training tokens (log-log) per run, and the final values side by side.
- ``conversion``: final validation and trailing validation loss of the converted runs against the fraction of blocks
  MoBA skips at the last position, as converted (0 steps) and after continued training, the dense source (dashed) and
  the dense model continued as long (dotted) as lines.

``<out>/results.md`` holds one table per experiment: configuration, compute, final losses, the difference to the
matching full-attention run, wall time and device (for ``conversion``: sparsity, steps, losses and their differences
to the dense source and to the dense model continued as long). Runs without a log or not finished are listed as such.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .experiments import Experiment, ExperimentRun
from .train import read_log

__all__ = ["describe_attention", "load_logs", "plot_experiment", "write_plots", "write_table"]

_METRIC_LABELS = {
    "val_loss": "validation LM loss (nats/byte)",
    "val_trailing_loss": "trailing validation LM loss, last 1/16 (nats/byte)",
}


# Configuration fields the results table prints, read from each run's log rather than the registry.
_TABLE_FIELDS = (
    "n_layers",
    "d_model",
    "n_heads",
    "context",
    "steps",
    "chunk_size",
    "topk",
    "dense_last",
    "switch_to_full_frac",
)


def load_logs(out_dir: str | os.PathLike[str], experiments: Sequence[Experiment]) -> dict[str, dict[str, Any]]:
    """The logs of the experiments' runs that exist under ``<out_dir>/runs/``.

    Args:
        out_dir: the output directory of the sweeps. experiments: whose runs to load.

    Returns:
        ``{run name: log}``; runs without a log are absent.
    """
    logs: dict[str, dict[str, Any]] = {}
    for exp in experiments:
        for er in exp.runs:
            if er.run.name not in logs:
                log = read_log(Path(out_dir) / "runs" / er.run.name)
                if log is not None:
                    logs[er.run.name] = log
    return logs


def describe_attention(config: dict[str, Any]) -> str:
    """A short description of a run's attention from its logged config, e.g. ``"MoBA C=512 k=3, last 1 dense"``.

    Args:
        config: the ``config`` of a run log.

    Returns:
        The description.
    """
    if config["attention"] == "full":
        return "full" + (" (torch.compile)" if config["full_backend"] == "torch" else "") + _converted(config)
    if config["policy"] is not None:
        text = f"MoBA policy {config['policy'] if isinstance(config['policy'], str) else 'dict'}"
    else:
        text = f"MoBA C={config['chunk_size']} k={config['topk']}"
        if config["dense_last"]:
            text += f", last {config['dense_last']} dense"
    if config["switch_to_full_frac"]:
        text += f", full last {round(config['switch_to_full_frac'] * 100)}%"
    return text + _converted(config)


def _converted(config: dict[str, Any]) -> str:
    """``", from <run>"`` for a run that starts from another run's weights (logs older than the field lack it)."""
    source = config.get("init_from")
    return f", from {source}" if source else ""


def _eval_points(log: dict[str, Any], metric: str, x_key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in log["records"]:
        value = rec.get(metric)
        if value is not None:
            xs.append(rec["pflop_s_days"] if x_key == "compute" else float(rec["tokens"]))
            ys.append(value)
    return xs, ys


def _final(log: dict[str, Any] | None, metric: str) -> float | None:
    if log is None or not log.get("completed") or not log.get("final"):
        return None
    return log["final"].get(metric)


def _series(exp: Experiment) -> list[str]:
    order: list[str] = []
    for er in exp.runs:
        if er.series not in order:
            order.append(er.series)
    return order


def _fit_power_law(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """Least squares of ``log y = log a + b log x``; None without three positive, distinct points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 3 or len({p[0] for p in pts}) < 3:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return math.exp(my - b * mx), b


def _seed_groups(exp: Experiment, series: str, logs: dict[str, dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``{label: [(compute, final metric) per completed seed]}`` of one series (runs differing only by seed)."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for er in (r for r in exp.runs if r.series == series):
        final = _final(logs.get(er.run.name), exp.metric)
        if final is not None:
            groups.setdefault(er.label, []).append((logs[er.run.name]["final"]["pflop_s_days"], final))
    return groups


def _plot_compute(ax: Any, exp: Experiment, logs: dict[str, dict[str, Any]]) -> None:
    colors = _colors(_series(exp))
    for series in _series(exp):
        for er in (r for r in exp.runs if r.series == series):
            log = logs.get(er.run.name)
            if log is None:
                continue
            xs, ys = _eval_points(log, exp.metric, "compute")
            if xs:
                ax.plot(xs, ys, color=colors[series], alpha=0.35, linewidth=1)
        # One point per size: the mean over its seeds, the error bar their range (none with one seed).
        finals: list[tuple[float, float, str]] = []
        spreads: list[float] = []
        for label, points in sorted(_seed_groups(exp, series, logs).items(), key=lambda kv: min(kv[1])):
            ys = [p[1] for p in points]
            finals.append((sum(p[0] for p in points) / len(points), sum(ys) / len(ys), label))
            spreads.append((max(ys) - min(ys)) / 2)
        if finals:
            ax.errorbar(
                [f[0] for f in finals],
                [f[1] for f in finals],
                yerr=spreads if any(spreads) else None,
                fmt="o-",
                capsize=3,
                color=colors[series],
                label=series,
            )
            for x, y, label in finals:
                ax.annotate(label.split(" ")[0], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        fit = _fit_power_law([f[0] for f in finals], [f[1] for f in finals])
        if fit is not None:
            a, b = fit
            lo, hi = finals[0][0], finals[-1][0]
            grid = [lo * (hi / lo) ** (i / 40) for i in range(41)]
            ax.plot(
                grid, [a * g**b for g in grid], "--", color=colors[series], linewidth=1, label=f"fit: {a:.3g} C^{b:.3f}"
            )
    ax.set_xscale("log")
    _compute_x_ticks(ax)
    _log_y(ax)
    ax.set_xlabel("training compute (PFLOP/s-days)")
    ax.set_ylabel(_METRIC_LABELS[exp.metric])


def _plot_granularity(axes: Sequence[Any], exp: Experiment, logs: dict[str, dict[str, Any]]) -> None:
    # Several seeds of a setting (the large scale's coarsest and finest, and its full run) are drawn as their mean
    # with their range as an error bar; full attention as a line at its mean.
    for ax, metric in zip(axes, ("val_loss", "val_trailing_loss")):
        by_label: dict[str, tuple[float | None, list[float]]] = {}
        for er in exp.runs:
            final = _final(logs.get(er.run.name), metric)
            if final is not None:
                by_label.setdefault(er.label, (er.x, []))[1].append(final)
        points = []
        for label, (x, values) in by_label.items():
            mean = sum(values) / len(values)
            if x is None:
                ax.axhline(mean, linestyle="--", color="black", linewidth=1, label=exp.runs[0].series)
            else:
                points.append((x, mean, label, (max(values) - min(values)) / 2))
        points.sort()
        ax.set_xscale("log", base=2)
        if points:
            spreads = [p[3] for p in points]
            ax.errorbar(
                [p[0] for p in points],
                [p[1] for p in points],
                yerr=spreads if any(spreads) else None,
                fmt="o-",
                capsize=3,
                color="tab:blue",
                label=exp.runs[-1].series,
            )
            ax.set_xticks([p[0] for p in points], [p[2] for p in points])
        ax.minorticks_off()
        ax.set_xlabel("MoBA top-k / number of blocks")
        ax.set_ylabel(_METRIC_LABELS[metric])


def _plot_hybrid(axes: Sequence[Any], exp: Experiment, logs: dict[str, dict[str, Any]]) -> None:
    curve_ax, bar_ax = axes
    colors = _colors([er.label for er in exp.runs])
    labels, values = [], []
    for er in exp.runs:
        log = logs.get(er.run.name)
        if log is None:
            continue
        xs, ys = _eval_points(log, exp.metric, "tokens")
        if xs:
            curve_ax.plot(xs, ys, "o-", markersize=3, color=colors[er.label], label=er.series)
        final = _final(log, exp.metric)
        if final is not None:
            labels.append(er.label)
            values.append(final)
    curve_ax.set_xscale("log")
    _log_y(curve_ax)
    curve_ax.set_xlabel("training tokens")
    curve_ax.set_ylabel(_METRIC_LABELS[exp.metric])
    if values:
        bar_ax.barh(range(len(values)), values, color=[colors[lab] for lab in labels])
        bar_ax.set_yticks(range(len(values)), labels)
        lo, hi = min(values), max(values)
        pad = max(hi - lo, 1e-3 * hi)
        bar_ax.set_xlim(lo - pad, hi + pad)
        for i, v in enumerate(values):
            bar_ax.annotate(f"{v:.4f}", (v, i), textcoords="offset points", xytext=(3, -3), fontsize=7)
    bar_ax.set_xlabel(f"final {_METRIC_LABELS[exp.metric]}")


def _conversion_role(er: ExperimentRun) -> str:
    """``"source"`` (the trained run), ``"dense0"``, ``"dense"`` (continued), ``"moba0"`` or ``"moba"`` (continued)."""
    cfg = er.run
    if cfg.init_from is None:
        return "source"
    return ("moba" if cfg.attention == "moba" else "dense") + ("0" if cfg.steps == 0 else "")


def _plot_conversion(axes: Sequence[Any], exp: Experiment, logs: dict[str, dict[str, Any]]) -> None:
    for ax, metric in zip(axes, ("val_loss", "val_trailing_loss")):
        series: dict[str, list[tuple[float, float, str]]] = {}
        for er in exp.runs:
            final = _final(logs.get(er.run.name), metric)
            role = _conversion_role(er)
            if final is None or role == "source":  # the source's own value is the 0-step dense run's
                continue
            if role.startswith("dense"):
                style = "--" if role == "dense0" else ":"
                ax.axhline(final, linestyle=style, color="black", linewidth=1, label=er.series)
            else:
                series.setdefault(er.series, []).append((er.x or 0.0, final, er.label))
        colors = _colors(list(series))
        for name, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=colors[name], label=name)
            for x, y, label in points:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("fraction of blocks MoBA skips at the last position")
        ax.set_ylabel(_METRIC_LABELS[metric])


def _compute_x_ticks(ax: Any) -> None:
    """Decade labels only on the log compute axis: minor labels (2x10^-6 ...) overlap when runs span 1-2 decades."""
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())


def _log_y(ax: Any) -> None:
    """Log-scale y axis labelled with plain numbers (losses span well under a decade)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _pos: f"{value:.3g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def _colors(keys: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {key: cmap(i % 10) for i, key in enumerate(dict.fromkeys(keys))}


def plot_experiment(exp: Experiment, logs: dict[str, dict[str, Any]], path: Path, *, banner: str | None) -> Path:
    """Draw one experiment's chart into ``path`` (PNG).

    Args:
        exp: the experiment. logs: run logs by name (missing runs are left out of the chart).
        path: the PNG file. banner: a line printed at the top of the figure (e.g. "CPU smoke test, not a result").

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if exp.name in ("scaling", "trailing"):
        fig, ax = plt.subplots(figsize=(7, 5))
        _plot_compute(ax, exp, logs)
        axes = [ax]
    elif exp.name == "granularity":
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        _plot_granularity(axes, exp, logs)
    elif exp.name == "conversion":
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        _plot_conversion(axes, exp, logs)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
        _plot_hybrid(axes, exp, logs)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8)
    fig.suptitle(exp.title + (f"\n{banner}" if banner else ""), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(
    out_dir: str | os.PathLike[str], experiments: Sequence[Experiment], *, banner: str | None = None
) -> list[Path]:
    """Draw every experiment's chart into ``<out_dir>/plots/<name>.png``.

    Args:
        out_dir: the sweeps' output directory. experiments: which. banner: see :func:`plot_experiment`.

    Returns:
        The PNG paths.

    Raises:
        ImportError: matplotlib is not installed.
    """
    logs = load_logs(out_dir, experiments)
    return [plot_experiment(e, logs, Path(out_dir) / "plots" / f"{e.name}.png", banner=banner) for e in experiments]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _reference(exp: Experiment, er: ExperimentRun) -> ExperimentRun | None:
    """The full-attention run a run is compared with: same size label (scaling, trailing) or the experiment's one."""
    fulls = [r for r in exp.runs if r.run.attention == "full"]
    if er.run.attention == "full":
        return None
    same = [r for r in fulls if r.label == er.label]
    same_seed = [r for r in same if r.run.seed == er.run.seed]
    if same_seed or same:
        return (same_seed or same)[0]
    if len(fulls) == 1:
        return fulls[0]
    # One full run per seed (the large scale's granularity experiment): the one of the run's seed.
    return next((r for r in fulls if r.run.seed == er.run.seed), None)


def _seed_table(exp: Experiment, logs: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines comparing MoBA with full attention over seeds, where some size has two or more seeds done.

    Per size: the mean Δ (MoBA - full) over the seeds both have, the seed spread (the largest range of either method's
    final metric over its seeds), and whether |mean Δ| is at least 3x that spread (the issue's rule for when a
    difference is resolved). Nothing when no size has a second seed.
    """
    series = _series(exp)
    if len(series) < 2 or exp.name not in ("scaling", "trailing"):
        return []
    by_series = {name: _seed_groups(exp, name, logs) for name in series}
    full_name = next((name for name in series if name.startswith("Full")), series[0])
    rows = []
    for moba_name in (name for name in series if name != full_name):
        for label, moba_points in by_series[moba_name].items():
            full_points = by_series[full_name].get(label, [])
            if len(moba_points) < 2 or len(full_points) < 2:
                continue
            fulls = [p[1] for p in full_points]
            mobas = [p[1] for p in moba_points]
            delta = sum(mobas) / len(mobas) - sum(fulls) / len(fulls)
            spread = max(max(fulls) - min(fulls), max(mobas) - min(mobas))
            resolved = "yes" if abs(delta) >= 3 * spread else "no"
            rows.append(f"| {label} | {moba_name} | {len(mobas)} | {delta:+.4f} | {spread:.4f} | {resolved} |")
    if not rows:
        return []
    return [
        "Over seeds (mean Δ; spread: the largest range of either method's final value over its seeds):",
        "",
        "| size | method | seeds | mean Δ vs full | seed spread | abs(Δ) >= 3x spread |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _granularity_seed_table(exp: Experiment, logs: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines of the granularity settings run with several seeds: their mean against full attention's.

    Per setting with two or more seeds done (and full attention with two or more): the mean of the metric, its range,
    the mean Δ to full attention's mean, the spread (the larger range of the two) and whether |Δ| >= 3x the spread.
    Nothing when no setting has a second seed.
    """
    finals: dict[str, list[float]] = {}
    for er in exp.runs:
        final = _final(logs.get(er.run.name), exp.metric)
        if final is not None:
            finals.setdefault(er.label, []).append(final)
    fulls = next((finals.get(er.label, []) for er in exp.runs if er.run.attention == "full"), [])
    if len(fulls) < 2:
        return []
    full_mean, full_range = sum(fulls) / len(fulls), max(fulls) - min(fulls)
    rows = []
    for label, values in finals.items():
        if len(values) < 2 or values is fulls:
            continue
        mean, spread = sum(values) / len(values), max(max(values) - min(values), full_range)
        resolved = "yes" if abs(mean - full_mean) >= 3 * spread else "no"
        rows.append(
            f"| {label} | {len(values)} | {mean:.4f} | {max(values) - min(values):.4f} | {mean - full_mean:+.4f} | "
            f"{spread:.4f} | {resolved} |"
        )
    if not rows:
        return []
    return [
        f"Over seeds (full attention: {len(fulls)} seeds, mean {full_mean:.4f}, range {full_range:.4f}):",
        "",
        "| setting | seeds | mean | range | mean Δ vs full | spread | abs(Δ) >= 3x spread |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _conversion_table(exp: Experiment, logs: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines of the conversion experiment: per run its sparsity, steps, losses, and differences.

    Δ vs dense: to the source evaluated through the same path (the 0-step dense run). Δ vs dense continued: a
    continued MoBA run against the dense model continued as many steps (the extra training alone also moves the loss).
    A line under the table says whether the 0-step dense run reproduced the source's own final validation loss.
    """
    roles = {er.run.name: _conversion_role(er) for er in exp.runs}
    by_role: dict[str, ExperimentRun] = {}
    for er in exp.runs:
        by_role.setdefault(roles[er.run.name], er)  # one source, one 0-step and one continued dense run
    continued = by_role.get("dense")

    def final(er: ExperimentRun | None, metric: str) -> float | None:
        return None if er is None else _final(logs.get(er.run.name), metric)

    def delta(er: ExperimentRun, ref: ExperimentRun | None, metric: str) -> str:
        mine, theirs = final(er, metric), final(ref, metric)
        return "-" if mine is None or theirs is None or er is ref else f"{mine - theirs:+.4f}"

    lines = [
        "| run | attention | blocks attended (skipped) | steps | compute (PFLOP/s-days) | val loss | "
        "trailing val loss | Δ val vs dense | Δ trailing vs dense | Δ val vs dense continued | "
        "Δ trailing vs dense continued |",
        "|" + "---|" * 11,
    ]
    for er in exp.runs:
        cfg, log = er.run, logs.get(er.run.name)
        role = roles[cfg.name]
        sparsity = "all" if role in ("source", "dense0", "dense") else f"{er.label} ({er.x:.1%})"
        if log is None or not log.get("completed"):
            done = log["records"][-1]["step"] if log and log["records"] else 0
            lines.append(
                f"| {cfg.name} | {describe_attention(cfg.to_dict())} | {sparsity} | {done}/{cfg.steps} "
                f"({'not run' if log is None else 'incomplete'}) | - | - | - | - | - | - | - |"
            )
            continue
        base = by_role.get("dense0")
        vs_continued = role == "moba"
        lines.append(
            f"| {cfg.name} | {describe_attention(log['config'])} | {sparsity} | {cfg.steps} | "
            f"{log['final']['pflop_s_days']:.3g} | {_fmt(final(er, 'val_loss'))} | "
            f"{_fmt(final(er, 'val_trailing_loss'))} | {delta(er, base, 'val_loss') if role != 'source' else '-'} | "
            f"{delta(er, base, 'val_trailing_loss') if role != 'source' else '-'} | "
            f"{delta(er, continued, 'val_loss') if vs_continued else '-'} | "
            f"{delta(er, continued, 'val_trailing_loss') if vs_continued else '-'} |"
        )
    lines.append("")
    src, base = by_role.get("source"), by_role.get("dense0")
    a, b = final(src, "val_loss"), final(base, "val_loss")
    if src is not None and a is not None and b is not None:
        lines += [
            f"The 0-step dense run reproduces the source's final validation loss: {b:.6f} vs {a:.6f} "
            f"(difference {b - a:+.2e}). Compute: each run's own; the continued runs add to the source's "
            f"{logs[src.run.name]['final']['pflop_s_days']:.3g} PFLOP/s-days.",
            "",
        ]
    return lines


def write_table(
    out_dir: str | os.PathLike[str],
    experiments: Sequence[Experiment],
    *,
    banner: str | None = None,
    plots: Sequence[Path] = (),
) -> Path:
    """Write ``<out_dir>/results.md``: one table per experiment, from the logs.

    Args:
        out_dir: the sweeps' output directory. experiments: which. banner: a paragraph under the heading.
        plots: chart files to link.

    Returns:
        The markdown file's path.
    """
    out = Path(out_dir)
    logs = load_logs(out, experiments)
    lines = ["# MoBA reproduction: results", ""]
    lines.append(f"Generated by `python -m examples.reproduce plot` from the JSON logs in `{out / 'runs'}`.")
    if banner:
        lines += ["", f"**{banner}**"]
    lines.append("")
    for exp in experiments:
        lines += [f"## {exp.title}", "", f"Paper: {exp.claim}", ""]
        chart = [p for p in plots if p.stem == exp.name]
        if chart:
            lines += [f"![{exp.name}]({os.path.relpath(chart[0], out)})", ""]
        if exp.name == "conversion":
            lines += _conversion_table(exp, logs)
            continue
        lines.append(
            "| run | attention | model | context | steps | tokens | compute (PFLOP/s-days) | attention share | "
            "val loss | trailing val loss | Δ vs full | wall (s) | device |"
        )
        lines.append("|" + "---|" * 13)
        for er in exp.runs:
            log = logs.get(er.run.name)
            cfg = er.run
            if log is not None:
                # The log's own configuration: a run trained with --set overrides differs from the registry's.
                logged = log.get("config", {})
                cfg = dataclasses.replace(cfg, **{k: v for k, v in logged.items() if k in _TABLE_FIELDS})
            model = f"{cfg.n_layers}L x {cfg.d_model}"
            if log is None:
                lines.append(
                    f"| {cfg.name} | {describe_attention(cfg.to_dict())} | {model} | {cfg.context} | "
                    f"0/{cfg.steps} | - | - | - | - | - | - | - | not run |"
                )
                continue
            done = log["records"][-1]["step"] if log["records"] else 0
            last = log["final"] if log.get("completed") else (log["records"][-1] if log["records"] else None)
            flops = last["flops"] if last else None
            share = None if not flops or not flops["total"] else flops["attention"] / flops["total"]
            delta = "-"
            ref = _reference(exp, er)
            if ref is not None and log.get("completed"):
                mine, theirs = _final(log, exp.metric), _final(logs.get(ref.run.name), exp.metric)
                if mine is not None and theirs is not None:
                    delta = f"{mine - theirs:+.4f}"
            steps = f"{done}/{cfg.steps}" + ("" if log.get("completed") else " (incomplete)")
            params = log["model"]["params_matmul"] / 1e6
            tokens = f"{last['tokens']:,}" if last else "0"
            compute = f"{last['pflop_s_days']:.3g}" if last else "-"
            wall = f"{last['wall_s']:.1f}" if last else "-"
            share_text = "-" if share is None else f"{share:.1%}"
            val = _fmt(last["val_loss"] if last else None)
            trailing = _fmt(last["val_trailing_loss"] if last else None)
            device = log.get("device_name", log["device"])
            lines.append(
                f"| {cfg.name} | {describe_attention(log['config'])} | {model} ({params:.2f}M) | {cfg.context} | "
                f"{steps} | {tokens} | {compute} | {share_text} | {val} | {trailing} | {delta} | {wall} | {device} |"
            )
        lines += [
            "",
            f"Δ vs full: difference of the {exp.metric.replace('_', ' ')} to the matching full-attention run (same "
            "seed).",
            "",
        ]
        lines += _seed_table(exp, logs)
        if exp.name == "granularity":
            lines += _granularity_seed_table(exp, logs)
    path = out / "results.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
