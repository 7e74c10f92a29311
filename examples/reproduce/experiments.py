"""The experiments as named run configurations: the paper's four at every scale, and (e) the conversion of a trained
dense model at the mid, large and smoke scales.

GPU scale (one H100; sizes chosen for minutes per run, planned compute printed by ``python -m examples.reproduce
list``; nothing here has been run on a GPU yet):

- ``scaling`` (paper: LM loss vs compute, MoBA within ~1e-3 of full attention): 4 model sizes ``s1``..``s4`` (4-10
  layers, width 256-640, head dim 64), context 8K, MoBA chunk 512 / top-3 in every layer, vs full attention.
- ``trailing`` (paper: loss on the last 2K tokens of 32K sequences, MoBA slightly above full, gap closing with
  compute): sizes ``s1``..``s3`` at context 32K, chunk 2048 / top-3 (the same 3/16 of the keys at the last position as
  the 8K setting), vs full; metric: validation loss on the last 1/16 of each sequence.
- ``granularity`` (paper: at 75% sparsity, 2 of 8 blocks is ~1e-2 worse, finer settings match or beat full): size
  ``s2`` at 8K with top-k / blocks = 2/8, 4/16, 8/32, 16/64, 32/128 (chunks 1024 ... 64), vs full (shared with
  ``scaling``).
- ``hybrid`` (paper: switching to full attention for the end of training, or keeping the last layers dense, recovers
  the trailing loss): size ``s2`` at 32K: MoBA with the last 1 or 2 of 6 layers dense, and MoBA switching to full
  attention for the last 10% or 25% of the steps, vs pure MoBA and full (both shared with ``trailing``).

Quick scale (``--quick``; what one session's 30 minutes of H100 time affords, all four experiments in about 8 minutes
of three concurrent sweeps): sizes ``q1``..``q3`` (2 layers x 128, 4 x 256, 6 x 384; head dim 64), 200 steps of
131,072 tokens (16 x 8K or 4 x 32K), ``aot_eager`` (the MoBA op runs the Triton kernels either way; the rest of the
model runs eagerly, which saves minutes of Inductor compilation per run at these lengths). (a) at ``q1``..``q3``,
(b) at ``q1``..``q2``, (c) and (d) at ``q2`` (4 layers: (d) keeps the last 1 or 2 of 4 dense).

Mid scale (``--mid``; every run fits one call of the GPU machine, which keeps nothing between calls: see
:mod:`examples.reproduce.callplan` for the time estimates and the grouping into calls): sizes ``m1``..``m4`` (3 layers
x 192, 4 x 256, 5 x 320, 6 x 384; head dim 64), 131,072 tokens per step, ``aot_eager``. (a) at ``m1``..``m4`` with
256 / 512 / 768 / 576 steps at 8K (24 / 21 / 16 / 7 tokens per parameter: the smaller sizes near compute-optimal, the
largest as many steps as fit), (b) at ``m1``..``m3`` with 256 steps at 32K, (c) and (d) at ``m2`` (4 layers: (d) keeps
the last 1 or 2 of 4 dense), and every (a) and (b) pair again with seed 1 (runs named ``...-seed1``), which also gives
(c) and (d) a second seed of their shared full and MoBA runs.

Large scale (``--large``; the next one, planned with the estimate fitted to the mid runs, see
:mod:`examples.reproduce.calibrate`): sizes ``l1``..``l4`` (2 layers x 128, 3 x 192, 4 x 256, 5 x 320; head dim 64),
the ``stdlib+site-packages`` corpus (:data:`LARGE_CORPUS`), 4 validations of :data:`LARGE_EVAL_BATCHES` micro-batches.
(a) at ``l1``..``l4`` with 128 / 208 / 400 / 592 steps at 8K (39 / 20 / 16 / 12 tokens per parameter), (b) at
``l1``..``l3`` with 160 steps at 32K, (c), (d) and (e) at ``l3``; three seeds (:data:`LARGE_SEEDS`) of every (a) and
(b) pair and of (c)'s coarsest and finest settings (:data:`LARGE_GRANULARITY_SEEDED`) with the full run they compare
with. 63 runs in 4 calls of the 2-GPU machine, two per command.

Conversion (mid, large and smoke scales only: ``conversion``; the question of a user converting a trained model): the
dense run ``full-8k-m2`` (at the large scale ``full-8k-l3``, the same shape) is switched to MoBA, chunk 512 with top-k
of its 16 blocks in :data:`MID_CONVERSION_TOPK`, and evaluated as it is (0 steps) and after a short continued training
with MoBA (10% of the source's steps, from the source's final learning rate), against the source evaluated through the
same path (0 steps, full attention: it must reproduce the source's final validation loss) and the source continued as
long with full attention (so that the continued MoBA runs are compared with as much extra training). The runs start from
the source's final checkpoint (``RunConfig.init_from``), which exists only on the GPU machine during the call that
trained it, so the plan puts them in the source's lane after it (:func:`examples.reproduce.callplan.plan_calls`). Why
``m2`` at 8K: the largest full-attention run whose lane, with its eight conversion runs, fits one call's budget (``m3``
and ``m4`` do not), and at 8K it is trained near compute-optimal (21 tokens per parameter) where the 32K runs of its
size get half that; the trailing loss (last 512 of 8K tokens) is measured where MoBA's sparsity is highest, 3 of 16
blocks at top-3, as at 32K.

Runs shared between experiments have one name and are trained once. The smoke scale keeps every experiment's structure
with 1-2 layer models, contexts 128/256, 8 steps, and the ``aot_eager`` compiler (its conversion: ``full-128-t2``, top
1/2/4 of 8 blocks, 2 continued steps).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import RunConfig

__all__ = [
    "EXPERIMENT_NAMES",
    "MID_CONVERSION_TOPK",
    "MID_SEEDS",
    "Experiment",
    "ExperimentRun",
    "conversion_runs",
    "experiments",
    "runs_by_name",
]

#: Every experiment name; ``conversion`` exists at the mid and smoke scales only (see :func:`experiments`).
EXPERIMENT_NAMES = ("scaling", "trailing", "granularity", "hybrid", "conversion")


@dataclass(frozen=True)
class ExperimentRun:
    """A run's place in an experiment: its legend ``series``, a short ``label``, and an optional numeric ``x``."""

    run: RunConfig
    series: str
    label: str
    x: float | None = None


@dataclass(frozen=True)
class Experiment:
    """A named experiment: the paper's claim it reproduces, the metric it is judged on, and its runs."""

    name: str
    title: str
    claim: str
    metric: str
    runs: tuple[ExperimentRun, ...]


@dataclass(frozen=True)
class _Size:
    key: str
    n_layers: int
    d_model: int
    n_heads: int
    lr: float


# GPU scale: head dim 64 everywhere (a Triton kernel head dim).
_GPU_SIZES = {
    "s1": _Size("s1", 4, 256, 4, 3e-3),
    "s2": _Size("s2", 6, 384, 6, 2e-3),
    "s3": _Size("s3", 8, 512, 8, 1.5e-3),
    "s4": _Size("s4", 10, 640, 10, 1e-3),
}
_GPU_STEPS_8K = {"s1": 512, "s2": 1024, "s3": 2048, "s4": 2048}  # 16 x 8K = 131,072 tokens per step
_GPU_STEPS_32K = {"s1": 256, "s2": 512, "s3": 1024}  # 4 x 32K = 131,072 tokens per step

_QUICK_SIZES = {
    "q1": _Size("q1", 2, 128, 2, 3e-3),
    "q2": _Size("q2", 4, 256, 4, 2e-3),
    "q3": _Size("q3", 6, 384, 6, 1.5e-3),
}
_QUICK_STEPS = 200

# Mid scale: head dim 64; steps sized by examples/reproduce/callplan.py's estimate so that every run fits one GPU call.
_MID_SIZES = {
    "m1": _Size("m1", 3, 192, 3, 3e-3),
    "m2": _Size("m2", 4, 256, 4, 2e-3),
    "m3": _Size("m3", 5, 320, 5, 1.75e-3),
    "m4": _Size("m4", 6, 384, 6, 1.5e-3),
}
_MID_STEPS_8K = {"m1": 256, "m2": 512, "m3": 768, "m4": 576}  # 16 x 8K = 131,072 tokens per step
_MID_STEPS_32K = {"m1": 256, "m2": 256, "m3": 256}  # 4 x 32K = 131,072 tokens per step
#: The MoBA top-k (of 16 blocks of 512 at 8K) the mid scale's conversion switches the dense model to: 87.5%, 81% and
#: 62.5% of the blocks skipped at the last position; top-3 is the setting the MoBA runs of (a) train with from scratch.
MID_CONVERSION_TOPK = (2, 3, 6)
#: Continued training of a converted run, as a fraction of the source's steps (the brief's ~10%).
CONVERSION_STEPS_FRAC = 0.1
#: The seeds of the mid scale's (a) and (b) pairs: seed 0 (unsuffixed names) and a second seed for the seed spread.
MID_SEEDS = (0, 1)

# Large scale: the next reproduction scale, sized by the estimate fitted to the mid runs (callplan.Machine) to about 20
# device minutes of the 2-GPU machine. Sizes from 2 x 128 (the quick scale's q1) to 5 x 320 (the mid scale's m3),
# learning rates as there; every 8K run near or above 20 tokens per parameter. The larger corpus (stdlib and the
# installed packages' sources) keeps every run under one epoch.
_LARGE_SIZES = {
    "l1": _Size("l1", 2, 128, 2, 3e-3),
    "l2": _Size("l2", 3, 192, 3, 3e-3),
    "l3": _Size("l3", 4, 256, 4, 2e-3),
    "l4": _Size("l4", 5, 320, 5, 1.75e-3),
}
_LARGE_STEPS_8K = {"l1": 128, "l2": 208, "l3": 400, "l4": 592}  # 16 x 8K = 131,072 tokens per step
_LARGE_STEPS_32K = {"l1": 160, "l2": 160, "l3": 160}  # 4 x 32K = 131,072 tokens per step
#: The seeds of the large scale's (a) and (b) pairs and of (c)'s coarsest and finest settings.
LARGE_SEEDS = (0, 1, 2)
#: The corpus of the large scale's runs (:mod:`examples.reproduce.corpus`).
LARGE_CORPUS = "stdlib+site-packages"
#: Validation micro-batches of the large scale: 16 x 16 x 8K or 16 x 4 x 32K = 2.1M tokens per evaluation (the mid
#: scale's 4 micro-batches held 0.5M), so that the noise of the validation sample is small against the seed spread.
LARGE_EVAL_BATCHES = 12
#: The number of blocks (of 8K) of (c)'s settings trained with every seed of :data:`LARGE_SEEDS`: the coarsest and
#: the finest (the others with seed 0 only).
LARGE_GRANULARITY_SEEDED = (8, 128)

_SMOKE_SIZES = {
    "t1": _Size("t1", 1, 32, 2, 1e-2),
    "t2": _Size("t2", 2, 64, 4, 1e-2),
}


def _run(name: str, size: _Size, context: int, batch: int, steps: int, **kw: Any) -> RunConfig:
    # The model and data shape from the size; the schedule and the rest from the scale's builder below.
    return RunConfig(
        name=name,
        n_layers=size.n_layers,
        d_model=size.d_model,
        n_heads=size.n_heads,
        lr=size.lr,
        context=context,
        batch_size=batch,
        steps=steps,
        **kw,
    )


def _gpu_run(name: str, size: _Size, context: int, batch: int, steps: int, **kw: Any) -> RunConfig:
    schedule = dict(warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 8), ckpt_every=max(1, steps // 8))
    return _run(name, size, context, batch, steps, eval_batches=4, log_every=10, compiler="inductor", **schedule, **kw)


def _quick_run(name: str, size: _Size, context: int, batch: int, **kw: Any) -> RunConfig:
    steps = _QUICK_STEPS
    schedule = dict(warmup_steps=steps // 10, eval_every=steps // 4, ckpt_every=steps // 2)
    return _run(name, size, context, batch, steps, eval_batches=4, log_every=10, compiler="aot_eager", **schedule, **kw)


def _mid_run(name: str, size: _Size, context: int, batch: int, steps: int, **kw: Any) -> RunConfig:
    # One checkpoint, at the end: nothing written on the GPU machine survives its call, so intermediate checkpoints
    # would only cost time (a run that does not finish inside its call is lost either way).
    schedule = dict(warmup_steps=max(1, steps // 10), eval_every=max(1, steps // 8), ckpt_every=steps)
    return _run(name, size, context, batch, steps, eval_batches=4, log_every=16, compiler="aot_eager", **schedule, **kw)


def _large_run(name: str, size: _Size, context: int, batch: int, steps: int, **kw: Any) -> RunConfig:
    # As the mid scale (one checkpoint at the end: none survives a call), with the larger corpus, four validations of
    # LARGE_EVAL_BATCHES micro-batches (the last three show whether the validation loss still falls).
    schedule = dict(warmup_steps=max(1, steps // 10), eval_every=max(1, steps // 4), ckpt_every=steps)
    return _run(
        name,
        size,
        context,
        batch,
        steps,
        corpus=LARGE_CORPUS,
        eval_batches=LARGE_EVAL_BATCHES,
        log_every=16,
        compiler="aot_eager",
        **schedule,
        **kw,
    )


def _smoke_run(name: str, size: _Size, context: int, **kw: Any) -> RunConfig:
    schedule = dict(warmup_steps=2, eval_every=4, ckpt_every=4)
    return _run(name, size, context, 2, 8, eval_batches=1, log_every=2, compiler="aot_eager", **schedule, **kw)


def _size_label(size: _Size) -> str:
    return f"{size.key} ({size.n_layers}L x {size.d_model})"


def conversion_runs(
    source: RunConfig, tag: str, chunk: int, topks: tuple[int, ...], steps: int, eval_every: int
) -> list[ExperimentRun]:
    """The runs converting a trained full-attention run to MoBA, each starting from its final weights (``init_from``).

    For each top-k: MoBA evaluated as converted (0 steps) and after ``steps`` of continued MoBA training; plus the
    source itself evaluated through the same path (0 steps, full attention: the baseline, which must reproduce the
    source's final validation loss) and continued ``steps`` with full attention (the baseline of the continued runs).
    Continued training starts a fresh AdamW at the source's final learning rate (``lr * min_lr_ratio``): re-warming to
    the source's peak would first undo part of its training, which the comparison would then measure.

    Args:
        source: the trained full-attention run. tag: the run names' size tag (``"8k-m2"``). chunk: MoBA chunk size.
        topks: the MoBA top-k values. steps: continued steps. eval_every: validation interval of the continued runs.

    Returns:
        The baseline, then per top-k the 0-step and continued runs, then the continued dense run; ``x`` is the
        fraction of blocks skipped at the last position (0 for dense), ``label`` the top-k over the block count.

    Raises:
        ValueError: a source that is not a full-attention run, or a top-k not below the number of blocks.
    """
    if source.attention != "full":
        raise ValueError(f"{source.name}: a conversion starts from a full-attention run")
    blocks = source.context // chunk
    if not all(1 <= k < blocks for k in topks):
        raise ValueError(f"top-k {topks} must be in 1..{blocks - 1} ({blocks} blocks of {chunk} at {source.context})")

    def convert(name: str, n: int, **kw: Any) -> RunConfig:
        schedule = dict(warmup_steps=max(1, n // 10), eval_every=eval_every if n else 1, ckpt_every=max(1, n))
        return dataclasses.replace(
            source,
            name=name,
            init_from=source.name,
            steps=n,
            lr=source.lr * source.min_lr_ratio,
            notes={"converted_from": source.name},
            **schedule,
            **kw,
        )

    out = [ExperimentRun(convert(f"conv-{tag}-dense-0", 0), "Dense (source), 0 steps", "dense", 0.0)]
    for k in topks:
        moba = dict(attention="moba", chunk_size=chunk, topk=k, dense_last=0, policy=None)
        label, skipped = f"top-{k}/{blocks}", 1 - k / blocks
        out.append(ExperimentRun(convert(f"conv-{tag}-top{k}-0", 0, **moba), "MoBA, 0 steps", label, skipped))
        series = f"MoBA, {steps} steps"
        out.append(ExperimentRun(convert(f"conv-{tag}-top{k}-{steps}", steps, **moba), series, label, skipped))
    out.append(ExperimentRun(convert(f"conv-{tag}-dense-{steps}", steps), f"Dense, {steps} steps", "dense", 0.0))
    return out


CLAIMS = {
    "scaling": "LM loss vs training compute: MoBA and full attention stay within ~1e-3 (8K context, chunk 512, top-3).",
    "trailing": "Trailing LM loss (last 2K of 32K tokens) vs compute: MoBA slightly above full attention, the gap "
    "closing with compute.",
    "granularity": "Block granularity at 75% sparsity (top-k/blocks 2/8 ... 32/128): the coarsest ~1e-2 worse, finer "
    "settings match or beat full attention.",
    "hybrid": "MoBA for most of training then full attention, and keeping the last layers dense, recover the "
    "trailing-token loss.",
    "conversion": "A model trained with full attention can be switched to MoBA: continued training with MoBA "
    "(the paper's long-context continual pre-training) keeps its loss near full attention's.",
}

TITLES = {
    "scaling": "(a) Scaling: LM loss vs training compute",
    "trailing": "(b) Trailing LM loss (last 1/16 of the context) vs training compute",
    "granularity": "(c) Block granularity at 75% sparsity",
    "hybrid": "(d) Hybrid MoBA / full attention",
    "conversion": "(e) Converting a trained full-attention model to MoBA",
}

METRICS = {
    "scaling": "val_loss",
    "trailing": "val_trailing_loss",
    "granularity": "val_loss",
    "hybrid": "val_trailing_loss",
    "conversion": "val_trailing_loss",
}


def experiments(
    smoke: bool = False, quick: bool = False, mid: bool = False, large: bool = False
) -> dict[str, Experiment]:
    """The experiments at GPU, mid, large, quick or smoke scale.

    Args:
        smoke: tiny CPU configurations (whole pipeline in under a minute) instead of the GPU ones.
        quick: the reduced GPU configurations of the module docstring (200 steps, sizes ``q1``..``q3``).
        mid: the configurations of the module docstring whose every run fits one GPU call (sizes ``m1``..``m4``, a
            second seed of the (a) and (b) pairs).
        large: the next scale (sizes ``l1``..``l4``, the larger corpus, three seeds of the (a) and (b) pairs and of
            (c)'s coarsest and finest settings; see the module docstring).

    Returns:
        ``{name: Experiment}`` for the names of :data:`EXPERIMENT_NAMES`, in that order; ``conversion`` only at the
        mid, large and smoke scales (the GPU scale was planned before it, and the quick scale's results are history).
        At the mid and large scales the other seeds' runs of (a) and (b) follow the seed-0 runs, with the same series
        and labels (the charts average them); likewise (c)'s seeded settings at the large scale.

    Raises:
        ValueError: more than one of ``smoke``, ``quick``, ``mid`` and ``large``.
    """
    if smoke + quick + mid + large > 1:
        raise ValueError("pick one scale: smoke, quick, mid or large, not several")
    groups: dict[str, list[ExperimentRun]] = {name: [] for name in EXPERIMENT_NAMES}
    seeds: tuple[int, ...] = (0,)
    gran_seeded: tuple[int, ...] = ()
    if smoke:
        short, long = 128, 256
        sizes = _SMOKE_SIZES
        scaling_sizes, trailing_sizes, gran_size, hybrid_size = ["t1", "t2"], ["t2"], "t1", "t2"
        chunk_short, chunk_long = 16, 32

        def make(name: str, size: _Size, context: int, **kw: Any) -> RunConfig:
            return _smoke_run(name, size, context, **kw)

        tag_short, tag_long = "128", "256"
        hybrid_dense, hybrid_switch = (1,), (0.25,)
    elif quick:
        short, long = 8192, 32768
        sizes = _QUICK_SIZES
        scaling_sizes, trailing_sizes, gran_size, hybrid_size = ["q1", "q2", "q3"], ["q1", "q2"], "q2", "q2"
        chunk_short, chunk_long = 512, 2048

        def make(name: str, size: _Size, context: int, **kw: Any) -> RunConfig:
            return _quick_run(name, size, context, 16 if context == short else 4, **kw)

        tag_short, tag_long = "8k", "32k"
        hybrid_dense, hybrid_switch = (1, 2), (0.10, 0.25)
    elif mid:
        short, long = 8192, 32768
        sizes = _MID_SIZES
        scaling_sizes, trailing_sizes, gran_size, hybrid_size = ["m1", "m2", "m3", "m4"], ["m1", "m2", "m3"], "m2", "m2"
        chunk_short, chunk_long = 512, 2048
        seeds = MID_SEEDS

        def make(name: str, size: _Size, context: int, **kw: Any) -> RunConfig:
            if context == short:
                return _mid_run(name, size, context, 16, _MID_STEPS_8K[size.key], **kw)
            return _mid_run(name, size, context, 4, _MID_STEPS_32K[size.key], **kw)

        tag_short, tag_long = "8k", "32k"
        hybrid_dense, hybrid_switch = (1, 2), (0.10, 0.25)
    elif large:
        short, long = 8192, 32768
        sizes = _LARGE_SIZES
        scaling_sizes, trailing_sizes, gran_size, hybrid_size = ["l1", "l2", "l3", "l4"], ["l1", "l2", "l3"], "l3", "l3"
        chunk_short, chunk_long = 512, 2048
        seeds, gran_seeded = LARGE_SEEDS, LARGE_GRANULARITY_SEEDED

        def make(name: str, size: _Size, context: int, **kw: Any) -> RunConfig:
            if context == short:
                return _large_run(name, size, context, 16, _LARGE_STEPS_8K[size.key], **kw)
            return _large_run(name, size, context, 4, _LARGE_STEPS_32K[size.key], **kw)

        tag_short, tag_long = "8k", "32k"
        hybrid_dense, hybrid_switch = (1, 2), (0.10, 0.25)
    else:
        short, long = 8192, 32768
        sizes = _GPU_SIZES
        scaling_sizes, trailing_sizes, gran_size, hybrid_size = ["s1", "s2", "s3", "s4"], ["s1", "s2", "s3"], "s2", "s2"
        chunk_short, chunk_long = 512, 2048

        def make(name: str, size: _Size, context: int, **kw: Any) -> RunConfig:
            if context == short:
                return _gpu_run(name, size, context, 16, _GPU_STEPS_8K[size.key], **kw)
            return _gpu_run(name, size, context, 4, _GPU_STEPS_32K[size.key], **kw)

        tag_short, tag_long = "8k", "32k"
        hybrid_dense, hybrid_switch = (1, 2), (0.10, 0.25)

    def pair(context: int, tag: str, chunk: int, key: str, seed: int = 0) -> tuple[RunConfig, RunConfig]:
        size = sizes[key]
        # Seed 0 keeps the unsuffixed names of the existing scales; other seeds are new runs with a "-seedN" suffix.
        suffix = f"-seed{seed}" if seed else ""
        full = make(f"full-{tag}-{key}{suffix}", size, context, attention="full", seed=seed)
        moba = make(f"moba-{tag}-{key}{suffix}", size, context, attention="moba", chunk_size=chunk, topk=3, seed=seed)
        return full, moba

    for seed in seeds:
        for key in scaling_sizes:
            full, moba = pair(short, tag_short, chunk_short, key, seed)
            groups["scaling"] += [
                ExperimentRun(full, "Full attention", _size_label(sizes[key])),
                ExperimentRun(moba, f"MoBA (chunk {chunk_short}, top-3)", _size_label(sizes[key])),
            ]
    for seed in seeds:
        for key in trailing_sizes:
            full, moba = pair(long, tag_long, chunk_long, key, seed)
            groups["trailing"] += [
                ExperimentRun(full, "Full attention", _size_label(sizes[key])),
                ExperimentRun(moba, f"MoBA (chunk {chunk_long}, top-3)", _size_label(sizes[key])),
            ]

    # Seed 0 of every setting, then (large scale) the other seeds of the full run (shared with (a)) and of the
    # settings in gran_seeded: the seed spread of (c) is measured at its own coarsest and finest settings.
    for seed in seeds if gran_seeded else (0,):
        suffix = f"-seed{seed}" if seed else ""
        full, _ = pair(short, tag_short, chunk_short, gran_size, seed)
        groups["granularity"].append(ExperimentRun(full, "Full attention", "full"))
        for blocks in (8, 16, 32, 64, 128):
            if seed and blocks not in gran_seeded:
                continue
            topk, chunk = blocks // 4, short // blocks
            run = make(
                f"moba-{tag_short}-{gran_size}-blocks{blocks}-top{topk}{suffix}",
                sizes[gran_size],
                short,
                attention="moba",
                chunk_size=chunk,
                topk=topk,
                seed=seed,
            )
            groups["granularity"].append(ExperimentRun(run, "MoBA, 75% sparsity", f"{topk}/{blocks}", float(blocks)))

    full, moba = pair(long, tag_long, chunk_long, hybrid_size)
    groups["hybrid"] += [
        ExperimentRun(full, "Full attention", "full"),
        ExperimentRun(moba, "MoBA", "MoBA"),
    ]
    for n in hybrid_dense:
        run = dataclasses.replace(moba, name=f"{moba.name}-dense{n}", dense_last=n)
        groups["hybrid"].append(ExperimentRun(run, f"MoBA, last {n} layer(s) dense", f"last {n} dense"))
    for frac in hybrid_switch:
        pct = round(frac * 100)
        run = dataclasses.replace(moba, name=f"{moba.name}-switch{pct}", switch_to_full_frac=frac)
        groups["hybrid"].append(ExperimentRun(run, f"MoBA, full for the last {pct}%", f"full last {pct}%"))

    names = list(EXPERIMENT_NAMES)
    if smoke or mid or large:
        # The source is the seed-0 dense run of (a) at the size named in the module docstring, shared by name.
        key, topks = ("t2", (1, 2, 4)) if smoke else ("l3" if large else "m2", MID_CONVERSION_TOPK)
        source, _ = pair(short, tag_short, chunk_short, key)
        steps = 2 if smoke else round(source.steps * CONVERSION_STEPS_FRAC)
        eval_every = 1 if smoke else max(1, steps // 8)
        groups["conversion"].append(ExperimentRun(source, "Dense (source), trained", "source", 0.0))
        groups["conversion"] += conversion_runs(source, f"{tag_short}-{key}", chunk_short, topks, steps, eval_every)
    else:
        names.remove("conversion")
    return {name: Experiment(name, TITLES[name], CLAIMS[name], METRICS[name], tuple(groups[name])) for name in names}


def runs_by_name(selected: list[Experiment]) -> dict[str, RunConfig]:
    """The distinct runs of some experiments, in order of first appearance (shared runs once).

    Args:
        selected: experiments.

    Returns:
        ``{run name: RunConfig}``.

    Raises:
        ValueError: two different configurations share a name.
    """
    out: dict[str, RunConfig] = {}
    for exp in selected:
        for er in exp.runs:
            seen = out.get(er.run.name)
            if seen is not None and seen.identity() != er.run.identity():
                raise ValueError(f"run name {er.run.name!r} is used for two different configurations")
            out.setdefault(er.run.name, er.run)
    return out
