"""MoBA benchmark: Triton gate, forward and backward against dense causal SDPA and FlexAttention, in one run.

Usage (a CUDA GPU is needed for real numbers)::

    python -m benchmarks.attention                    # spec section 5 table + FlashMoBA sweep, bf16, D=128
    python -m benchmarks.attention --suite spec       # only the spec table
    python -m benchmarks.attention --max-len 131072   # skip longer sequences
    python -m benchmarks.attention --dry-run          # print the plan (shapes, FLOPs, memory); no GPU needed
    python -m benchmarks.attention --compile-check    # compile every kernel for sm_90 (no GPU): registers, spills
    python -m benchmarks.attention --suite spec --kv-heads 8 --routing both   # GQA (32 query heads, 8 key heads):
                                                      # head vs group routing, each shape twice in the same run
    python -m benchmarks.attention --residual both    # the forward's int8 (default) and bf16 residual, each shape
                                                      # twice in the same run
    python -m benchmarks.attention --smoke            # tiny shapes on CPU through the Triton interpreter: checks the
                                                      # script end to end; its timings mean nothing, nothing is saved

Per configuration it measures, in the same process: gating ms (chunk means + fused top-k gate), index-flip ms,
forward ms (``moba_forward_triton``, gating included), dense causal SDPA ms, FlexAttention ms with a MoBA block mask
(block size = chunk, the exact per-token selection in ``mask_mod``), and peak memory of each. From the gate's actual
selection it counts the useful work, ``4 * D`` FLOPs per attended (query, key) pair with the own chunk counted
causally, and reports the ideal time (useful FLOPs at the dense SDPA FLOP rate of this run), the ratio forward/ideal,
and useful TFLOP/s. Training: backward ms (``moba_backward_triton``, atomics mode and deterministic mode,
gate recomputation included), forward+backward ms of the launchers in the default mode, dense SDPA backward and
forward+backward ms (autograd), the ideal fwd+bwd time (3.5 x the useful forward FLOPs at the dense fwd+bwd FLOP
rate of this run) and
the peak memory of one fwd+bwd of each. Timings are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed
between runs).

Results: a table on stdout, ``benchmarks/results/attention-<gpu>-<date>.json`` (GPU, torch/triton/CUDA versions,
every shape and number; ``null`` plus an ``errors`` entry where a measurement failed or was skipped), and a PNG plot
next to it when matplotlib is installed. Nothing is estimated in place of a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    RESULTS_DIR,
    GiB,
    bench_device,
    compile_variants,
    environment,
    field_recorder,
    fmt_or_dash,
    print_compile_records,
    release,
    require_compiled_kernels,
    results_path,
    time_ms,
)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark shape: prefill (``Lq == Lk``), causal, bf16; MHA unless ``kv_heads`` is set (GQA/MQA: ``heads``
    query heads share ``kv_heads`` key/value heads); ``routing`` is the gate's (``"head"`` or ``"group"``);
    ``residual`` how the forward stores its running output's residual (``"int8"`` or ``"bf16"``)."""

    suite: str
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    chunk_size: int
    topk: int
    kv_heads: int | None = None
    routing: str = "head"
    residual: str = "int8"

    @property
    def heads_kv(self) -> int:
        """Key/value heads (``heads`` for MHA)."""
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def name(self) -> str:
        n = self.seq_len
        size = f"{n // 1024}K" if n % 1024 == 0 else str(n)
        name = f"{self.suite}-B{self.batch}-H{self.heads}-N{size}-D{self.head_dim}-C{self.chunk_size}-K{self.topk}"
        # MHA with head routing keeps the names of earlier result files.
        if self.kv_heads is not None:
            name += f"-Hkv{self.kv_heads}"
        if self.routing != "head":
            name += f"-{self.routing}"
        if self.residual != "int8":  # the default residual keeps the names; results before it had a bf16 one
            name += f"-res_{self.residual}"
        return name


# moba-spec.md section 5 (B=1, H=32, D=128).
SPEC_CONFIGS = [
    BenchConfig("spec", 1, 32, 8192, 128, 512, 3),
    BenchConfig("spec", 1, 32, 32768, 128, 2048, 3),
    BenchConfig("spec", 1, 32, 131072, 128, 4096, 12),
    BenchConfig("spec", 1, 32, 131072, 128, 8192, 3),
]
# The FlashMoBA paper's setting: B=2, H=16, D=128, chunk 128, top-k 8, 8K..512K tokens.
FLASHMOBA_CONFIGS = [BenchConfig("flashmoba", 2, 16, 1024 * n, 128, 128, 8) for n in (8, 16, 32, 64, 128, 256, 512)]
# --smoke: CPU + Triton interpreter, only to exercise this script.
SMOKE_CONFIGS = [BenchConfig("smoke", 1, 2, 128, 64, 32, 2), BenchConfig("smoke", 1, 2, 192, 64, 32, 3)]


# ----------------------------------------------------------------------------------------------------------------------
# Work accounting
# ----------------------------------------------------------------------------------------------------------------------
def dense_causal_pairs(len_q: int, len_k: int) -> int:
    """Attended (query, key) pairs of bottom-right causal attention for one (batch, head)."""
    return len_q * (len_k - len_q) + len_q * (len_q + 1) // 2


def own_chunk_pairs(len_q: int, len_k: int, chunk: int) -> int:
    """Pairs inside each row's own chunk, counted causally (``p % C + 1`` keys for the row at position ``p``)."""
    p = torch.arange(len_k - len_q, len_k, dtype=torch.int64)
    return int((p % chunk + 1).sum())


def moba_pairs(sel: torch.Tensor, len_q: int, len_k: int, chunk: int) -> int:
    """Attended pairs of a MoBA call over all (batch, head): own chunk causally + ``C`` per selected earlier chunk.

    Earlier chunks are always complete (the partial last chunk is nobody's earlier chunk).
    """
    b, h = sel.shape[0], sel.shape[1]
    return b * h * own_chunk_pairs(len_q, len_k, chunk) + chunk * int((sel >= 0).sum())


def expected_moba_pairs(cfg: BenchConfig) -> int:
    """Pairs if every row selects ``min(K-1, own chunk index)`` earlier chunks (what the gate does); no GPU needed."""
    n, c, k = cfg.seq_len, cfg.chunk_size, cfg.topk
    own = torch.arange(n, dtype=torch.int64) // c
    selected = own.clamp(max=k - 1)
    return cfg.batch * cfg.heads * (own_chunk_pairs(n, n, c) + c * int(selected.sum()))


def estimate_memory(cfg: BenchConfig) -> dict[str, float]:
    """Rough GiB needed by the MoBA forward (inputs, output, the residual of its running output, gate/flip arrays) and
    Flex's block mask; ``moba_extra_pct``: the forward's scratch peak (beyond ``out`` and ``lse``) in percent of q, k,
    v and out."""
    b, h, n, d, c, k = cfg.batch, cfg.heads, cfg.seq_len, cfg.head_dim, cfg.chunk_size, cfg.topk
    km1 = min(k - 1, (n - 1) // c)
    inputs = (h + 2 * cfg.heads_kv) * b * n * d * 2
    out = b * h * n * d * 2 + b * h * n * 4
    entries = b * h * n * km1
    index = entries * 4 * 3  # the slot-major selection, ranks, lists (int32)
    per_element = {"int8": 1, "bf16": 2}[cfg.residual]
    residual = b * h * n * d * per_element if km1 > 0 else 0  # the residual of the running output
    # The selection and ranks are freed before the residual is allocated: the peak is the larger of the flip (all
    # three index arrays) and the attention passes (residual plus the lists).
    peak_extra = max(index, residual + entries * 4)
    n_blocks = -(-n // c)
    flex_mask = 4 * b * h * n_blocks * n_blocks * 4  # partial + full kv indices and their q-major transposes (int32)
    # Backward (default mode): dq/dk/dv, the fp32 dQ buffer, fp32 Delta and log2 LSE, the recomputed gate and flip.
    backward = inputs + b * h * n * d * 4 + 2 * b * h * n * 4 + index  # (both routings store a selection per head)
    return {
        "inputs_gib": inputs / GiB,
        "moba_extra_gib": (out + peak_extra) / GiB,
        "moba_extra_pct": 100 * peak_extra / (inputs + b * h * n * d * 2),
        "moba_backward_extra_gib": backward / GiB,
        "flex_block_mask_gib": flex_mask / GiB,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------------------
def peak_gib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak allocated GiB during one call of ``fn``, above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / GiB


def kernel_breakdown(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Device milliseconds per kernel name of one run of ``fn`` (``torch.profiler``, after one unprofiled warm-up),
    largest first. Self device time, so nested ranges are not counted twice."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    times: dict[str, float] = {}
    for event in prof.key_averages():
        us = float(getattr(event, "self_device_time_total", 0.0) or 0.0)
        if us > 0:
            times[event.key] = times.get(event.key, 0.0) + us / 1e3
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------------------------------------------------
# FlexAttention with a MoBA block mask
# ----------------------------------------------------------------------------------------------------------------------
def flex_moba_block_mask(sel: torch.Tensor, len_q: int, len_k: int, chunk: int) -> Any:
    """A ``BlockMask`` (block size = chunk) for the MoBA selection ``sel [B, H, Lq, K-1]`` (``-1`` = unused).

    Block (query block, key chunk) is active when any row of the query block chose the chunk, or it is the rows' own
    chunk; it is "full" (no ``mask_mod`` call) when every row of the block chose it. ``mask_mod`` applies the exact
    per-token rule: own chunk causally, or the key's chunk among the row's ``K-1`` slots (pointwise comparisons, so no
    ``[B, H, Lq, N]`` tensor is built).
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, h, lq, km1 = sel.shape
    dev = sel.device
    n_kb = -(-len_k // chunk)
    off = len_k - len_q
    n_qb = -(-len_q // chunk)
    rows = torch.arange(lq, device=dev)
    qb = (rows // chunk).view(1, 1, lq, 1).expand(b, h, lq, km1)
    # counts[b, h, query block, chunk] = rows of the block that chose the chunk (column n_kb soaks up the -1 slots).
    flat = (qb * (n_kb + 1) + torch.where(sel < 0, n_kb, sel).long()).flatten(2)
    counts = torch.zeros(b, h, n_qb * (n_kb + 1), dtype=torch.int32, device=dev)
    counts.scatter_add_(-1, flat, torch.ones_like(flat, dtype=torch.int32))
    counts = counts.view(b, h, n_qb, n_kb + 1)[..., :n_kb]
    rows_per_qb = torch.bincount(rows // chunk, minlength=n_qb).to(torch.int32)
    full = counts == rows_per_qb.view(1, 1, n_qb, 1)
    partial = (counts > 0) & ~full
    # Own chunks (causal, so always partial): the key chunks holding the positions of each query block's rows.
    first_own = (off + torch.arange(n_qb, device=dev) * chunk) // chunk
    last_own = (off + torch.clamp((torch.arange(n_qb, device=dev) + 1) * chunk, max=lq) - 1) // chunk
    kb = torch.arange(n_kb, device=dev)
    own = (kb.view(1, -1) >= first_own.view(-1, 1)) & (kb.view(1, -1) <= last_own.view(-1, 1))
    partial = partial | own.view(1, 1, n_qb, n_kb)
    full = full & ~own.view(1, 1, n_qb, n_kb)

    def to_indices(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = active.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~active).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, idx

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)
    sel_c = sel.contiguous()

    def mask_mod(bi, hi, q_idx, kv_idx):  # noqa: ANN001, ANN202 - FlexAttention callback
        c = kv_idx // chunk
        p = q_idx + off
        keep = (c == p // chunk) & (kv_idx <= p)
        for j in range(km1):
            keep = keep | (sel_c[bi, hi, q_idx, j] == c)
        return keep

    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(chunk, chunk), mask_mod=mask_mod, seq_lengths=(len_q, len_k)
    )


# ----------------------------------------------------------------------------------------------------------------------
# One configuration
# ----------------------------------------------------------------------------------------------------------------------
def run_config(cfg: BenchConfig, args: argparse.Namespace, device: torch.device, flex_fn: Any) -> dict[str, Any]:
    """Measure one configuration; failures (OOM, compile errors) are recorded in ``errors``, never papered over."""
    from moba_compile import reference
    from moba_compile.kernels import flip_selection, moba_backward_triton, moba_forward_triton, select_chunks_triton

    b, h, n, d, c, k = cfg.batch, cfg.heads, cfg.seq_len, cfg.head_dim, cfg.chunk_size, cfg.topk
    hkv, routing, residual = cfg.heads_kv, cfg.routing, cfg.residual
    gqa = hkv != h
    dtype = torch.bfloat16
    row: dict[str, Any] = {**asdict(cfg), "name": cfg.name, "dtype": "bfloat16", "errors": {}}
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen)
    key = torch.randn(b, hkv, n, d, device=device, dtype=dtype, generator=gen)
    val = torch.randn(b, hkv, n, d, device=device, dtype=dtype, generator=gen)
    scale = 1.0 / math.sqrt(d)

    record = field_recorder(row, device)

    # Gate (means + fused top-k) and index flip.
    sel_holder: dict[str, torch.Tensor] = {}
    mask_holder: dict[str, Any] = {}

    def gate() -> torch.Tensor:
        return select_chunks_triton(q, key, c, k, routing=routing)

    def measure_gate() -> float:
        sel_holder["sel"] = gate()
        return time_ms(gate, device, args.warmup, args.rep)

    record("gating_ms", measure_gate)
    sel = sel_holder.get("sel")
    if sel is not None and k > 1:
        block_m = 128  # the forward's tile for D=128 on CUDA; the flip cost hardly depends on it
        record(
            "flip_ms",
            lambda: time_ms(lambda: flip_selection(sel, hkv, -(-n // c), block_m), device, args.warmup, args.rep),
        )
    else:
        row["flip_ms"] = None

    # Forward.
    fwd = lambda: moba_forward_triton(q, key, val, c, k, scale, routing=routing, residual=residual)  # noqa: E731
    record("forward_ms", lambda: time_ms(fwd, device, args.warmup, args.rep))
    record("forward_peak_gib", lambda: peak_gib(fwd, device))

    # Dense causal SDPA (Lq == Lk, so is_causal is MoBA's bottom-right causality).
    dense = lambda: F.scaled_dot_product_attention(q, key, val, is_causal=True, scale=scale, enable_gqa=gqa)  # noqa: E731
    record("dense_ms", lambda: time_ms(dense, device, args.warmup, args.rep))
    record("dense_peak_gib", lambda: peak_gib(dense, device))

    # Backward and training step (forward + backward), MoBA launchers versus dense SDPA autograd, same run.
    training_fields = ("backward_ms", "backward_deterministic_ms", "fwd_bwd_ms", "fwd_bwd_peak_gib",
                       "dense_backward_ms", "dense_fwd_bwd_ms", "dense_fwd_bwd_peak_gib")  # fmt: skip
    if n > args.backward_max_len:  # the forward-only tail of a sweep (dense backward alone takes minutes at 512K)
        for field in training_fields:
            row[field] = None
            row["errors"][field] = f"skipped: N={n} > --backward-max-len {args.backward_max_len}"
    else:
        d_out = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen)
        saved: dict[str, Any] = {}
        bwd_kw = {"routing": routing}

        def measure_backward(deterministic: bool) -> float:
            if "fwd" not in saved:
                saved["fwd"] = fwd()
            out, lse = saved["fwd"]

            def bwd() -> Any:
                return moba_backward_triton(
                    d_out, q, key, val, out, lse, c, k, scale, deterministic=deterministic, **bwd_kw
                )

            return time_ms(bwd, device, args.warmup, args.rep)

        def fwd_bwd() -> Any:
            out, lse = fwd()
            # The library's default mode (deterministic=None): dQ atomics unless torch's deterministic switch is on.
            return moba_backward_triton(d_out, q, key, val, out, lse, c, k, scale, **bwd_kw)

        record("backward_ms", lambda: measure_backward(False))
        record("backward_deterministic_ms", lambda: measure_backward(True))
        saved.clear()
        record("fwd_bwd_ms", lambda: time_ms(fwd_bwd, device, args.warmup, args.rep))
        record("fwd_bwd_peak_gib", lambda: peak_gib(fwd_bwd, device))
        if (
            device.type == "cuda"
        ):  # where the fwd+bwd time goes, kernel by kernel (one profiled run): the next tuning's map
            record("fwd_bwd_kernels_ms", lambda: kernel_breakdown(fwd_bwd, device))
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, key, val))

        def dense_fwd_bwd() -> Any:
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale, enable_gqa=gqa)
            return torch.autograd.grad(o, (qg, kg, vg), d_out)

        def measure_dense_backward() -> float:
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale, enable_gqa=gqa)
            return time_ms(lambda: torch.autograd.grad(o, (qg, kg, vg), d_out, retain_graph=True), device, args.warmup,
                           args.rep)  # fmt: skip

        record("dense_backward_ms", measure_dense_backward)
        record("dense_fwd_bwd_ms", lambda: time_ms(dense_fwd_bwd, device, args.warmup, args.rep))
        record("dense_fwd_bwd_peak_gib", lambda: peak_gib(dense_fwd_bwd, device))

    # FlexAttention with the MoBA block mask built from this run's selection.
    if args.no_flex:
        row["flex_ms"] = None
        row["errors"]["flex_ms"] = "skipped (--no-flex)"
    elif n > args.flex_max_len:
        row["flex_ms"] = None
        row["errors"]["flex_ms"] = f"skipped: N={n} > --flex-max-len {args.flex_max_len}"
    elif sel is None:
        row["flex_ms"] = None
        row["errors"]["flex_ms"] = "skipped: no gate selection"
    else:

        def measure_flex() -> float:
            mask_holder["mask"] = flex_moba_block_mask(sel, n, n, c)
            fn = lambda: flex_fn(q, key, val, block_mask=mask_holder["mask"], scale=scale, enable_gqa=gqa)  # noqa: E731
            fn()  # compile outside the timed region
            return time_ms(fn, device, args.warmup, args.rep)

        record("flex_ms", measure_flex)
        if "mask" in mask_holder:
            flex_call = lambda: flex_fn(  # noqa: E731
                q, key, val, block_mask=mask_holder["mask"], scale=scale, enable_gqa=gqa
            )
            record("flex_peak_gib", lambda: peak_gib(flex_call, device))

    # FlashMoBA (--flashmoba; optional and benchmark-only, benchmarks/flashmoba.py) on the same tensors, same run.
    if getattr(args, "flashmoba", False):
        from benchmarks import flashmoba

        skip_bwd = f"skipped: N={n} > --backward-max-len {args.backward_max_len}" if n > args.backward_max_len else None
        flashmoba.record_columns(
            row, record, q, key, val, chunk_size=c, topk=k, scale=scale, routing=routing,
            time_ms=lambda fn: time_ms(fn, device, args.warmup, args.rep), peak_gib=lambda fn: peak_gib(fn, device),
            backward=skip_bwd, check_len=n <= args.check_max_len, our_sel=sel,
        )  # fmt: skip

    # Work accounting from the actual selection.
    row["dense_pairs"] = b * h * dense_causal_pairs(n, n)
    row["useful_pairs"] = moba_pairs(sel, n, n, c) if sel is not None else None
    row["density"] = row["useful_pairs"] / row["dense_pairs"] if row["useful_pairs"] else None
    flops_per_pair = 4 * d
    row["dense_tflops"] = (
        flops_per_pair * row["dense_pairs"] / (row["dense_ms"] * 1e-3) / 1e12 if row.get("dense_ms") else None
    )
    if row.get("dense_ms") and row["useful_pairs"]:
        rate = flops_per_pair * row["dense_pairs"] / (row["dense_ms"] * 1e-3)  # FLOP/s of dense SDPA in this run
        row["ideal_ms"] = flops_per_pair * row["useful_pairs"] / rate * 1e3
    else:
        row["ideal_ms"] = None
    fwd_ms = row.get("forward_ms")
    row["ratio_to_ideal"] = fwd_ms / row["ideal_ms"] if fwd_ms and row["ideal_ms"] else None
    row["useful_tflops"] = (
        flops_per_pair * row["useful_pairs"] / (fwd_ms * 1e-3) / 1e12 if fwd_ms and row["useful_pairs"] else None
    )
    row["speedup_vs_dense"] = row["dense_ms"] / fwd_ms if fwd_ms and row.get("dense_ms") else None
    # Training: a backward is 2.5 forwards of matmul work (5 matmuls against 2), so fwd+bwd = 3.5 x the forward FLOPs.
    # Ideal = useful fwd+bwd FLOPs at the dense SDPA fwd+bwd FLOP rate of this run.
    train_flops = 3.5 * flops_per_pair
    if row.get("dense_fwd_bwd_ms") and row["useful_pairs"]:
        train_rate = train_flops * row["dense_pairs"] / (row["dense_fwd_bwd_ms"] * 1e-3)
        row["ideal_fwd_bwd_ms"] = train_flops * row["useful_pairs"] / train_rate * 1e3
    else:
        row["ideal_fwd_bwd_ms"] = None
    fb_ms = row.get("fwd_bwd_ms")
    row["fwd_bwd_ratio_to_ideal"] = fb_ms / row["ideal_fwd_bwd_ms"] if fb_ms and row["ideal_fwd_bwd_ms"] else None
    row["fwd_bwd_speedup_vs_dense"] = row["dense_fwd_bwd_ms"] / fb_ms if fb_ms and row.get("dense_fwd_bwd_ms") else None
    row["fwd_bwd_peak_vs_dense"] = (
        row["fwd_bwd_peak_gib"] / row["dense_fwd_bwd_peak_gib"]
        if row.get("fwd_bwd_peak_gib") and row.get("dense_fwd_bwd_peak_gib")
        else None
    )

    # Correctness spot check against the reference (short sequences only: the reference is plain PyTorch).
    if n <= args.check_max_len and row.get("forward_ms") is not None:

        def check() -> dict[str, float]:
            out, lse = fwd()
            ref_kw = {"chunk_size": c, "topk": k, "scale": scale, "routing": routing}
            ref_out, ref_lse = reference.moba_attention_forward(q, key, val, **ref_kw)
            ref_sel = reference.select_chunks(q, key, chunk_size=c, topk=k, routing=routing)
            same = (sel.long().sort(-1).values == ref_sel.sort(-1).values).all(-1) if sel is not None else None
            result = {
                "max_abs_err_vs_reference": (out.float() - ref_out.float()).abs().max().item(),
                "max_lse_err_vs_reference": (lse - ref_lse).abs().max().item(),
                "gate_rows_equal_fraction": same.float().mean().item() if same is not None else float("nan"),
                "reference_max_abs": ref_out.float().abs().max().item(),
            }
            # Backward: the kernel's gradients against the reference's formulas on the same (out, lse), where the
            # backward is measured (above --backward-max-len the forward is still checked).
            if n <= args.backward_max_len:
                grads = moba_backward_triton(d_out, q, key, val, out, lse, c, k, scale, **bwd_kw)
                ref_grads = reference.moba_attention_backward(d_out, q, key, val, out, lse, **ref_kw)
                for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
                    result[f"max_abs_{name}_err_vs_reference"] = (got.float() - ref.float()).abs().max().item()
                    result[f"reference_{name}_max_abs"] = ref.float().abs().max().item()
            if "mask" in mask_holder:  # the FlexAttention baseline must compute the same MoBA attention
                flex_out = flex_fn(q, key, val, block_mask=mask_holder["mask"], scale=scale, enable_gqa=gqa)
                result["flex_max_abs_err_vs_reference"] = (flex_out.float() - ref_out.float()).abs().max().item()
            return result

        record("check", check)
    sel_holder.clear()
    mask_holder.clear()
    release(device)
    return row


# ----------------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------------
def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'config':<44} {'gate':>8} {'flip':>8} {'fwd':>9} {'dense':>9} {'flex':>9} {'ideal':>9} {'fwd/ideal':>9} "
        f"{'TFLOP/s':>8} {'peakGiB':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = [
            fmt_or_dash(r.get("gating_ms"), ".3f").rjust(8),
            fmt_or_dash(r.get("flip_ms"), ".3f").rjust(8),
            fmt_or_dash(r.get("forward_ms"), ".3f").rjust(9),
            fmt_or_dash(r.get("dense_ms"), ".3f").rjust(9),
            fmt_or_dash(r.get("flex_ms"), ".3f").rjust(9),
            fmt_or_dash(r.get("ideal_ms"), ".3f").rjust(9),
            fmt_or_dash(r.get("ratio_to_ideal"), ".2f").rjust(9),
            fmt_or_dash(r.get("useful_tflops"), ".1f").rjust(8),
            fmt_or_dash(r.get("forward_peak_gib"), ".2f").rjust(8),
        ]
        print(f"{r['name']:<44} " + " ".join(cells))
        for field, err in r.get("errors", {}).items():
            print(f"    {field}: {err}")
    print("times in ms (median); ideal = useful FLOPs (4*D per attended pair) at this run's dense SDPA FLOP rate")
    print()
    head = (
        f"{'config':<44} {'bwd':>9} {'bwd det':>9} {'dense bwd':>9} {'fwd+bwd':>9} {'dense f+b':>9} {'ideal f+b':>9} "
        f"{'f+b/ideal':>9} {'peakGiB':>8} {'densePk':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = [
            fmt_or_dash(r.get("backward_ms"), ".3f").rjust(9),
            fmt_or_dash(r.get("backward_deterministic_ms"), ".3f").rjust(9),
            fmt_or_dash(r.get("dense_backward_ms"), ".3f").rjust(9),
            fmt_or_dash(r.get("fwd_bwd_ms"), ".3f").rjust(9),
            fmt_or_dash(r.get("dense_fwd_bwd_ms"), ".3f").rjust(9),
            fmt_or_dash(r.get("ideal_fwd_bwd_ms"), ".3f").rjust(9),
            fmt_or_dash(r.get("fwd_bwd_ratio_to_ideal"), ".2f").rjust(9),
            fmt_or_dash(r.get("fwd_bwd_peak_gib"), ".2f").rjust(8),
            fmt_or_dash(r.get("dense_fwd_bwd_peak_gib"), ".2f").rjust(8),
        ]
        print(f"{r['name']:<44} " + " ".join(cells))
    print("training: fwd+bwd of the MoBA launchers vs dense SDPA autograd; ideal f+b = 3.5 x useful forward FLOPs at")
    print("this run's dense SDPA fwd+bwd FLOP rate; peak = GiB allocated above the inputs during one fwd+bwd")
    from benchmarks import flashmoba

    flashmoba.print_table(rows)  # only rows measured with --flashmoba


def write_results(rows: list[dict[str, Any]], env: dict[str, Any], path: Path, *, with_plot: bool = True) -> Path:
    """Write the JSON to ``path`` (and a PNG beside it when asked and matplotlib is available); returns ``path``."""
    payload = {
        "benchmark": "moba forward, backward and fwd+bwd (benchmarks/attention.py)",
        "timing": "median of triton.testing.do_bench (CUDA events), milliseconds",
        "useful_work": "4 * head_dim FLOPs per attended (query, key) pair; own chunk counted causally",
        "ideal": "useful FLOPs at the dense causal SDPA FLOP rate measured in the same run",
        "ideal_fwd_bwd": "3.5 x useful forward FLOPs at the dense SDPA fwd+bwd FLOP rate measured in the same run",
        "environment": env,
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2, default=str))
    if with_plot:
        plot(rows, env, path.with_suffix(".png"))
    return path


def plot(rows: list[dict[str, Any]], env: dict[str, Any], path: Path) -> None:
    """Times per configuration: the FlashMoBA-setting sweep (log-log over N; FlashMoBA's own times dashed where the run
    measured them with ``--flashmoba``) and the spec table (bars), each panel only where there are rows. Needs
    matplotlib; without it, says so and draws nothing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    series = ("forward_ms", "gating_ms", "dense_ms", "flex_ms", "ideal_ms", "fwd_bwd_ms", "dense_fwd_bwd_ms",
              "ideal_fwd_bwd_ms")  # fmt: skip
    sweep = [r for r in rows if r["suite"] == "flashmoba"]
    table = [r for r in rows if r["suite"] != "flashmoba"]
    panels = [(kind, selected) for kind, selected in (("sweep", sweep), ("table", table)) if selected]
    if not panels:
        return
    widths = [6.5 if kind == "sweep" else max(6.5, 1.2 * len(selected)) for kind, selected in panels]  # inches
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), 5), squeeze=False, width_ratios=widths)
    for ax, (kind, selected) in zip(axes[0], panels, strict=True):
        if kind == "sweep":
            for field in (*series, "flashmoba_fwd_ms", "flashmoba_fwd_bwd_ms"):
                pts = [(r["seq_len"], r[field]) for r in selected if r.get(field)]
                if pts:
                    style = "--" if field.startswith("flashmoba") else "-"
                    ax.plot(*zip(*pts, strict=True), style, marker="o", label=field.removesuffix("_ms"))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_title("FlashMoBA setting: B=2, H=16, D=128, C=128, K=8")
        else:
            width = 0.8 / len(series)
            for i, field in enumerate(series):
                xs = [j + i * width for j, r in enumerate(selected) if r.get(field)]
                ys = [r[field] for r in selected if r.get(field)]
                if xs:
                    ax.bar(xs, ys, width=width, label=field.removesuffix("_ms"))
            ax.set_xticks([j + 0.4 for j in range(len(selected))])
            labels = [
                f"N={r['seq_len'] // 1024}K\nC={r['chunk_size']} K={r['topk']}"
                + ("" if r.get("residual", "int8") == "int8" else f"\n{r['residual']} residual")
                for r in selected
            ]
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_title("spec table: B=1, H=32, D=128")
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"MoBA forward and fwd+bwd, bf16 - {env.get('gpu') or env.get('device')} - torch {env['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (no GPU needed)
# ----------------------------------------------------------------------------------------------------------------------
# Integer arguments a launch sees divisible by 16 (the usual strides of contiguous tensors, and C).
_DIV16 = {"sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh", "som", "C"}
_DIV16 |= {"sdob", "sdoh", "sdom", "stb", "sth", "sdqb", "sdqh", "sdqm"}  # backward: dO, Delta/LSE and dQ strides


def _backward_variants(d: int) -> list[tuple[str, Any, dict[str, str], dict[str, Any], int, int]]:
    """The backward kernels at the launcher's CUDA configurations (bf16, head dim ``d``), names ``bwd_*``."""
    from moba_compile.kernels import backward as bw

    io = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "do_ptr": "*bf16", "o_ptr": "*bf16", "mask_ptr": "*u8",
          "lse_ptr": "*fp32", "lse2_ptr": "*fp32", "delta_ptr": "*fp32", "dq_ptr": "*fp32", "dk_ptr": "*bf16",
          "dv_ptr": "*bf16", "seg_start_ptr": "*i64"}  # fmt: skip
    out: list[tuple[str, Any, dict[str, str], dict[str, Any], int, int]] = []
    out.append(("bwd_preprocess", bw._bwd_preprocess_kernel, io, {"HEAD_DV": d, "BLOCK_M": 64, "sod": 1, "sdod": 1},
                4, 1))  # fmt: skip
    for has_mask in (False, True):
        cfg = bw._bwd_config(d, d, torch.bfloat16, has_mask)
        tag = "mask" if has_mask else "nomask"
        base = {"HEAD_D": d, "HEAD_DV": d, "HAS_MASK": has_mask, "UPCAST": False, "DOT_PREC": "tf32", "sqd": 1,
                "skd": 1, "svd": 1, "sdod": 1}  # fmt: skip
        for atomic in (True, False):
            consts = {**base, "BLOCK_M": cfg.kv_block_m, "BLOCK_N": cfg.kv_block_n, "HAS_LIST": True,
                      "ATOMIC_DQ": atomic, "STAT_DUP": bw.stat_dup(cfg.kv_block_m, cfg.kv_warps),
                      "OFFS32": True}  # fmt: skip
            name = f"bwd_dkdv-{tag}-{'atomic_dq' if atomic else 'det'}"
            ptrs = {**io, "dq_ptr": "*fp32"}
            out.append((name, bw._bwd_dkdv_kernel, ptrs, consts, cfg.kv_warps, cfg.kv_stages))
        consts = {**base, "BLOCK_M": cfg.dq_block_m, "BLOCK_N": cfg.dq_block_n}
        out.append((f"bwd_sparse_dq-{tag}", bw._bwd_sparse_dq_kernel, io, consts, cfg.dq_warps, cfg.dq_stages))
        out.append((f"bwd_own_dq-{tag}", bw._bwd_own_dq_kernel, io, consts, cfg.dq_warps, cfg.dq_stages))
    return out


def compile_check(arch: int = 90, head_dim: int = 128, prefix: str | None = None) -> list[dict[str, Any]]:
    """Compile every kernel (gate, forward, backward) at the launchers' CUDA configurations for ``sm_<arch>``.

    bf16, ``head_dim``. Runs on a machine without a GPU (Triton's bundled compiler and ptxas); must not run under
    TRITON_INTERPRET. ``prefix`` keeps only the variants whose name starts with it (e.g. ``"bwd_"``).
    Returns one record per variant: name, config, shared memory, registers, spill bytes (``None`` without ptxas).
    """
    require_compiled_kernels()
    from moba_compile.kernels import forward as fw
    from moba_compile.kernels import gating as gt

    d = head_dim
    variants: list[tuple[str, Any, dict[str, str], dict[str, Any], int, int]] = []
    variants.append(("chunk_means", gt._chunk_means_kernel, {"k_ptr": "*bf16", "means_ptr": "*fp32"},
                     {"HEAD_D": d, "BLOCK_N": 64, "skd": 1}, 4, 2))  # fmt: skip
    for km1 in (2, 7, 63):
        for dtype, split, prec in (("bf16", True, "tf32"), ("fp16", False, "tf32x3")):
            g = gt._gate_config(d, 1024, km1, dtype == "bf16")
            for group in (False, True):  # head routing, and group routing (spec 6: one top-k per key head)
                consts = {"HEAD_D": d, "BLOCK_M": g.block_m, "BLOCK_C": g.block_c, "TOP": g.top, "SPLIT_BF16": split,
                          "UPCAST": False, "DOT_PREC": prec, "GROUP": group, "sqd": 1}  # fmt: skip
                ptrs = {"q_ptr": f"*{dtype}", "means_ptr": "*fp32", "sel_ptr": "*i32"}
                name = f"gate-{dtype}-K{km1 + 1}{'-group' if group else ''}"
                stages = 1 if group else g.num_stages  # as gating._launch_gate
                variants.append((name, gt._gate_kernel, ptrs, consts, g.num_warps, stages))
    flip_ptrs = {"seg_start_ptr": "*i64"}
    variants.append(("flip_count", gt._flip_count_kernel, flip_ptrs, {"BLOCK": 1024}, 4, 1))
    variants.append(("flip_scatter", gt._flip_scatter_kernel, flip_ptrs, {"BLOCK": 1024}, 4, 1))
    io = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*u8", "lo_ptr": "*i8",
          "out_ptr": "*bf16", "lse_ptr": "*fp32", "seg_start_ptr": "*i64"}  # fmt: skip
    bf16 = torch.bfloat16
    int8_lo = {"LO_MANT": fw.residual_mantissa_bits(bf16), "LO_E_LO": fw.residual_exponent_floor(bf16)}
    # The default (int8) residual under the plain names; the bf16 residual (residual="bf16") unmasked, "-bf16_lo".
    for has_mask, residual in ((False, "int8"), (True, "int8"), (False, "bf16")):
        cfg = fw._fwd_config(d, d, torch.bfloat16, has_mask)
        consts = {"HEAD_D": d, "HEAD_DV": d, "HAS_MASK": has_mask, "HAS_LO": True, "UPCAST": False,
                  "DOT_PREC": "tf32", "sqd": 1, "skd": 1, "svd": 1}  # fmt: skip
        consts.update(int8_lo if residual == "int8" else {"LO_MANT": 0, "LO_E_LO": 0})
        ptrs = io if residual == "int8" else {**io, "lo_ptr": "*bf16"}
        tag = ("mask" if has_mask else "nomask") + ("" if residual == "int8" else "-bf16_lo")
        short = fw._fwd_config(d, d, torch.bfloat16, has_mask, chunk_size=512)  # chunks below 1024: own tiles
        tiles = {
            "key_major": (cfg.sparse(), {"PREFETCH_STATE": bool(cfg.sp_prefetch)}),
            "key_major_short": (short.sparse(), {"PREFETCH_STATE": bool(short.sp_prefetch)}),
            "own_chunk": ((cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages), {}),
            "own_chunk_short": ((short.block_m, short.block_n, short.num_warps, short.num_stages), {}),
        }
        kernels = {"key_major": fw._sparse_fwd_kernel, "key_major_short": fw._sparse_fwd_kernel}
        for kname, ((bm, bn, warps, stages), extra) in tiles.items():
            kern = kernels.get(kname, fw._own_fwd_kernel)
            kconsts = {**consts, **extra, "BLOCK_M": bm, "BLOCK_N": bn}
            variants.append((f"{kname}-{tag}", kern, ptrs, kconsts, warps, stages))
    variants += _backward_variants(d)
    if prefix is not None:
        variants = [v for v in variants if v[0].startswith(prefix)]
    return compile_variants(variants, arch, _DIV16, error_chars=300)


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.attention",
        description="Benchmark the MoBA Triton forward against dense causal SDPA and FlexAttention (bf16, GPU).",
    )
    p.add_argument("--suite", choices=("all", "spec", "flashmoba"), default="all", help="which configurations")
    p.add_argument("--max-len", type=int, default=1 << 20, help="skip configurations longer than this")
    p.add_argument("--min-len", type=int, default=0, help="skip configurations shorter than this")
    p.add_argument("--flex-max-len", type=int, default=131072, help="run FlexAttention only up to this length")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument(
        "--flashmoba",
        action="store_true",
        help="also time FlashMoBA on the same tensors (optional, benchmark-only: benchmarks/flashmoba_build.sh)",
    )
    p.add_argument(
        "--backward-max-len", type=int, default=1 << 20, help="measure backward and training columns up to this length"
    )
    p.add_argument("--check-max-len", type=int, default=8192, help="compare with the reference up to this length")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup budget, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measurement budget, ms")
    p.add_argument("--out-dir", type=Path, default=None, help=f"where to write JSON/PNG (default {RESULTS_DIR})")
    p.add_argument("--dry-run", action="store_true", help="print the plan (shapes, work, memory) and exit; no GPU")
    p.add_argument(
        "--compile-check",
        action="store_true",
        help="compile every kernel for sm_90 (H100) without a GPU and print registers/spills; exit 1 on failure",
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU via TRITON_INTERPRET=1; writes only to --out-dir"
    )
    p.add_argument("--table-from", type=Path, nargs="+", default=None,
                   help="print the tables and draw the PNG of results JSON files (their rows merged in order; the PNG "
                        "beside the first)")  # fmt: skip
    p.add_argument(
        "--routing",
        choices=("head", "group", "both"),
        default="head",
        help="the gate's routing; 'both' runs every shape with head then group routing in the same run",
    )
    p.add_argument(
        "--residual",
        choices=("int8", "bf16", "both"),
        default="int8",
        help="how the forward stores its running output's residual (int8: the default, 1 byte per output element; "
        "bf16: 2); 'both' runs every shape with int8 then bf16 in the same run",
    )
    p.add_argument(
        "--kv-heads",
        type=int,
        default=None,
        help="key/value heads (GQA/MQA, dividing every shape's query heads); default: as many as query heads (MHA), "
        "where group routing is head routing",
    )
    return p.parse_args(argv)


def select_configs(args: argparse.Namespace) -> list[BenchConfig]:
    configs = []
    if args.smoke:  # the length window applies to the smoke shapes too
        configs += SMOKE_CONFIGS
    else:
        if args.suite in ("all", "spec"):
            configs += SPEC_CONFIGS
        if args.suite in ("all", "flashmoba"):
            configs += FLASHMOBA_CONFIGS
    configs = [c for c in configs if args.min_len <= c.seq_len <= args.max_len]
    configs = with_routing(configs, getattr(args, "routing", "head"), getattr(args, "kv_heads", None))
    return with_residual(configs, getattr(args, "residual", "int8"))


def with_residual(configs: list[BenchConfig], residual: str) -> list[BenchConfig]:
    """``configs`` with the forward's ``residual`` (``"both"``: each shape with int8, then bf16, side by side).

    Example:
        >>> [c.name for c in with_residual(SMOKE_CONFIGS[:1], "both")]
        ['smoke-B1-H2-N128-D64-C32-K2', 'smoke-B1-H2-N128-D64-C32-K2-res_bf16']
    """
    residuals = ("int8", "bf16") if residual == "both" else (residual,)
    return [dataclasses.replace(cfg, residual=r) for cfg in configs for r in residuals]


def with_routing(configs: list[BenchConfig], routing: str, kv_heads: int | None) -> list[BenchConfig]:
    """``configs`` with ``kv_heads`` key/value heads and the gate's ``routing`` (``"both"``: each shape with head,
    then group routing, side by side in the run's rows).

    Raises:
        SystemExit: ``kv_heads`` does not divide a shape's query heads.

    Example:
        >>> [c.name for c in with_routing(SMOKE_CONFIGS[:1], "both", 1)]
        ['smoke-B1-H2-N128-D64-C32-K2-Hkv1', 'smoke-B1-H2-N128-D64-C32-K2-Hkv1-group']
    """
    routings = ("head", "group") if routing == "both" else (routing,)
    out = []
    for cfg in configs:
        if kv_heads is not None and (kv_heads < 1 or cfg.heads % kv_heads):
            raise SystemExit(f"--kv-heads {kv_heads} does not divide the {cfg.heads} query heads of {cfg.name}")
        for r in routings:
            out.append(dataclasses.replace(cfg, kv_heads=kv_heads, routing=r))
    return out


def dry_run(configs: list[BenchConfig]) -> None:
    print(f"{'config':<52} {'chunks':>6} {'dense TFLOP':>11} {'MoBA TFLOP':>10} {'density':>8} {'inputs GiB':>10} "
          f"{'MoBA+ GiB':>9} {'fwd+ %':>6} {'bwd+ GiB':>8} {'flex mask GiB':>13}")  # fmt: skip
    for cfg in configs:
        dense = 4 * cfg.head_dim * cfg.batch * cfg.heads * dense_causal_pairs(cfg.seq_len, cfg.seq_len)
        useful = 4 * cfg.head_dim * expected_moba_pairs(cfg)
        mem = estimate_memory(cfg)
        print(
            f"{cfg.name:<52} {-(-cfg.seq_len // cfg.chunk_size):>6} {dense / 1e12:>11.2f} {useful / 1e12:>10.2f} "
            f"{useful / dense:>8.3f} {mem['inputs_gib']:>10.2f} {mem['moba_extra_gib']:>9.2f} "
            f"{mem['moba_extra_pct']:>6.1f} {mem['moba_backward_extra_gib']:>8.2f} {mem['flex_block_mask_gib']:>13.2f}"
        )
    print(
        "dry run: nothing measured. MoBA TFLOP (forward) assumes each row selects min(K-1, own chunk) earlier chunks;"
    )
    print(
        "fwd+bwd work is 3.5x the forward's. bwd+ GiB: the backward's allocations (grads, fp32 dQ, gate/flip arrays);"
    )
    print("MoBA+ GiB: the forward's output and LSE, plus its scratch peak: the larger of the flip's int32 arrays")
    print("and the residual of the running output (int8, or bf16 under --residual bf16) plus the flip's lists;")
    print("fwd+ %: that scratch peak in percent of q, k, v and out (issue 15's target: <= 25%).")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code."""
    args = parse_args(argv)
    if args.table_from is not None:  # no measurement: the tables and plot of committed runs, rows merged in order
        payloads = [json.loads(path.read_text()) for path in args.table_from]
        rows = [row for payload in payloads for row in payload["rows"]]
        print_table(rows)
        plot(rows, payloads[0]["environment"], args.table_from[0].with_suffix(".png"))
        return 0
    configs = select_configs(args)
    if args.dry_run:
        dry_run(configs)
        return 0
    if args.compile_check:
        records = compile_check()
        code = print_compile_records(records, 26)
        print(json.dumps(records))
        return code
    device = bench_device(args)
    if device is None:
        return 2
    from torch.nn.attention.flex_attention import flex_attention

    if device.type == "cuda":
        from torch import _dynamo

        # One compiled FlexAttention per shape: raise the recompile limit and fail loudly rather than silently running
        # the eager (unfused, O(N^2)-memory) fallback once it is hit.
        _dynamo.config.recompile_limit = 64
        _dynamo.config.fail_on_recompile_limit_hit = True
        flex_fn = torch.compile(flex_attention, dynamic=False)
    else:
        flex_fn = flex_attention
    try:
        from tqdm import tqdm

        iterator = tqdm(configs, desc="configs", unit="cfg")
    except ImportError:
        iterator = configs
    env = environment(device)
    out_dir = args.out_dir if args.out_dir is not None else (None if args.smoke else RESULTS_DIR)
    path = None if out_dir is None else results_path(out_dir, "attention", env)
    rows = []
    for cfg in iterator:
        if hasattr(iterator, "set_postfix_str"):
            iterator.set_postfix_str(cfg.name)
        rows.append(run_config(cfg, args, device, flex_fn))
        if path is not None:  # after every configuration (one file per run): a run cut short keeps what it measured
            write_results(rows, env, path, with_plot=False)
    print_table(rows)
    if path is not None:
        write_results(rows, env, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
