"""Train one run: compile through the ``moba`` backend (or for full attention), log, checkpoint, resume.

Files of a run, in its directory:

- ``log.json``: the configuration, corpus and model metadata, the per-phase layer plans and FLOPs per step, the sites
  the backend reported, one record per logged step (step, tokens, LR, loss, validation loss, trailing validation loss,
  cumulative FLOPs and PFLOP/s-days, wall time), the sessions (steps, MoBA op executions, peak device memory),
  ``completed`` and ``final``. Rewritten after every record.
- ``checkpoint.pt``: model, optimizer, RNG states, the log so far and the loss accumulators, written atomically every
  ``ckpt_every`` steps, at an interruption (``stop_after``) and at the end. ``resume=True`` continues from it; since the
  batches are a pure function of ``(seed, step)`` and nothing else draws random numbers, a resumed run reproduces the
  uninterrupted one (bit for bit on the CPU; on GPUs up to the nondeterminism of their kernels).

A run with ``init_from`` (a converted model) loads the weights of the named run's final ``checkpoint.pt`` from the
sibling directory ``<run_dir>/../<init_from>`` before its first step; its optimizer and schedule start fresh. With
``steps = 0`` it only evaluates: one record at step 0 with the validation losses (no training loss), then ``final``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moba_compile import ops
from moba_compile.backend import collect_reports
from moba_compile.report import Report

from . import corpus as corpus_mod
from .config import RunConfig, dense_policy, eval_phase, layer_plan, moba_policy, phase_at, switch_step
from .flops import step_flops, to_pflop_s_days
from .jsonio import read_json, write_json
from .model import GPT, matmul_params

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is optional; without it there is no progress bar
    tqdm = None

__all__ = [
    "CKPT_NAME",
    "LOG_NAME",
    "RunError",
    "compile_phase",
    "evaluate",
    "load_source_weights",
    "lr_at",
    "moba_call_count",
    "planned",
    "read_log",
    "resolve_device",
    "train",
]

LOG_NAME = "log.json"
CKPT_NAME = "checkpoint.pt"
LOG_FORMAT = 1


class RunError(RuntimeError):
    """A run that cannot start or continue: changed configuration, changed corpus, or MoBA that did not run."""


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; anything else is passed to :class:`torch.device`.

    Args:
        spec: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...

    Returns:
        The device.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def moba_call_count() -> int:
    """Real executions of the MoBA op so far in this process (``moba_compile.ops.CALLS``, forward and backward).

    Dense fallbacks of the op (``attention:dense-sdpa``, a non-causal mask) are not counted.

    Returns:
        The count.
    """
    return sum(n for key, n in ops.CALLS.items() if key.startswith("attention") and not key.endswith(":dense-sdpa"))


def lr_at(cfg: RunConfig, step: int) -> float:
    """Learning rate of 0-based ``step``: linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio``.

    Args:
        cfg: the run. step: 0-based optimizer step.

    Returns:
        The learning rate.

    Example:
        >>> from examples.reproduce.config import RunConfig
        >>> cfg = RunConfig("x", steps=10, warmup_steps=2, lr=1.0, min_lr_ratio=0.1)
        >>> [round(lr_at(cfg, s), 3) for s in (0, 1, 2, 9)]
        [0.5, 1.0, 1.0, 0.134]
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def compile_phase(model: torch.nn.Module, cfg: RunConfig, phase: str) -> Callable[..., Tensor]:
    """Compile ``model`` for an attention phase (after resetting Dynamo, so no graph of another phase is reused).

    Args:
        model: the :class:`~examples.reproduce.model.GPT`. cfg: the run. phase: ``"moba"`` or ``"full"``.

    Returns:
        ``torch.compile(model, backend="moba", options={"policy": ..., "compiler": ..., "impl": ...})``, or for the
        full phase under ``full_backend = "torch"`` plain ``torch.compile`` (Inductor, or ``cfg.compiler``).
    """
    torch._dynamo.reset()
    if phase == "full" and cfg.full_backend == "torch":
        return torch.compile(model, backend=cfg.compiler)
    policy = moba_policy(cfg) if phase == "moba" else dense_policy(cfg)
    return torch.compile(model, backend="moba", options={"policy": policy, "compiler": cfg.compiler, "impl": cfg.impl})


def _amp(device: torch.device, cfg: RunConfig) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(
    fn: Callable[..., Tensor],
    batches: Sequence[tuple[Tensor, Tensor]],
    device: torch.device,
    cfg: RunConfig,
) -> tuple[float, float]:
    """Validation loss and trailing validation loss (the last ``context / 16`` positions of every sequence).

    Validation runs the same compiled graph as training, in grad mode without a backward pass: switching to
    ``torch.no_grad`` would make Dynamo compile the model a second time (its guards include the grad mode), which
    dominates the smoke runs. The results are the same; the memory peak is that of a training micro-batch, and the
    autograd graph is dropped at once.

    Args:
        fn: the compiled model (of the current phase). batches: fixed validation batches. device: where to run.
        cfg: the run (``context``, ``amp``).

    Returns:
        ``(val_loss, val_trailing_loss)``, mean per-token cross-entropy in nats.
    """
    tail = cfg.context // 16
    total = torch.zeros((), device=device)
    trailing = torch.zeros((), device=device)
    for inputs, targets in batches:
        with _amp(device, cfg):
            per_token = fn(inputs.to(device), targets.to(device)).detach()
        total += per_token.mean()
        trailing += per_token[:, -tail:].mean()
    return (total / len(batches)).item(), (trailing / len(batches)).item()


def read_log(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's ``log.json``, or None when there is none.

    Args:
        run_dir: the run's directory.

    Returns:
        The parsed log.
    """
    path = Path(run_dir) / LOG_NAME
    return read_json(path) if path.exists() else None


def _site_dicts(reports: Sequence[Report]) -> list[dict[str, Any]]:
    sites = []
    for report in reports:
        for s in report.sites:
            sites.append(
                {
                    "module": s.module,
                    "layer": s.layer,
                    "decision": s.decision,
                    "chunk_size": s.chunk_size,
                    "topk": s.topk,
                    "impl": s.impl,
                }
            )
    return sites


def _check_sites(cfg: RunConfig, phase: str, sites: list[dict[str, Any]]) -> None:
    """The backend must have decided every layer as the plan (used for the FLOP count) says."""
    if phase == "full" and cfg.full_backend == "torch":
        return
    plan = layer_plan(cfg, phase)
    seen: dict[int, tuple[str, int | None, int | None]] = {}
    for s in sites:
        seen[s["layer"]] = (s["decision"], s["chunk_size"], s["topk"])
    expected = {i: (p.mode, p.chunk_size, p.topk) for i, p in enumerate(plan)}
    if seen != expected:
        raise RunError(
            f"{cfg.name}: the moba backend decided {seen} in the {phase} phase, the plan says {expected}; the FLOP "
            "count would not describe what ran"
        )


def _plans(cfg: RunConfig, params: int) -> dict[str, dict[str, Any]]:
    phases = ["full"] if cfg.attention == "full" else ["moba"] + (["full"] if cfg.switch_to_full_frac else [])
    out = {}
    for phase in phases:
        plan = layer_plan(cfg, phase)
        out[phase] = {
            "layers": [{"mode": p.mode, "chunk_size": p.chunk_size, "topk": p.topk} for p in plan],
            "flops_per_step": step_flops(cfg, plan, params),
        }
    return out


def _cumulative_flops(log: dict[str, Any], done: int) -> dict[str, int]:
    """FLOPs of the first ``done`` steps: the MoBA phase's per-step count before the switch, the full phase's after.

    Every key of the per-step counts is present, 0 for ``done == 0`` (an evaluate-only run), so readers need no case.
    """
    sw = log["switch_step"]
    total: dict[str, int] = {key: 0 for phase in log["phases"].values() for key in phase["flops_per_step"]}
    for phase, steps in (("moba", min(done, sw)), ("full", max(0, done - sw))):
        if steps == 0:
            continue
        for key, value in log["phases"][phase]["flops_per_step"].items():
            total[key] += value * steps
    return total


def planned(cfg: RunConfig) -> dict[str, Any]:
    """What a run will cost, without training it: parameters and FLOPs (the model is built on the meta device).

    Args:
        cfg: the run.

    Returns:
        ``{"params_matmul", "params_total", "tokens", "flops"}``; ``flops`` as
        :func:`examples.reproduce.flops.step_flops`, summed over all steps (both phases of a switching run).
    """
    with torch.device("meta"):
        model = GPT(cfg)
    params = matmul_params(model)
    log = {"switch_step": switch_step(cfg), "phases": _plans(cfg, params)}
    return {
        "params_matmul": params,
        "params_total": sum(p.numel() for p in model.parameters()),
        "tokens": cfg.steps * cfg.tokens_per_step,
        "flops": _cumulative_flops(log, cfg.steps),
    }


def _new_log(cfg: RunConfig, corpus: corpus_mod.Corpus, model: GPT, device: torch.device) -> dict[str, Any]:
    params = matmul_params(model)
    return {
        "format": LOG_FORMAT,
        "name": cfg.name,
        "config": cfg.to_dict(),
        "identity": cfg.identity(),
        "corpus": corpus.describe(),
        "model": {
            "params_total": sum(p.numel() for p in model.parameters()),
            "params_matmul": params,
            "params_embedding": model.embed.weight.numel(),
        },
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": str(torch.__version__),
        "switch_step": switch_step(cfg),
        "phases": _plans(cfg, params),
        "sites": {},
        "records": [],
        "sessions": [],
        "moba_calls": 0,
        "completed": False,
        "final": None,
    }


def load_source_weights(cfg: RunConfig, model: GPT, run_dir: Path, corpus: corpus_mod.Corpus) -> dict[str, Any]:
    """Load the final weights of ``cfg.init_from`` (``<run_dir>/../<init_from>/checkpoint.pt``) into ``model``.

    Only a completed run's checkpoint is accepted: an intermediate one would convert a half-trained model without
    saying so. The optimizer state is not loaded (a converted run starts a fresh optimizer and schedule).

    Args:
        cfg: the converted run (``init_from`` set). model: its freshly built model. run_dir: its directory.
        corpus: the corpus it trains on (must be the source's: the dense baseline compares on the same split).

    Returns:
        ``{"run", "step", "val_loss", "val_trailing_loss"}`` of the source's final record, for the log.

    Raises:
        RunError: the source has no checkpoint, or only an unfinished one; it was trained on another corpus; or its
            model's shape differs from ``cfg``'s. Each message names both runs.
    """
    source = cfg.init_from
    assert source is not None
    path = run_dir.parent / source / CKPT_NAME
    if not path.exists():
        raise RunError(
            f"{cfg.name}: init_from={source!r}, but {path} does not exist: run {source} must finish in this output "
            "directory first (its checkpoint is never packed, so it must train in the same call, earlier in the lane)"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    log = ckpt["log"]
    if not log.get("completed") or ckpt["step"] != log["config"]["steps"]:
        raise RunError(
            f"{cfg.name}: init_from={source!r}, but {path} is not a final checkpoint (step {ckpt['step']} of "
            f"{log['config']['steps']}): finish {source} first"
        )
    if log["corpus"]["sha256"] != corpus.sha256:
        raise RunError(f"{cfg.name}: init_from={source!r} was trained on another corpus (sha256 differs)")
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    if mine != theirs:
        src = log["config"]
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise RunError(
            f"{cfg.name} ({cfg.n_layers}L x {cfg.d_model}, {cfg.n_heads} heads, mlp x{cfg.mlp_ratio}) cannot start "
            f"from {source} ({src['n_layers']}L x {src['d_model']}, {src['n_heads']} heads, mlp x{src['mlp_ratio']}): "
            f"the model shapes differ ({', '.join(diff[:4])}{', ...' if len(diff) > 4 else ''})"
        )
    model.load_state_dict(ckpt["model"])
    final = log["final"]
    return {
        "run": source,
        "step": ckpt["step"],
        "val_loss": final["val_loss"],
        "val_trailing_loss": final["val_trailing_loss"],
    }


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def _progress(cfg: RunConfig, start: int, enabled: bool) -> Iterator[Any]:
    if tqdm is None or not enabled:
        yield None
        return
    bar = tqdm(total=cfg.steps, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True, leave=True)
    try:
        yield bar
    finally:
        bar.close()


def train(
    cfg: RunConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or continue) one run and return its log.

    Args:
        cfg: the run.
        run_dir: its directory (created); ``log.json`` and ``checkpoint.pt`` live there.
        resume: continue from ``checkpoint.pt`` when it exists (a completed run is returned as is); without it, the
            run starts from scratch and replaces what the directory held.
        stop_after: stop (with a checkpoint) once this many steps are done, as if interrupted; ``resume=True``
            continues to ``cfg.steps`` later.
        progress: show a tqdm progress bar.

    Returns:
        The log (also in ``run_dir/log.json``).

    Raises:
        RunError: resuming with another configuration or corpus; the backend decided other layers than planned; a
            MoBA phase (or a 0-step MoBA evaluation) ran without a single real execution of the MoBA op
            (``moba_compile.ops.CALLS`` did not grow); or ``init_from`` names a run without a final checkpoint next
            to ``run_dir``, or of another model shape or corpus (:func:`load_source_weights`).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path, ckpt_path = run_dir / LOG_NAME, run_dir / CKPT_NAME
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls left outside autocast
    corpus = corpus_mod.load_corpus(cfg.val_permille, kind=cfg.corpus)

    torch.manual_seed(cfg.seed)
    model = GPT(cfg)
    model.to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )

    start, wall_offset, carry = 0, 0.0, 0.0
    log: dict[str, Any]
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        log = ckpt["log"]
        if log["identity"] != cfg.identity():
            raise RunError(f"{cfg.name}: {ckpt_path} was written with another configuration; use another --out")
        if log["corpus"]["sha256"] != corpus.sha256:
            raise RunError(f"{cfg.name}: the corpus changed since {ckpt_path} (Python {log['corpus']['python']})")
        if log["completed"]:
            return log
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        start, wall_offset, carry = ckpt["step"], ckpt["wall_s"], ckpt["loss_carry"]
        log["device"] = str(device)
    else:
        if resume:
            print(f"{cfg.name}: no checkpoint in {run_dir}, starting from scratch", flush=True)
        for stale in (ckpt_path, log_path):
            stale.unlink(missing_ok=True)
        log = _new_log(cfg, corpus, model, device)
        if cfg.init_from is not None:
            log["init_from"] = load_source_weights(cfg, model, run_dir, corpus)
        write_json(log_path, log)

    val = corpus_mod.val_batches(corpus, cfg.eval_batches, cfg.micro, cfg.context)
    accum = cfg.batch_size // cfg.micro
    end = cfg.steps if stop_after is None else min(cfg.steps, max(stop_after, start))
    if device.type == "cuda":
        # Per run, not per process: a lane's process trains several runs, and each session reports its own peak.
        torch.cuda.reset_peak_memory_stats(device)
    session_start = time.perf_counter()
    calls_before = moba_call_count()
    moba_steps = 0  # steps of this session whose plan has at least one MoBA layer
    sparse = cfg.attention == "moba" and any(p.mode == "moba" for p in layer_plan(cfg, "moba"))
    phase: str | None = None
    fn: Callable[..., Tensor] | None = None
    reports_seen = 0
    checked: set[str] = set()
    # Sum of the step losses since the last record, in float64 on the device, restored exactly on resume so that the
    # logged averages do not depend on where a run was interrupted.
    interval = torch.tensor(carry, dtype=torch.float64, device=device)

    def session(done: int) -> dict[str, Any]:
        # The peak memory of this session on the device (reset at its start): what the plan of GPU calls
        # (callplan.py) only estimates, and needs measured before it puts two runs on one GPU with less margin. Logs
        # written before the reset existed hold the process's peak over the earlier runs of its lane too.
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return {
            "start_step": start,
            "end_step": done,
            "moba_steps": moba_steps,
            "moba_calls": moba_call_count() - calls_before,
            "max_memory_gib": peak,
        }

    def checkpoint(done: int, snapshot: dict[str, Any]) -> None:
        _save_checkpoint(
            ckpt_path,
            {
                "step": done,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "wall_s": wall_offset + time.perf_counter() - session_start,
                "loss_carry": interval.item(),
                "log": snapshot,
            },
        )

    with collect_reports() as reports, _progress(cfg, start, progress) as bar:
        if cfg.steps == 0:
            # Evaluate only (a converted model as it is): the record a trained run writes at its last evaluation, at
            # step 0, so plot and results read it like any other run.
            phase = eval_phase(cfg, 0)
            fn = compile_phase(model, cfg, phase)
            calls_eval = moba_call_count()
            val_loss, val_trailing = evaluate(fn, val, device, cfg)
            if sparse and moba_call_count() == calls_eval:
                raise RunError(f"{cfg.name}: the MoBA evaluation never executed the moba op (Dynamo fell back?)")
            sites = _site_dicts(reports)
            _check_sites(cfg, phase, sites)
            log["sites"].setdefault(phase, sites)
            flops = _cumulative_flops(log, 0)
            log["records"].append(
                {
                    "step": 0,
                    "tokens": 0,
                    "phase": phase,
                    "lr": None,
                    "loss": None,
                    "loss_avg": None,
                    "val_loss": val_loss,
                    "val_trailing_loss": val_trailing,
                    "flops": flops,
                    "pflop_s_days": 0.0,
                    "wall_s": wall_offset + time.perf_counter() - session_start,
                }
            )
            write_json(log_path, log)
        for step in range(start, end):
            wanted = phase_at(cfg, step)
            if wanted != phase:
                fn, phase, reports_seen = compile_phase(model, cfg, wanted), wanted, len(reports)
            assert fn is not None
            moba_steps += phase == "moba" and sparse
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = corpus_mod.train_batch(corpus, cfg.seed, step, cfg.batch_size, cfg.context)
            step_loss = torch.zeros((), device=device)
            for m in range(accum):
                sl = slice(m * cfg.micro, (m + 1) * cfg.micro)
                with _amp(device, cfg):
                    loss = fn(inputs[sl].to(device, non_blocking=True), targets[sl].to(device, non_blocking=True))
                    loss = loss.mean()
                (loss / accum).backward()
                step_loss += loss.detach() / accum
            if phase not in checked:
                sites = _site_dicts(reports[reports_seen:])
                _check_sites(cfg, phase, sites)
                log["sites"].setdefault(phase, sites)
                checked.add(phase)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            interval += step_loss
            done = step + 1
            last = done == cfg.steps
            do_eval = done % cfg.eval_every == 0 or last
            if done % cfg.log_every == 0 or do_eval:
                previous = log["records"][-1]["step"] if log["records"] else 0
                val_loss = val_trailing = None
                if do_eval:
                    val_loss, val_trailing = evaluate(fn, val, device, cfg)
                flops = _cumulative_flops(log, done)
                log["records"].append(
                    {
                        "step": done,
                        "tokens": done * cfg.tokens_per_step,
                        "phase": phase,
                        "lr": lr,
                        "loss": step_loss.item(),
                        "loss_avg": interval.item() / (done - previous),
                        "val_loss": val_loss,
                        "val_trailing_loss": val_trailing,
                        "flops": flops,
                        "pflop_s_days": to_pflop_s_days(flops["total"]),
                        "wall_s": wall_offset + time.perf_counter() - session_start,
                    }
                )
                interval.zero_()
                write_json(log_path, log)
                if bar is not None:
                    post = {"loss": f"{log['records'][-1]['loss_avg']:.3f}"}
                    if val_loss is not None:
                        post["val"] = f"{val_loss:.3f}"
                    bar.set_postfix(post, refresh=False)
            if bar is not None:
                bar.update(1)
            if done % cfg.ckpt_every == 0 and done != end:
                current = session(done)
                snapshot = {
                    **log,
                    "sessions": log["sessions"] + [current],
                    "moba_calls": log["moba_calls"] + current["moba_calls"],
                }
                checkpoint(done, snapshot)

    current = session(end)
    if moba_steps and current["moba_calls"] == 0:
        raise RunError(
            f"{cfg.name}: {moba_steps} MoBA steps ran but moba_compile.ops.CALLS did not grow: the moba op never "
            "executed (did Dynamo fall back to eager?)"
        )
    if cfg.attention == "full" and cfg.full_backend == "moba-dense" and current["moba_calls"]:
        raise RunError(f"{cfg.name}: full attention ran the MoBA op {current['moba_calls']} times")
    log["sessions"].append(current)
    log["moba_calls"] += current["moba_calls"]
    if end == cfg.steps:
        _finish(log, wall_offset + time.perf_counter() - session_start)
    write_json(log_path, log)
    checkpoint(end, log)
    return log


def _finish(log: dict[str, Any], wall: float) -> None:
    """Mark the log completed and write its ``final`` summary (the last record, with the total wall time)."""
    last = log["records"][-1]
    log["final"] = {
        "step": last["step"],
        "tokens": last["tokens"],
        "loss": last["loss"],
        "loss_avg": last["loss_avg"],
        "val_loss": last["val_loss"],
        "val_trailing_loss": last["val_trailing_loss"],
        "flops": last["flops"],
        "pflop_s_days": last["pflop_s_days"],
        "wall_s": wall,
    }
    log["completed"] = True
