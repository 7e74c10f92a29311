"""MoBA gating in Triton: chunk means, the fused top-(K-1) gate, and the index flip that feeds the key-major forward.

Pipeline (one forward):

1. :func:`chunk_means_triton`: ``[B, Hkv, N, D]`` fp32 means of the key chunks (``N = ceil(Lk / C)``).
2. :func:`select_chunks_triton`: per query tile, the scores against the mean tiles of strictly earlier chunks, packed
   with the chunk index into one int64 key and reduced to a running top-(K-1) in registers. Never materialises
   ``[B, H, Lq, N]``. Group routing (``routing="group"``): one program per key head sums its ``G`` query heads' scores
   and writes the one top-(K-1) to each of them, so everything downstream runs unchanged.
3. :func:`flip_selection`: per (batch, key head, chunk) the list of (query head, row, slot) entries that chose that
   chunk (count with atomics, prefix sum, scatter), plus the list of row tiles the key-major forward launches.

Key packing (why the order is total and matches the reference): a score's fp32 bits ``b`` become the order-preserving
int32 ``b ^ ((b >> 31) & 0x7FFFFFFF)`` (negative floats have their magnitude bits flipped), ``-0.0`` is first turned
into ``+0.0`` (the reference treats them as equal), and the key is ``(ordered_bits << 32) | chunk``. Larger key =
higher score, and on equal scores the later chunk, exactly the spec's tie rule. Non-earlier chunks get ``INT64_MIN``.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .jit import kernel_jit
from .launch import empty
from .support import bounded_params, check_routing, interpreting, next_pow2, speed_up_interpreter
from .tiles import SENTINEL, chunk_indices, merge_top, pack_scores, query_major_program

__all__ = [
    "MEANS_NUM_STAGES",
    "MEANS_NUM_WARPS",
    "FlipResult",
    "SlotFlip",
    "chunk_means_triton",
    "flip_by_slot",
    "flip_slot_major",
    "flip_selection",
    "launch_chunk_means",
    "means_block_n",
    "select_chunks_triton",
]


# --------------------------------------------------------------------------------------------------------------------
# Chunk means
# --------------------------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_mean(base, start, Lk, C, skn, skd, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 ``[HEAD_D]`` mean of the keys ``[start, min(start + C, Lk))`` at ``base`` (one (batch, key head) plane):
    the one means computation of every Triton path (the prefill gate's :func:`launch_chunk_means` and a static
    cache's step update, ``decode.update_static_means_triton``), so a chunk's mean is bitwise the same number
    whichever kernel computed it.

    A ``[BLOCK_N, D]`` accumulator summed once at the end: the same data gives bitwise the same mean in every chunk,
    which keeps exact gate ties (duplicated chunks) exact; the division is IEEE round-to-nearest (``div_rn``).
    """
    offs_d = tl.arange(0, HEAD_D).to(tl.int64)
    acc = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    for n0 in range(0, C, BLOCK_N):
        in_chunk = n0 + tl.arange(0, BLOCK_N)
        offs_n = start + in_chunk.to(tl.int64)
        keep = (in_chunk < C) & (offs_n < Lk)  # a block may overhang the chunk when BLOCK_N does not divide C
        k = tl.load(base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=keep[:, None], other=0.0)
        acc += k.to(tl.float32)
    count = tl.minimum(Lk - start, C).to(tl.float32)
    return tl.math.div_rn(tl.sum(acc, axis=0), count + tl.zeros([HEAD_D], dtype=tl.float32))


@kernel_jit
def _chunk_means_kernel(
    k_ptr,
    means_ptr,
    Hkv,
    Lk,
    N,
    C,
    skb,
    skh,
    skn,
    skd,
    HEAD_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    plane = tl.program_id(1).to(tl.int64)
    b = plane // Hkv
    h = plane % Hkv
    offs_d = tl.arange(0, HEAD_D).to(tl.int64)
    mean = _chunk_mean(k_ptr + b * skb + h * skh, c * C, Lk, C, skn, skd, HEAD_D, BLOCK_N)
    tl.store(means_ptr + (plane * N + c) * HEAD_D + offs_d, mean)


# Launch configuration of the one means computation: every launcher of _chunk_mean uses these, so that the summation
# order (blocks of means_block_n(C) keys, 4 warps) is the same whichever kernel averages a chunk.
MEANS_NUM_WARPS = 4
MEANS_NUM_STAGES = 2


def means_block_n(chunk_size: int) -> int:
    """Keys per block of the means computation for chunks of ``chunk_size`` keys.

    The largest power of two dividing ``C`` (capped at 64; 16 interpreted) avoids overhanging blocks; odd chunk sizes
    still work (masked). It depends on ``C`` only (not on ``Lk`` or the caller), which keeps every caller's summation
    order the same.

    Example:
        >>> means_block_n(4096) in (16, 64), means_block_n(24)
        (True, 8)
    """
    return min(16 if interpreting() else 64, chunk_size & -chunk_size)


def chunk_means_triton(key: Tensor, chunk_size: int) -> Tensor:
    """Mean key of every chunk, accumulated in fp32 (the Triton counterpart of ``reference.chunk_means``).

    Every Triton path takes its means from :func:`launch_chunk_means` (this function, the decode kernels'
    ``decode_chunk_means`` and ``moba_compile.ops.chunk_means``), so a chunk's mean is bitwise the same number
    whichever of them computed it.

    Args:
        key: ``[B, Hkv, Lk, D]``, fp16/bf16/fp32, any strides, on CUDA (or CPU under ``TRITON_INTERPRET=1``);
            ``D`` a power of two >= 16.
        chunk_size: ``C >= 1``; the last chunk may be partial and is averaged over its real keys only.

    Returns:
        ``[B, Hkv, ceil(Lk / C), D]`` fp32, contiguous, on ``key``'s device. Summation order differs from the
        reference, so values agree to fp32 rounding, not bitwise (docs/kernels.md, "Chunk means"); identical chunks
        give bitwise identical means.

    Raises:
        ValueError: ``key`` is not 4-D, ``Lk == 0`` or ``D`` is not a power of two >= 16.

    Example:
        >>> means = chunk_means_triton(torch.ones(1, 1, 40, 16), 16)  # doctest: +SKIP
        >>> means.shape
        torch.Size([1, 1, 3, 16])
    """
    if key.dim() != 4 or key.shape[2] == 0:
        raise ValueError(f"key must be [B, Hkv, Lk>0, D], got {tuple(key.shape)}")
    d = key.shape[3]
    if d < 16 or d != next_pow2(d):
        raise ValueError(f"head dim {d} must be a power of two >= 16")
    return launch_chunk_means(key, chunk_size, -(-key.shape[2] // chunk_size))


def launch_chunk_means(key: Tensor, chunk_size: int, n_chunks: int) -> Tensor:
    """fp32 ``[B, Hkv, n_chunks, D]`` means of the first ``n_chunks`` chunks of ``key``: the one means launch.

    The prefill gate asks for every chunk (``ceil(Lk / C)``, the last one possibly partial, averaged over its real
    keys), a decode step or a KV cache for the complete ones (``Lk // C`` or fewer). A chunk's mean does not depend on
    ``n_chunks`` or on ``Lk`` beyond its own keys: one program per chunk sums the same ``[BLOCK_N, D]`` blocks in the
    same order and divides with IEEE round-to-nearest (``div_rn``), so every caller gets bitwise the same numbers.
    Inputs are not checked (callers validate); ``n_chunks <= ceil(Lk / C)``.

    Example:
        >>> launch_chunk_means(torch.ones(1, 1, 40, 16), 16, 2).shape  # doctest: +SKIP
        torch.Size([1, 1, 2, 16])
    """
    b, hkv, lk, d = key.shape
    # One chunk either way; the kernel loops over C keys per chunk, so a huge C must not reach it.
    chunk_size = bounded_params(lk, chunk_size, 1)[0]
    means = empty(b, hkv, n_chunks, d, dtype=torch.float32, device=key.device)
    if means.numel() == 0:
        return means
    _chunk_means_kernel[(n_chunks, b * hkv)](
        key, means, hkv, lk, n_chunks, chunk_size, *key.stride(), HEAD_D=d, BLOCK_N=means_block_n(chunk_size),
        num_warps=MEANS_NUM_WARPS, num_stages=MEANS_NUM_STAGES,
    )  # fmt: skip
    return means


# --------------------------------------------------------------------------------------------------------------------
# Fused gate: scores against the mean tiles + running top-(K-1)
# --------------------------------------------------------------------------------------------------------------------
@triton.jit
def _gate_query(q_ptr, b, hq, offs_m, row_ok, offs_d, sqb, sqh, sqm, sqd, SPLIT_BF16, UPCAST):
    """One query head's ``[BLOCK_M, D]`` tile, in the dtype the gate's dots take."""
    q = tl.load(
        q_ptr + b * sqb + hq * sqh + offs_m.to(tl.int64)[:, None] * sqm + offs_d[None, :] * sqd,
        mask=row_ok[:, None],
        other=0.0,
    )
    if SPLIT_BF16:
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong; bf16 -> fp32 is exact
            q = q.to(tl.float32)
    else:
        q = q.to(tl.float32)
    return q


@triton.jit
def _gate_scores(q, mt, hi, mid, lo, sc, SPLIT_BF16, UPCAST, DOT_PREC):
    """``sc + q . mt^T`` in fp32: three exact bf16 passes over ``mt = hi + mid + lo`` for bf16 queries, else one dot
    at ``DOT_PREC``."""
    if SPLIT_BF16:
        if UPCAST:
            sc = tl.dot(q, tl.trans(lo.to(tl.float32)), sc)
            sc = tl.dot(q, tl.trans(mid.to(tl.float32)), sc)
            sc = tl.dot(q, tl.trans(hi.to(tl.float32)), sc)
        else:
            sc = tl.dot(q, tl.trans(lo), sc)
            sc = tl.dot(q, tl.trans(mid), sc)
            sc = tl.dot(q, tl.trans(hi), sc)
    else:
        sc = tl.dot(q, tl.trans(mt), sc, input_precision=DOT_PREC)
    return sc


@kernel_jit
def _gate_kernel(
    q_ptr,
    means_ptr,
    sel_ptr,
    Hq,
    G,
    Lq,
    Lk,
    N,
    C,
    KM1,
    s_row,
    s_slot,
    sqb,
    sqh,
    sqm,
    sqd,
    HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TOP: tl.constexpr,
    SPLIT_BF16: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    GROUP: tl.constexpr,
):
    if GROUP:
        # Group routing: one program per (row tile, batch, key head); its score sums the G query heads' dots and its
        # one top-k is written to each of them (grid (row tiles, B * Hkv)).
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        b = pid_bh // (Hq // G)
        hkv = pid_bh % (Hq // G)
        hq = hkv * G
    else:
        pid_m, b, hq, hkv = query_major_program(Hq, G)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Lq
    own = (Lk - Lq + offs_m) // C
    offs_d = tl.arange(0, HEAD_D).to(tl.int64)
    if not GROUP:
        q = _gate_query(q_ptr, b, hq, offs_m, row_ok, offs_d, sqb, sqh, sqm, sqd, SPLIT_BF16, UPCAST)
    m_base = means_ptr + (b * (Hq // G) + hkv) * N * HEAD_D
    # The running top keeps TOP keys per row in ascending order (bitonic_merge below needs one ascending input).
    top = tl.full([BLOCK_M, TOP], SENTINEL, tl.int64)
    last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Lq) - 1
    n_hi = (Lk - Lq + last_row) // C  # chunks [0, n_hi) are strictly earlier for at least the tile's last row
    for c0 in range(0, n_hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mt = tl.load(
            m_base + offs_c.to(tl.int64)[:, None] * HEAD_D + offs_d[None, :], mask=(offs_c < N)[:, None], other=0.0
        )
        if SPLIT_BF16:
            # fp32 mean = hi + mid + lo exactly (8 + 8 + 8 significant bits); each bf16 x bf16 product is exact in
            # fp32, so three bf16 tensor-core dots give an fp32-accurate score at 3 MMAs (tf32x3 would cost ~6).
            hi = mt.to(tl.bfloat16)
            r1 = mt - hi.to(tl.float32)
            mid = r1.to(tl.bfloat16)
            lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
        else:
            hi = mt
            mid = mt
            lo = mt
        sc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        if GROUP:
            # The group's query tiles are re-read per mean tile (L1/L2 hits): holding G tiles in registers would
            # need G known at compile time. One fp32 accumulator sums every head's dots, in head order.
            for g in range(0, G):
                qg = _gate_query(q_ptr, b, hq + g, offs_m, row_ok, offs_d, sqb, sqh, sqm, sqd, SPLIT_BF16, UPCAST)
                sc = _gate_scores(qg, mt, hi, mid, lo, sc, SPLIT_BF16, UPCAST, DOT_PREC)
        else:
            sc = _gate_scores(q, mt, hi, mid, lo, sc, SPLIT_BF16, UPCAST, DOT_PREC)
        packed = tl.where(offs_c[None, :] < own[:, None], pack_scores(sc, offs_c), SENTINEL)
        top = merge_top(top, packed, TOP)
    slot = TOP - 1 - tl.arange(0, TOP)  # descending score order, like the reference
    idx = chunk_indices(top)
    # Row r = (b, hq, i) and slot j go to r * s_row + j * s_slot: [B, Hq, Lq, K'-1] (s_row = K'-1, s_slot = 1) or
    # slot-major [K'-1, B, Hq, Lq] (s_row = 1, s_slot = B*Hq*Lq), the layout the index flip by slot reads.
    keep = row_ok[:, None] & (slot[None, :] < KM1)
    if GROUP:
        # Every query head of the group gets the group's selection, so the key-major kernels run unchanged.
        for g in range(0, G):
            out_rows = ((b * Hq + hq + g) * Lq + offs_m.to(tl.int64)) * s_row
            tl.store(sel_ptr + out_rows[:, None] + slot.to(tl.int64)[None, :] * s_slot, idx, mask=keep)
    else:
        out_rows = ((b * Hq + hq) * Lq + offs_m.to(tl.int64)) * s_row
        out = sel_ptr + out_rows[:, None] + slot.to(tl.int64)[None, :] * s_slot
        tl.store(out, idx, mask=keep)


@dataclass(frozen=True)
class _GateConfig:
    block_m: int
    block_c: int
    top: int
    num_warps: int
    num_stages: int


def _gate_config(head_dim: int, n_chunks: int, km1: int, bf16: bool = True) -> _GateConfig:
    top = max(2, next_pow2(km1))  # tl.topk / bitonic_merge want powers of two; 1 degenerates to a plain max
    if interpreting():
        return _GateConfig(64, max(16, top, min(32, next_pow2(n_chunks))), top, 4, 1)
    # H100 (before 2026-12-01): a 64-row tile kept the bf16 query tile (16 KB at D=128) and the [64, BLOCK_C] fp32
    # score/int64 key tiles in registers over 4 warps, with BLOCK_C = 64 chunks per step; the step is cut to the chunk
    # count so short sequences do not sort padding. Two stages overlap the next mean tile's load (L2-resident: the
    # means are tiny) with the current dot + top-k. D = 256 keeps 32 rows over 4 warps (not re-timed).
    # Timed on the H200 (2026-12-01, benchmarks.tune_gate, 13 tilings x 5 shapes, tune_gate-nvidia-h200-20261201.json;
    # selections bitwise equal across tilings): at FlashMoBA's C128 K8 (64-1024 chunks, where the step is not cut)
    # 128 rows over 8 warps with 32 means per step took 34% / 25% / 18% less time than the former 64 x 64 over 4 warps
    # (8K / 32K / 128K: 0.138 -> 0.091, 1.14 -> 0.86, 14.0 -> 11.5 ms a call), and it is the best or within 5% of the
    # best there. The wider row tile loads each mean block once for twice the rows; the narrower step makes a smaller
    # block top-k between merges; 256 threads keep the [128, 32] score and int64 key tiles at 79-192 registers. At the
    # spec shapes (16-32 chunks: the step is cut to the chunk count either way) the harness's per-kernel breakdown
    # moved by -1% to -11% (attention-nvidia-h200-20261201-s21-spec.json against -s20-spec-residuals.json).
    # Only bf16 queries at D = 128 with head routing were timed (D = 64 and group routing take the same tiles
    # untimed); the fp16/fp32 gate (tf32x3 dots) would need up to 224 KB of shared memory there, and keeps its former
    # tiles.
    if head_dim <= 128 and bf16:
        return _GateConfig(128, max(16, top, min(32, next_pow2(n_chunks))), top, 8, 2)
    block_c = max(16, top, min(64, next_pow2(n_chunks)))
    return _GateConfig(64 if head_dim <= 128 else 32, block_c, top, 4, 2)


def _gate_dot_precision(dtype: torch.dtype) -> str:
    # fp16/fp32 scores: 3 tf32 passes approximate an fp32 dot (fp16 queries are exact in tf32). The interpreter does
    # an fp32 numpy matmul whatever is asked.
    return "ieee" if interpreting() else "tf32x3"


def _launch_gate(
    query: Tensor,
    means: Tensor,
    chunk_size: int,
    km1: int,
    len_k: int,
    *,
    slot_major: bool = False,
    routing: str = "head",
) -> Tensor:
    """The fused gate's int32 selection: ``[B, Hq, Lq, K'-1]``, or ``[K'-1, B, Hq, Lq]`` with ``slot_major`` (what
    :func:`flip_slot_major` takes, without a transposed copy). ``routing="group"``: one top-k per (batch, key head,
    row) from the group-summed scores, written to every query head of the group."""
    b, hq, lq, d = query.shape
    hkv, n = means.shape[1], means.shape[2]
    shape = (km1, b, hq, lq) if slot_major else (b, hq, lq, km1)
    sel = empty(*shape, dtype=torch.int32, device=query.device)
    s_row, s_slot = (1, b * hq * lq) if slot_major else (km1, 1)
    if sel.numel() == 0:
        return sel
    cfg = _gate_config(d, n, km1, query.dtype == torch.bfloat16)
    if interpreting():
        speed_up_interpreter()
    group = routing == "group" and hq != hkv  # with Hq == Hkv the two routings are the same computation
    grid = (triton.cdiv(lq, cfg.block_m), b * (hkv if group else hq))
    _gate_kernel[grid](
        query,
        means,
        sel,
        hq,
        hq // hkv,
        lq,
        len_k,
        n,
        chunk_size,
        km1,
        s_row,
        s_slot,
        *query.stride(),
        HEAD_D=d,
        BLOCK_M=cfg.block_m,
        BLOCK_C=cfg.block_c,
        TOP=cfg.top,
        SPLIT_BF16=query.dtype == torch.bfloat16,
        UPCAST=interpreting(),
        DOT_PREC=_gate_dot_precision(query.dtype),
        GROUP=group,
        num_warps=cfg.num_warps,
        # Group routing: pipelining the per-head query loads of the inner loop took the tile to 255 registers (sm_90
        # compile check, bf16 D=128: 255 with 2 stages, 168-248 and no spills with 1).
        num_stages=1 if group else cfg.num_stages,
    )
    return sel


def select_chunks_triton(
    query: Tensor, key: Tensor, chunk_size: int, topk: int, *, means: Tensor | None = None, routing: str = "head"
) -> Tensor:
    """The MoBA gate in Triton: for every query row, the ``topk - 1`` strictly earlier chunks with the best score.

    Scores are ``q . mean(key[c])`` in fp32 (bf16 queries: three exact bf16 tensor-core passes over the split fp32
    mean; fp16/fp32: tf32x3 on CUDA; fp32 numpy in the interpreter). Query row ``i`` sits at position
    ``Lk - Lq + i``; its own chunk is never listed; GQA query head ``h`` uses key head ``h // (Hq // Hkv)``.

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, Lk, D]``; fp16/bf16/fp32, any strides, on CUDA (or CPU under
            ``TRITON_INTERPRET=1``); ``D`` a power of two >= 16; ``Lq <= Lk``; ``Hq % Hkv == 0``.
        chunk_size: ``C >= 1``; topk: counts the own chunk; ``1 <= K' <= 64`` for
            ``K' = min(topk, ceil(Lk / C))`` (larger values select the same: they are clamped).
        means: optional precomputed :func:`chunk_means_triton` result.
        routing: ``"head"`` (one top-k per query head) or ``"group"`` (one per key head and row, from the scores
            summed over the group's query heads in fp32, the same for each head of the group).

    Returns:
        ``int32 [B, Hq, Lq, K' - 1]`` (as ``reference.select_chunks``), contiguous: chunk indices in descending score
        order (ties: the later chunk first, as the reference), ``-1`` in unused slots. It equals
        ``reference.select_chunks`` except where two scores differ by less than fp32 rounding of the (differently
        ordered) sums.

    Raises:
        ValueError: bad shapes, ``topk`` outside ``[1, 64]``, or an unknown ``routing``.

    Example:
        >>> q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 64, 16)
        >>> select_chunks_triton(q, k, 16, 3)[0, 0, -1].tolist()  # doctest: +SKIP
        [0, 2]
    """
    if query.dim() != 4 or key.dim() != 4 or query.shape[-1] != key.shape[-1] or query.shape[0] != key.shape[0]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} are not [B, H, L, D] pairs")
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    chunk_size, topk = bounded_params(lk, chunk_size, topk)  # the same selection, sized by the sequence
    if topk > 64:
        raise ValueError(f"topk must be in [1, 64] once clamped to the chunk count, got {topk}")
    if hkv == 0 or hq % hkv or lq > lk:
        raise ValueError(f"need Hq % Hkv == 0 and Lq <= Lk, got Hq={hq}, Hkv={hkv}, Lq={lq}, Lk={lk}")
    check_routing(routing)
    km1 = topk - 1
    # No row has more than (Lk - 1) // C earlier chunks: gate only that many slots, pad the rest with -1.
    km1_eff = min(km1, (lk - 1) // chunk_size)
    if km1_eff == 0 or b * hq * lq == 0:
        return torch.full((b, hq, lq, km1), -1, dtype=torch.int32, device=query.device)
    if means is None:
        means = chunk_means_triton(key, chunk_size)
    sel = _launch_gate(query, means, chunk_size, km1_eff, lk, routing=routing)
    if km1_eff < km1:
        sel = torch.nn.functional.pad(sel, (0, km1 - km1_eff), value=-1)
    return sel


# --------------------------------------------------------------------------------------------------------------------
# Index flip: per (batch, key head, chunk) lists of the entries that chose the chunk
# --------------------------------------------------------------------------------------------------------------------
@kernel_jit
def _flip_count_kernel(sel_ptr, rank_ptr, counts_ptr, n_planes, plane_size, N, BLOCK: tl.constexpr):
    # Program ids walk the planes first: consecutive programs (the ones in flight together) count into different
    # planes' counters. In flat order every program in flight hit the same plane's N counters, and the returning
    # atomics serialised on them (42 ms of a 1M-token forward at chunk 4096, Nsight on the H200; see kernels.md).
    pid = tl.program_id(0)
    plane = (pid % n_planes).to(tl.int64)
    in_plane = (pid // n_planes).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = in_plane < plane_size
    offs = plane * plane_size + in_plane
    c = tl.load(sel_ptr + offs, mask=ok, other=-1)
    valid = c >= 0
    seg = plane * N + c
    # The returned old count is the entry's rank in its chunk's list (order between programs is arbitrary; the
    # forward's per-row results do not depend on it). One plane's blocks still run in order when interpreted.
    rank = tl.atomic_add(counts_ptr + seg, tl.full([BLOCK], 1, tl.int32), mask=valid, sem="relaxed")
    tl.store(rank_ptr + offs, rank, mask=valid)


@kernel_jit
def _flip_scatter_kernel(sel_ptr, rank_ptr, seg_start_ptr, lists_ptr, n_entries, plane_size, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    c = tl.load(sel_ptr + offs, mask=offs < n_entries, other=-1)
    valid = c >= 0
    plane = offs // plane_size
    seg = plane * N + c
    pos = tl.load(seg_start_ptr + seg, mask=valid, other=0) + tl.load(rank_ptr + offs, mask=valid, other=0)
    tl.store(lists_ptr + pos, (offs - plane * plane_size).to(tl.int32), mask=valid)


def _sort_lists(lists: Tensor, ends: Tensor) -> Tensor:
    # Key = (segment << 32) | id: one sort orders the segments (already grouped) and the ids inside each. Positions past
    # the last entry hold uninitialised ids; their segment (S) keeps them at the end, where nothing reads them.
    pos = torch.arange(lists.numel(), device=lists.device, dtype=torch.int64)
    seg = torch.searchsorted(ends, pos, right=True)
    keys = (seg << 32) | (lists.to(torch.int64) & 0xFFFFFFFF)
    return (torch.sort(keys).values & 0x7FFFFFFF).to(torch.int32)


@dataclass(frozen=True)
class FlipResult:
    """Per-chunk query lists and the key-major work tiles (see :func:`flip_selection`).

    Attributes:
        lists: int32 ``[E]``: entry ids local to their (batch, key head) plane, grouped by segment.
        seg_start: int64 ``[S]``: first position of each segment in ``lists``.
        counts: int32 ``[S]``: entries per segment.
        tile_seg: int32 ``[T]``: segment of each work tile; ``S`` marks a padding tile (nothing to do).
        tile_row0: int32 ``[T]``: the tile's first position inside its segment (a multiple of ``block_m``).
        n_segments: ``S = B * Hkv * N``.
    """

    lists: Tensor
    seg_start: Tensor
    counts: Tensor
    tile_seg: Tensor
    tile_row0: Tensor
    n_segments: int


def _exact_tile_count(device: torch.device) -> bool:
    # On CUDA the tile count stays on the device (reading it would stall the stream): the grid takes the static bound
    # and padding tiles exit at once. Interpreted, a host read costs nothing and saves empty programs.
    return device.type != "cuda" or interpreting()


def flip_selection(
    sel: Tensor, heads_kv: int, n_chunks: int, block_m: int, *, deterministic: bool = False
) -> FlipResult:
    """Invert the gate: for every (batch, key head, chunk) segment, the entries ``(g, i, j)`` that chose the chunk.

    An entry is query head ``hq = hkv * G + g`` (``G = Hq // Hkv``), row ``i``, slot ``j``; its id local to the
    (batch, key head) plane is ``(g * Lq + i) * (K-1) + j``, so ``plane * G * Lq * (K-1) + id`` is its flat index in
    ``sel``. GQA heads of one group share their key head's segments, so their rows fill the same key-major tiles.
    Segment ``s = (b * Hkv + hkv) * N + c``. Entries are counted with atomics (the returned old count is the rank),
    prefix-summed, and scattered; the order inside a list is unspecified (the forward's per-row results do not depend
    on it) unless ``deterministic`` is set: then every list is sorted by entry id (the backward's dK/dV sum over a
    list's rows in list order, so bitwise reproducibility needs a fixed order).
    Work tiles: each segment's list is cut into tiles of ``block_m`` entries. There is no host synchronisation on
    CUDA: the tile arrays have a static upper bound ``E // block_m + S`` and padding tiles carry ``tile_seg == S``.

    Args:
        sel: int32 ``[B, Hq, Lq, K-1]`` contiguous gate output (``-1`` = unused slot), CUDA or interpreted CPU.
        heads_kv: ``Hkv``, dividing ``Hq``.
        n_chunks: ``N``, greater than every index in ``sel``.
        block_m: entries per key-major tile.
        deterministic: sort each segment's list by entry id (one int64 sort of ``E`` keys; no host synchronisation).

    Returns:
        :class:`FlipResult` on ``sel``'s device.

    Raises:
        ValueError: ``sel`` is not a contiguous int32 4-D tensor, or ``Hq % heads_kv != 0``.

    Example:
        >>> sel = torch.tensor([[[[-1], [0], [0], [1]]]], dtype=torch.int32)  # B=1, Hq=1, Lq=4, K-1=1
        >>> flip = flip_selection(sel, 1, 3, 16)  # doctest: +SKIP
        >>> flip.counts.tolist(), sorted(flip.lists[:2].tolist())  # doctest: +SKIP
        ([2, 1, 0], [1, 2])
    """
    if sel.dim() != 4 or sel.dtype != torch.int32 or not sel.is_contiguous():
        raise ValueError("sel must be a contiguous int32 [B, Hq, Lq, K-1] tensor")
    b, hq, lq, km1 = sel.shape
    if heads_kv <= 0 or hq % heads_kv:
        raise ValueError(f"Hq={hq} is not a multiple of heads_kv={heads_kv}")
    dev = sel.device
    n_entries = sel.numel()
    plane_size = (hq // heads_kv) * lq * km1
    n_seg = b * heads_kv * n_chunks
    counts = torch.zeros(n_seg, dtype=torch.int32, device=dev)
    rank = empty(n_entries, dtype=torch.int32, device=dev)
    lists = empty(max(n_entries, 1), dtype=torch.int32, device=dev)
    block = 1024 if not interpreting() else 4096  # memory-bound elementwise passes
    grid = (triton.cdiv(n_entries, block),)
    if n_entries:
        n_planes = n_entries // plane_size
        count_grid = (n_planes * triton.cdiv(plane_size, block),)
        _flip_count_kernel[count_grid](sel, rank, counts, n_planes, plane_size, n_chunks, BLOCK=block, num_warps=4)
    counts64 = counts.to(torch.int64)
    ends = torch.cumsum(counts64, 0)
    seg_start = ends - counts64
    if n_entries:
        _flip_scatter_kernel[grid](
            sel, rank, seg_start, lists, n_entries, plane_size, n_chunks, BLOCK=block, num_warps=4
        )
        if deterministic:
            lists = _sort_lists(lists, ends)
    tiles_per = (counts64 + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per, 0)
    if _exact_tile_count(dev):
        n_tiles = int(tile_end[-1]) if n_seg else 0
    else:
        n_tiles = n_entries // block_m + n_seg  # static bound: sum ceil(count / bm) <= E / bm + S
    t = torch.arange(n_tiles, device=dev, dtype=torch.int64)
    tile_seg = torch.searchsorted(tile_end, t, right=True)
    seg_c = tile_seg.clamp(max=max(n_seg - 1, 0))
    tile_row0 = (t - (tile_end[seg_c] - tiles_per[seg_c])) * block_m
    return FlipResult(
        lists=lists,
        seg_start=seg_start,
        counts=counts,
        tile_seg=tile_seg.to(torch.int32),
        tile_row0=tile_row0.to(torch.int32),
        n_segments=n_seg,
    )


@dataclass(frozen=True)
class SlotFlip:
    """The index flip in slot-major order (see :func:`flip_by_slot`).

    Attributes:
        flip: the :class:`FlipResult` of the slot-major selection: segment ``((j * B + b) * Hkv + hkv) * N + c``,
            entry ids ``g * Lq + i`` (int32; no slot in the id: the segment carries it).
        slot_tiles: int32 ``[K' - 1 + 1]`` on the device: slot ``j``'s work tiles are ``[slot_tiles[j],
            slot_tiles[j + 1])`` of ``flip.tile_seg`` / ``flip.tile_row0``.
        grids: the grid size of each slot's launch: the exact tile count where the count is read on the host
            (interpreter), else the static bound ``B*Hq*Lq // block_m + B*Hkv*N`` (no host synchronisation).
        n_slots: ``K' - 1``.
        batch: ``B``.
    """

    flip: FlipResult
    slot_tiles: Tensor
    grids: tuple[int, ...]
    n_slots: int
    batch: int


def flip_by_slot(sel: Tensor, heads_kv: int, n_chunks: int, block_m: int, *, deterministic: bool = False) -> SlotFlip:
    """Invert the gate per slot: for every (slot ``j``, batch, key head, chunk) the rows whose ``j``-th choice it is.

    Every row appears at most once per slot, so a pass over one slot's tiles may read-modify-write per-row state (the
    forward's running output, the backward's dQ) without atomics or races, and the passes over the slots in order
    ``j = 0 .. K'-2`` give a fixed summation order. The segments of one slot are contiguous, and so are its tiles.

    Args:
        sel: int32 ``[B, Hq, Lq, K'-1]`` contiguous gate output (``-1`` = unused slot), CUDA or interpreted CPU.
        heads_kv: ``Hkv``, dividing ``Hq``.
        n_chunks: ``N``, greater than every index in ``sel``.
        block_m: entries per key-major tile.
        deterministic: sort each list by entry id (see :func:`flip_selection`).

    Returns:
        :class:`SlotFlip` on ``sel``'s device.

    Raises:
        ValueError: as :func:`flip_selection`.

    Example:
        >>> sel = torch.tensor([[[[-1, -1], [0, -1], [1, 0]]]], dtype=torch.int32)  # B=1, Hq=1, Lq=3, K-1=2
        >>> sf = flip_by_slot(sel, 1, 2, 16)
        >>> sf.flip.counts.tolist()  # slot 0: chunk 0 <- row 1, chunk 1 <- row 2; slot 1: chunk 0 <- row 2
        [1, 1, 1, 0]
    """
    if sel.dim() != 4 or sel.dtype != torch.int32:
        raise ValueError("sel must be an int32 [B, Hq, Lq, K-1] tensor")
    sel_t = sel.permute(3, 0, 1, 2).contiguous()
    return flip_slot_major(sel_t, heads_kv, n_chunks, block_m, deterministic=deterministic)


def flip_slot_major(
    sel_t: Tensor, heads_kv: int, n_chunks: int, block_m: int, *, deterministic: bool = False
) -> SlotFlip:
    """:func:`flip_by_slot` of a selection already in slot-major layout, ``[K'-1, B, Hq, Lq]`` contiguous int32 (the
    fused gate writes it so with ``slot_major=True``): no transposed copy of the selection is made.

    Raises:
        ValueError: ``sel_t`` is not a contiguous int32 4-D tensor, or ``Hq % heads_kv != 0``.

    Example:
        >>> sel_t = torch.tensor([[[[-1, 0, 1]]], [[[-1, -1, 0]]]], dtype=torch.int32)  # K-1=2, B=1, Hq=1, Lq=3
        >>> flip_slot_major(sel_t, 1, 2, 16).flip.counts.tolist()
        [1, 1, 1, 0]
    """
    if sel_t.dim() != 4 or sel_t.dtype != torch.int32 or not sel_t.is_contiguous():
        raise ValueError("sel_t must be a contiguous int32 [K-1, B, Hq, Lq] tensor")
    km1, b, hq, lq = sel_t.shape
    # K'-1 batches of one-slot selections: the plain flip then groups segments slot by slot.
    flip = flip_selection(sel_t.view(km1 * b, hq, lq, 1), heads_kv, n_chunks, block_m, deterministic=deterministic)
    per_slot = b * heads_kv * n_chunks
    tiles_per = (flip.counts.to(torch.int64) + block_m - 1) // block_m
    tile_end = torch.nn.functional.pad(torch.cumsum(tiles_per, 0), (1, 0))
    slot_tiles = tile_end[:: max(per_slot, 1)][: km1 + 1].to(torch.int32)
    if _exact_tile_count(sel_t.device):
        ends = slot_tiles.tolist()
        grids = tuple(ends[j + 1] - ends[j] for j in range(km1))
    else:
        grids = (b * hq * lq // block_m + per_slot,) * km1
    return SlotFlip(flip=flip, slot_tiles=slot_tiles, grids=grids, n_slots=km1, batch=b)
