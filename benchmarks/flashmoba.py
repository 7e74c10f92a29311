"""FlashMoBA side by side with our kernels: an optional, benchmark-only column of ``benchmarks.attention``.

FlashMoBA (mit-han-lab/flash-moba, CUDA/CUTLASS; the paper "Optimizing Mixture of Block Attention") is never a
dependency: ``python -m benchmarks.flashmoba_prepare`` copies its source into the ignored ``.flashmoba/`` folder and
narrows it to head dim 128 / bf16 / causal / top-k <= 16, ``bash benchmarks/flashmoba_build.sh`` builds it on the GPU
machine into ``.flashmoba/build/lib``, and this module imports it from there (or from wherever ``flash_moba`` and
``flash_moba_cuda`` are importable). :func:`available` says why it cannot run, and ``benchmarks.attention --flashmoba``
then records that reason instead of numbers.

Layouts. Ours is ``q/k/v [B, H, L, D]``; FlashMoBA's public entry point ``flash_moba_varlen_func(q, k, v,
cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, moba_chunk_size, moba_topk, causal=True)`` takes the packed
variable-length layout ``(B * L, H, D)`` with ``cu_seqlens = [0, L, 2L, ...]`` (int32). :func:`to_varlen` and
:func:`from_varlen` convert (a copy each way); the benchmark converts outside the timed region, so the timings are
FlashMoBA's gate (mean pooling, fused top-k, sort) and attention only, as ours include our gate.

Semantics, read from flash_moba/flash_moba_interface.py and csrc/flash_topk/src/flash_topk_kernel.h (commit 39d9ac0),
against ours (docs/semantics.md, moba-spec section 1):

* Same: top-k counts the query's own chunk (the top-k kernel puts the own chunk in slot 0 with score +inf); the own
  chunk is attended causally; the candidates are the strictly earlier chunks (``(c + 1) * C - 1 < p``, i.e.
  ``c < p // C``); the score is ``q . mean(key[c])`` with no scale and no softmax; ties go to the later chunk (the
  kernel scans chunks from the last down and inserts only on a strictly greater score); fewer than ``K - 1`` earlier
  chunks means all of them; the softmax scale is ``1/sqrt(D)`` (the entry point takes no scale: the benchmark uses
  the same); GQA: one selection per query head from its key head's chunk means, which is our ``routing="head"``.
* Different: the chunk means are rounded to bf16 before the dot product (Triton mean pool in fp32, stored in the input
  dtype; the dot product accumulates in fp32). Ours keeps the means in fp32. Rows whose K-th and (K+1)-th scores are
  within bf16 rounding may therefore choose a different chunk; the benchmark reports the fraction of rows whose chosen
  set equals our gate's (``flashmoba_check.gate_rows_equal_fraction``) and compares FlashMoBA's output with a float64
  reference over FlashMoBA's own selection (like for like) as well as with our float64 reference.
* Not supported by FlashMoBA (the benchmark records the reason): ``routing="group"`` (no group-shared top-k), chunk
  sizes that are not multiples of 64, top-k above 64 (above 16 in our narrowed build), head dims other than 128 and
  dtypes other than bf16 (narrowed build; upstream: fp16/bf16, head dim <= 256), non-causal calls, ``Lq != Lk``
  (not used by the benchmark), boolean masks.
* Cost outside the kernels: the mean pool calls ``.item()`` (one host sync per call), inside the timed region, as in
  any real use of the entry point. Its backward is non-deterministic (dQ atomics, FlashAttention-2 style); ours is
  timed in its default mode too.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.common import fmt_or_dash

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = REPO_ROOT / ".flashmoba" / "flash-moba"  # the prepared source (the Python package flash_moba)
BUILD_LIB = Path(os.environ.get("FLASHMOBA_BUILD", REPO_ROOT / ".flashmoba" / "build")) / "lib"  # flash_moba_cuda
BUILD_HINT = "python -m benchmarks.flashmoba_prepare ... && bash benchmarks/flashmoba_build.sh (docs/benchmarks.md)"

_MODULE: dict[str, Any] = {}


def _api() -> SimpleNamespace:
    """FlashMoBA's two public functions, imported once (``.flashmoba/`` put on ``sys.path`` first if built there)."""
    if "api" not in _MODULE:
        for path in (BUILD_LIB, SOURCE_DIR):
            if path.is_dir() and str(path) not in sys.path:
                sys.path.insert(0, str(path))
        from flash_moba import flash_moba_varlen_func, flash_topk_varlen_func

        _MODULE["api"] = SimpleNamespace(varlen=flash_moba_varlen_func, topk=flash_topk_varlen_func)
    return _MODULE["api"]


def available() -> str | None:
    """``None`` when FlashMoBA can run here, else the reason (no CUDA device, or the package does not import)."""
    if not torch.cuda.is_available():
        return "no CUDA device (FlashMoBA is CUDA-only)"
    try:
        _api()
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to report, not to crash on
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"FlashMoBA not importable ({type(exc).__name__}: {first}); build it: {BUILD_HINT}"
    return None


def unsupported(
    *, head_dim: int, chunk_size: int, topk: int, routing: str, dtype: torch.dtype = torch.bfloat16
) -> str | None:
    """``None`` when FlashMoBA (our narrowed build) computes this configuration, else why not."""
    if routing != "head":
        return f"FlashMoBA routes per query head only (routing={routing!r} has no FlashMoBA equivalent)"
    if dtype != torch.bfloat16 or head_dim != 128:
        return f"this FlashMoBA build has bf16 head dim 128 kernels only (got {dtype}, D={head_dim})"
    if chunk_size % 64:
        return f"FlashMoBA needs a chunk size that is a multiple of 64 (got {chunk_size})"
    if topk > 16:
        return f"this FlashMoBA build has top-k <= 16 only (got {topk}; upstream allows 64)"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Layout conversion (outside the timed region)
# ----------------------------------------------------------------------------------------------------------------------
def to_varlen(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` -> FlashMoBA's packed ``(B * L, H, D)`` (contiguous copy; sequence ``b`` is rows
    ``b*L .. (b+1)*L - 1``)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b * n, h, d).contiguous()


def from_varlen(x: torch.Tensor, batch: int) -> torch.Tensor:
    """FlashMoBA's ``(B * L, H, D)`` -> ``[B, H, L, D]`` (a view; ``.contiguous()`` copies)."""
    total, h, d = x.shape
    return x.view(batch, total // batch, h, d).transpose(1, 2)


def cu_seqlens(batch: int, length: int, device: torch.device | str) -> torch.Tensor:
    """``[0, L, 2L, ..., B*L]`` as int32 (every sequence of the batch has length ``L``)."""
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)


@dataclass
class Varlen:
    """One configuration's tensors in FlashMoBA's layout, made once outside the timed region."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu: torch.Tensor
    batch: int
    length: int

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Varlen:
        b, _, n, _ = q.shape
        return cls(to_varlen(q), to_varlen(k), to_varlen(v), cu_seqlens(b, n, q.device), b, n)


def forward_fn(x: Varlen, chunk_size: int, topk: int) -> Callable[[], torch.Tensor]:
    """The timed forward: gate (mean pool, fused top-k, sort) and attention; packed in, packed out."""
    api = _api()

    def fwd() -> torch.Tensor:
        return api.varlen(x.q, x.k, x.v, x.cu, x.cu, x.length, x.length, chunk_size, topk, causal=True)

    return fwd


def fwd_bwd_fn(x: Varlen, chunk_size: int, topk: int, d_out: torch.Tensor) -> Callable[[], Any]:
    """The timed training step: forward, then the gradients of ``q, k, v`` for ``d_out`` (packed) by autograd."""
    api = _api()
    q, k, v = (t.detach().requires_grad_() for t in (x.q, x.k, x.v))

    def fwd_bwd() -> Any:
        out = api.varlen(q, k, v, x.cu, x.cu, x.length, x.length, chunk_size, topk, causal=True)
        return torch.autograd.grad(out, (q, k, v), d_out)

    return fwd_bwd


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, topk: int) -> torch.Tensor:
    """FlashMoBA's causal MoBA attention of ``q [B, H, L, D]``, ``k, v [B, Hkv, L, D]``; returns ``[B, H, L, D]``."""
    x = Varlen.of(q, k, v)
    return from_varlen(forward_fn(x, chunk_size, topk)(), x.batch).contiguous()


# ----------------------------------------------------------------------------------------------------------------------
# FlashMoBA's selection, and the like-for-like check
# ----------------------------------------------------------------------------------------------------------------------
def chosen_from_csr(
    col_offsets: torch.Tensor, col_nnz: torch.Tensor, indices: torch.Tensor, length: int
) -> torch.Tensor:
    """FlashMoBA's sparse pattern -> bool ``[B, H, L, n_chunks]`` (row ``i`` attends chunk ``c``; own chunk included).

    The pattern is column-major: for batch ``b``, head ``h`` and key chunk ``c``, ``indices[col_offsets[b, h, c] :
    col_offsets[b, h, c] + col_nnz[b, h, c]]`` are the query rows (within the sequence) that attend chunk ``c``.
    """
    b, h, n_col = col_nnz.shape
    counts = col_nnz.reshape(-1).long()
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts  # each segment's first entry in the concatenation
    within = torch.arange(seg.numel(), device=counts.device) - first[seg]
    rows = indices.long()[col_offsets.reshape(-1)[seg] + within]
    chosen = torch.zeros(b * h, length, n_col, dtype=torch.bool, device=col_nnz.device)
    chosen[seg // n_col, rows, seg % n_col] = True
    return chosen.view(b, h, length, n_col)


def chosen_from_selection(sel: torch.Tensor, length: int, chunk_size: int) -> torch.Tensor:
    """Our gate's ``sel [B, H, L, K-1]`` (-1 = unused) plus each row's own chunk -> bool ``[B, H, L, n_chunks]``."""
    n_col = -(-length // chunk_size)
    b, h, n, _ = sel.shape
    chosen = torch.zeros(b, h, n, n_col + 1, dtype=torch.bool, device=sel.device)
    chosen.scatter_(-1, torch.where(sel < 0, n_col, sel.long()), True)
    own = (torch.arange(n, device=sel.device) + (length - n)) // chunk_size
    chosen[:, :, torch.arange(n, device=sel.device), own] = True
    return chosen[..., :n_col]


def selection(x: Varlen, chunk_size: int, topk: int) -> torch.Tensor:
    """FlashMoBA's chosen chunks for these inputs, bool ``[B, H, L, n_chunks]`` (its own gate, as its forward runs)."""
    col_offsets, col_nnz, indices = _api().topk(x.q, x.k, x.cu, x.cu, x.length, x.length, topk, chunk_size, causal=True)
    return chosen_from_csr(col_offsets, col_nnz, indices, x.length)


def attention_over(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chosen: torch.Tensor, chunk_size: int, scale: float
) -> torch.Tensor:
    """Float64 causal attention over exactly the chunks ``chosen [B, H, L, n_chunks]`` marks (the reference's softmax
    with every chunk eligible, intersected with the mask), one batch element at a time."""
    from moba_compile import reference

    n = q.shape[2]
    n_col = chosen.shape[-1]
    key_chunk = torch.arange(n, device=q.device) // chunk_size
    outs = []
    for bi in range(q.shape[0]):
        mask = chosen[bi : bi + 1].gather(-1, key_chunk.expand(1, chosen.shape[1], n, n))
        q64, k64, v64 = (t[bi : bi + 1].double() for t in (q, k, v))
        out, _ = reference.moba_attention_forward(
            q64, k64, v64, chunk_size=chunk_size, topk=n_col, scale=scale, attn_mask=mask
        )
        outs.append(out)
    return torch.cat(outs)


def check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    topk: int,
    scale: float,
    our_sel: torch.Tensor | None,
) -> dict[str, float]:
    """FlashMoBA's output against float64 references on the same inputs.

    * ``max_abs_err_vs_reference``: against our float64 reference (our gate, in float64);
    * ``max_abs_err_vs_own_selection``: against float64 attention over FlashMoBA's own selection (like for like:
      the kernel's error alone);
    * ``gate_rows_equal_fraction``: rows whose chosen chunk set equals our gate's ``our_sel`` (the selection our
      kernels use, fp32 means); ``max_abs_err_vs_reference_equal_rows``: the first error over those rows only.
    """
    from moba_compile import reference

    if abs(scale - 1.0 / math.sqrt(q.shape[-1])) > 1e-12:
        raise ValueError("FlashMoBA's entry point uses scale 1/sqrt(D) only")
    x = Varlen.of(q, k, v)
    out = from_varlen(forward_fn(x, chunk_size, topk)(), x.batch).double()
    ref, _ = reference.moba_attention_forward(q.double(), k.double(), v.double(), chunk_size=chunk_size, topk=topk,
                                              scale=scale)  # fmt: skip
    chosen = selection(x, chunk_size, topk)
    own = attention_over(q, k, v, chosen, chunk_size, scale)
    err = (out - ref).abs()
    result = {
        "max_abs_err_vs_reference": err.max().item(),
        "max_abs_err_vs_own_selection": (out - own).abs().max().item(),
        "reference_max_abs": ref.abs().max().item(),
    }
    if our_sel is not None:
        same = (chosen == chosen_from_selection(our_sel, q.shape[2], chunk_size)).all(-1)  # [B, H, L]
        result["gate_rows_equal_fraction"] = same.float().mean().item()
        agreeing = err.amax(-1)[same]
        result["max_abs_err_vs_reference_equal_rows"] = agreeing.max().item() if agreeing.numel() else float("nan")
    return result


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark's columns
# ----------------------------------------------------------------------------------------------------------------------
FIELDS = ("flashmoba_fwd_ms", "flashmoba_fwd_bwd_ms", "flashmoba_fwd_bwd_peak_gib", "flashmoba_check")


def record_columns(
    row: dict[str, Any],
    record: Callable[[str, Callable[[], Any]], None],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int,
    topk: int,
    scale: float,
    routing: str,
    time_ms: Callable[[Callable[[], Any]], float],
    peak_gib: Callable[[Callable[[], Any]], float | None],
    backward: str | None,
    check_len: bool,
    our_sel: torch.Tensor | None,
) -> None:
    """Fill ``row``'s FlashMoBA fields for one configuration (``benchmarks.attention --flashmoba``).

    ``backward``: ``None`` to measure fwd+bwd, else the reason it is skipped; ``check_len``: compare with the
    references (short shapes). A field that cannot be measured is ``None`` with the reason in ``row["errors"]``.
    """
    reason = available() or unsupported(
        head_dim=q.shape[-1], chunk_size=chunk_size, topk=topk, routing=routing, dtype=q.dtype
    )
    if reason is None and abs(scale - 1.0 / math.sqrt(q.shape[-1])) > 1e-12:
        reason = "FlashMoBA's entry point uses scale 1/sqrt(D) only"
    if reason is not None:
        for field in FIELDS:
            row[field] = None
            row["errors"][field] = reason
        return
    x = Varlen.of(q, k, v)
    fwd = forward_fn(x, chunk_size, topk)

    def timed(fn: Callable[[], Any]) -> float:
        fn()  # the mean pool's Triton autotuning and the first launches, outside the timed region
        return time_ms(fn)

    record("flashmoba_fwd_ms", lambda: timed(fwd))
    if backward is not None:
        for field in ("flashmoba_fwd_bwd_ms", "flashmoba_fwd_bwd_peak_gib"):
            row[field] = None
            row["errors"][field] = backward
    else:
        gen = torch.Generator(device=q.device).manual_seed(1)
        d_out = torch.randn(x.q.shape, device=q.device, dtype=q.dtype, generator=gen)
        step = fwd_bwd_fn(x, chunk_size, topk, d_out)
        record("flashmoba_fwd_bwd_ms", lambda: timed(step))
        record("flashmoba_fwd_bwd_peak_gib", lambda: peak_gib(step))
    if check_len:
        record("flashmoba_check", lambda: check(q, k, v, chunk_size, topk, scale, our_sel))
    else:
        row["flashmoba_check"] = None


def print_table(rows: list[dict[str, Any]]) -> None:
    """The FlashMoBA columns beside ours and dense SDPA (rows with any FlashMoBA field)."""
    rows = [r for r in rows if "flashmoba_fwd_ms" in r]
    if not rows:
        return

    head = (
        f"{'config':<44} {'FM fwd':>9} {'fwd':>9} {'dense':>9} {'FM f+b':>9} {'f+b':>9} {'dense f+b':>9} "
        f"{'FM pkGiB':>8} {'pkGiB':>8} {'FM err':>8} {'FM errO':>8} {'gate=':>6}"
    )
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        chk = r.get("flashmoba_check") or {}
        cells = [
            fmt_or_dash(r.get("flashmoba_fwd_ms")).rjust(9),
            fmt_or_dash(r.get("forward_ms")).rjust(9),
            fmt_or_dash(r.get("dense_ms")).rjust(9),
            fmt_or_dash(r.get("flashmoba_fwd_bwd_ms")).rjust(9),
            fmt_or_dash(r.get("fwd_bwd_ms")).rjust(9),
            fmt_or_dash(r.get("dense_fwd_bwd_ms")).rjust(9),
            fmt_or_dash(r.get("flashmoba_fwd_bwd_peak_gib"), ".2f").rjust(8),
            fmt_or_dash(r.get("fwd_bwd_peak_gib"), ".2f").rjust(8),
            fmt_or_dash(chk.get("max_abs_err_vs_reference"), ".1e").rjust(8),
            fmt_or_dash(chk.get("max_abs_err_vs_own_selection"), ".1e").rjust(8),
            fmt_or_dash(chk.get("gate_rows_equal_fraction"), ".3f").rjust(6),
        ]
        print(f"{r['name']:<44} " + " ".join(cells))
    print("FM = FlashMoBA (mit-han-lab/flash-moba, benchmarks/flashmoba_build.sh) on the same tensors, same run;")
    print("err = max |out - float64 reference| (our gate), errO = vs float64 attention over FlashMoBA's own selection,")
    print("gate= = fraction of rows choosing the same chunks as our gate (FlashMoBA rounds chunk means to bf16)")
