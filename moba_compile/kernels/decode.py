"""MoBA decode in Triton: one new query per sequence against a KV cache, at a cost set by ``topk * chunk_size``.

The query of a decode step sits at position ``p = Lk - 1``; it attends causally to its own (possibly partial) chunk
``p // C`` (every key of it is ``<= p``) plus the ``K - 1`` strictly earlier chunks with the best fp32 gate score
``q . mean(key[c])`` (ties to the later chunk), intersected with an optional boolean mask: exactly
``reference.moba_attention_forward`` with ``Lq == 1``.

Launches (all on the query's device, no host synchronisation):

1. ``_decode_gate_kernel`` (+ ``_decode_gate_merge_kernel`` when the chunk means are many): one program per
   (batch, key head, row block of the group's query heads, range of chunk means). The group's query heads are the
   rows of one tile, so each mean tile is read once per group; scores go through a running top-(K-1) in registers
   whose keys pack the order-preserving fp32 score bits with the chunk index into one int64 (a total order whose
   ties go to the later chunk). With several ranges each writes its top candidates and a merge kernel reduces them.
   Output: ``sel int32 [B, Hq, K-1]``, descending score order, ``-1`` in unused slots.
2. ``_decode_attn_kernel``, split-K: one program per (batch, key head, row block, work item, piece). Work items are
   the group's (query head, slot) entries plus the own chunk; chunks are cut into pieces of ``PIECE`` keys so that
   even ``B = 1`` fills the GPU. GQA packing: all query heads of the group that selected a chunk are rows of the one
   program that reads it (the entry of the first such head owns the chunk; the others exit at once), so a chunk's
   keys/values are read once per group however many of its heads chose it. Each program writes, per active row, a
   normalised fp32 partial output and its log-sum-exp into the row's (slot, piece) cell.
3. ``_decode_combine_kernel``: per (batch, query head), an exact log-sum-exp merge of the row's valid partials (the
   key sets are disjoint); writes ``out`` in the query dtype and ``lse`` (natural log).

Bytes read by one step: the chunk means of the earlier chunks (``(Lk - 1) // C * D * 4`` per key head), the union
over the group of the selected chunks' keys and values, and the own chunk; nothing else grows with ``Lk``. Passing
``means=None`` adds an O(Lk) read (every earlier key) to compute the means; a KV cache keeps them instead
(:func:`decode_chunk_means`).

Softmax runs in the log2 domain (``exp2`` with ``scale * log2(e)`` folded into the scores). Under the Triton
interpreter the kernels upcast 16-bit tiles to fp32 before ``tl.dot`` (the interpreter's bf16 dot is wrong; the
upcast is exact), so interpreted tests check the same algorithm.
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gating import (
    MEANS_NUM_STAGES,
    MEANS_NUM_WARPS,
    _chunk_mean,
    _chunk_means_kernel,
    launch_chunk_means,
    means_block_n,
)
from .jit import kernel_jit
from .launch import device_capability, empty, tuned_for
from .support import (
    MAX_CHUNK,
    MIN_CHUNK,
    bounded_params,
    check_routing,
    dot_precision,
    interpreting,
    next_pow2,
    shared_unsupported_reason,
    speed_up_interpreter,
)
from .tiles import SENTINEL, chunk_indices, merge_top, pack_scores

__all__ = [
    "DECODE_HEAD_DIMS",
    "DENSE_DECODE_CHUNK",
    "decode_chunk_means",
    "dense_decode_chunk",
    "dense_decode_triton",
    "dense_decode_unsupported_reason",
    "decode_select_chunks_triton",
    "decode_unsupported_reason",
    "moba_decode_static_triton",
    "moba_decode_triton",
    "static_length_triton",
    "static_length_unsupported_reason",
    "update_static_means_triton",
]

# Head dims the decode kernels are built and tuned for (query/key and value alike); others go to the reference.
DECODE_HEAD_DIMS = (64, 128)
# Query heads per row block: a [64, D] query tile and the [64, next_pow2(K-1)] selection tile stay in registers.
# Larger groups (MQA with > 64 heads) are cut into row blocks that each read their chunks.
_MAX_ROWS = 64

_NEG_INF = tl.constexpr(float("-inf"))
_LN2 = tl.constexpr(math.log(2.0))
_LOG2E = math.log2(math.e)


# Chunk means: the gate's kernel (.gating.launch_chunk_means), so a decode step's means are bitwise the prefill's. The
# old name stays for benchmarks/decode.py's compile check.
_decode_means_kernel = _chunk_means_kernel


@triton.jit
def _device_length(len_ptr, b, slots):
    """Batch row ``b``'s key length on a static cache (int64 ``len_ptr[b]``), clamped to ``[1, slots]``.

    A decode step's length counts its own key, so it is >= 1; the clamp keeps a bad value from reading outside the
    buffer (the op's docstring states the contract). int32, as the kernels' key positions.
    """
    n = tl.load(len_ptr + b)
    return tl.minimum(tl.maximum(n, 1), slots).to(tl.int32)


# --------------------------------------------------------------------------------------------------------------------
# Gate: scores of the group's query heads against the earlier chunks' means, running top-(K-1)
# --------------------------------------------------------------------------------------------------------------------
@kernel_jit
def _decode_gate_kernel(
    q_ptr,
    means_ptr,
    out_ptr,
    len_ptr,
    C,
    G,
    Hkv,
    ROWS,
    GB,
    n_prev,
    chunks_per_split,
    KM1,
    sqb,
    sqh,
    sqd,
    smb,
    smh,
    smc,
    smd,
    HEAD_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TOP: tl.constexpr,
    FINAL: tl.constexpr,
    DEV_LEN: tl.constexpr,
    GROUP: tl.constexpr,
):
    prb = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    n_split = tl.num_programs(1)
    plane = prb // GB
    rb = prb % GB
    b = plane // Hkv
    hkv = plane % Hkv
    if DEV_LEN:
        # Static cache: the row's length is read on the device (n_prev is the buffer's bound), so the launch, its
        # grid and its arguments are the same at every step (CUDA-graph replay).
        n_prev = tl.minimum(n_prev, (_device_length(len_ptr, b, n_prev * C + C) - 1) // C)
    offs_g = tl.arange(0, BLOCK_G)
    g = rb * ROWS + offs_g
    row_ok = (offs_g < ROWS) & (g < G)
    head = hkv * G + g  # query head of each row (int64)
    offs_d = tl.arange(0, HEAD_D)
    q = tl.load(q_ptr + b * sqb + head[:, None] * sqh + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32)  # fp16/bf16 -> fp32 is exact; the gate is an fp32 dot product
    m_base = means_ptr + b * smb + hkv * smh
    top = tl.full([BLOCK_G, TOP], SENTINEL, tl.int64)  # ascending (bitonic_merge below wants one ascending input)
    c_lo = sp * chunks_per_split
    c_hi = tl.minimum(c_lo + chunks_per_split, n_prev)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < c_hi
        mt = tl.load(m_base + offs_c.to(tl.int64)[:, None] * smc + offs_d[None, :] * smd, mask=c_ok[:, None], other=0.0)
        if GROUP:
            # Group routing: every row scores the sum over all G query heads of the group (in every row block, in the
            # same order), so the rows' top-k are one and the same selection, whichever block holds them.
            total = tl.zeros([BLOCK_C], dtype=tl.float32)
            for r in range(0, GB):
                gr = r * ROWS + offs_g
                ok_r = (offs_g < ROWS) & (gr < G)
                q_r = tl.load(
                    q_ptr + b * sqb + (hkv * G + gr)[:, None] * sqh + offs_d[None, :] * sqd,
                    mask=ok_r[:, None],
                    other=0.0,
                )
                total += tl.sum(tl.dot(q_r.to(tl.float32), tl.trans(mt), input_precision="ieee"), axis=0)
            sc = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32) + total[None, :]
        else:
            sc = tl.dot(q, tl.trans(mt), input_precision="ieee")
        packed = tl.where(c_ok[None, :], pack_scores(sc, offs_c), SENTINEL)
        top = merge_top(top, packed, TOP)
    slot = TOP - 1 - tl.arange(0, TOP)  # reversed: descending score order
    if FINAL:
        idx = chunk_indices(top)
        rows = (b * Hkv * G + head) * KM1
        tl.store(out_ptr + rows[:, None] + slot[None, :], idx, mask=row_ok[:, None] & (slot < KM1)[None, :])
    else:
        # Candidates stored in descending order, so that the merge kernel can max() them against its ascending top.
        cells = ((prb * n_split + sp) * BLOCK_G + offs_g) * TOP
        tl.store(out_ptr + cells[:, None] + slot[None, :], top)


@kernel_jit
def _decode_gate_merge_kernel(
    cand_ptr,
    sel_ptr,
    G,
    Hkv,
    ROWS,
    GB,
    n_split,
    KM1,
    BLOCK_G: tl.constexpr,
    TOP: tl.constexpr,
):
    prb = tl.program_id(0).to(tl.int64)
    plane = prb // GB
    rb = prb % GB
    b = plane // Hkv
    hkv = plane % Hkv
    offs_g = tl.arange(0, BLOCK_G)
    offs_t = tl.arange(0, TOP)
    g = rb * ROWS + offs_g
    row_ok = (offs_g < ROWS) & (g < G)
    top = tl.full([BLOCK_G, TOP], SENTINEL, tl.int64)
    for sp in range(0, n_split):
        cells = ((prb * n_split + sp) * BLOCK_G + offs_g) * TOP
        cand = tl.load(cand_ptr + cells[:, None] + offs_t[None, :])  # descending
        top = tl.bitonic_merge(tl.maximum(top, cand), dim=1, descending=False)
    slot = TOP - 1 - offs_t
    idx = chunk_indices(top)
    rows = (b * Hkv * G + hkv * G + g) * KM1
    tl.store(sel_ptr + rows[:, None] + slot[None, :], idx, mask=row_ok[:, None] & (slot < KM1)[None, :])


# --------------------------------------------------------------------------------------------------------------------
# Split-K attention over (selected chunk | own chunk) pieces, GQA rows packed into one tile
# --------------------------------------------------------------------------------------------------------------------
@kernel_jit
def _decode_attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    sel_ptr,
    po_ptr,
    plse_ptr,
    len_ptr,
    G,
    Hkv,
    ROWS,
    GB,
    Lk,
    C,
    KM1,
    KS,
    S,
    PIECE,
    own_chunk,
    qk_scale,
    sqb,
    sqh,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    smb,
    smh,
    smn,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TOPP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_HEADS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DEV_LEN: tl.constexpr,
    SHARED: tl.constexpr,
):
    prb = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1)
    s = tl.program_id(2)
    plane = prb // GB
    rb = prb % GB
    b = plane // Hkv
    hkv = plane % Hkv
    if DEV_LEN:  # static cache: Lk is the buffer's slot count, the row's length is on the device
        Lk = _device_length(len_ptr, b, Lk)
        own_chunk = (Lk - 1) // C
    offs_g = tl.arange(0, BLOCK_G)
    g = rb * ROWS + offs_g
    row_ok = (offs_g < ROWS) & (g < G)
    head0 = b * Hkv * G + hkv * G  # flat (batch, query head) index of the group's first head
    if SHARED:
        # Every row of the row block holds the same selection (dense decode: every earlier chunk): one work item per
        # slot, read from the block's first row, runs the chunk for all rows. The per-row search below would give the
        # same result, but from ROWS * KM1 work items of which all but KM1 exit at once.
        n_sel = KM1
        is_own = w >= n_sel
        is_sel = w < n_sel
        w_sel = tl.minimum(w, tl.maximum(n_sel - 1, 0))
        c_sel = tl.load(sel_ptr + (head0 + rb * ROWS) * KM1 + w_sel, mask=is_sel, other=-1)
        runs = c_sel >= 0
        active = row_ok
        slot = tl.zeros([BLOCK_G], dtype=tl.int32) + tl.where(is_own, KM1, w)
    else:
        n_sel = ROWS * KM1
        is_own = w >= n_sel
        is_sel = w < n_sel
        # Selected entry w = (local row gl, slot j) of this row block; the last work item is the own chunk.
        km1d = tl.maximum(KM1, 1)
        w_sel = tl.minimum(w, tl.maximum(n_sel - 1, 0))
        gl = w_sel // km1d
        j = w_sel % km1d
        c_sel = tl.load(sel_ptr + (head0 + rb * ROWS + gl) * KM1 + j, mask=is_sel & (rb * ROWS + gl < G), other=-1)
        offs_j = tl.arange(0, TOPP)
        n_cols = tl.where(is_sel, KM1, 0)  # (and-ing a scalar bool into a tile mask breaks the interpreter)
        tile = tl.load(
            sel_ptr + (head0 + g)[:, None] * KM1 + offs_j[None, :],
            mask=row_ok[:, None] & (offs_j < n_cols)[None, :],
            other=-1,
        )
        # Rows of the row block that chose chunk c_sel, and where they keep it. A row lists a chunk at most once.
        hit = (tile == c_sel) & (c_sel >= 0)
        chose = tl.max(hit.to(tl.int32), axis=1) > 0
        first = tl.min(tl.where(chose, offs_g, BLOCK_G), axis=0)
        active = tl.where(is_own, row_ok, chose)
        slot = tl.where(is_own, KM1, tl.sum(tl.where(hit, offs_j[None, :], 0), axis=1))
        # Only the first row that chose the chunk runs it (for every row that chose it); the others exit below.
        runs = (c_sel >= 0) & (first == gl)
    c = tl.where(is_own, own_chunk, c_sel)
    lo = c * C + s * PIECE
    hi = tl.minimum(tl.minimum(lo + PIECE, c * C + C), Lk)
    go = (is_own | runs) & (lo < hi)
    if go:
        head = hkv * G + g
        offs_d = tl.arange(0, HEAD_D)
        offs_dv = tl.arange(0, HEAD_DV)
        blk = tl.arange(0, BLOCK_N)
        q = tl.load(q_ptr + b * sqb + head[:, None] * sqh + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
        if UPCAST:  # interpreter: its bf16 tl.dot is wrong; the upcast is exact
            q = q.to(tl.float32)
        k_base = k_ptr + b * skb + hkv * skh
        v_base = v_ptr + b * svb + hkv * svh
        mask_base = mask_ptr + b * smb
        mask_rows = (hkv * G + rb * ROWS).to(tl.int32) * smh + offs_g * smh  # int32: checked by the launcher
        m_i = tl.full([BLOCK_G], _NEG_INF, tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DV], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            in_rng = start + blk < hi
            # 64-bit scalar block base + 32-bit in-block offsets (an int64 [BLOCK_N, D] offset tile costs registers).
            k = tl.load(
                (k_base + tl.cast(start, tl.int64) * skn) + (blk[:, None] * skn + offs_d[None, :] * skd),
                mask=in_rng[:, None],
                other=0.0,
            )
            v = tl.load(
                (v_base + tl.cast(start, tl.int64) * svn) + (blk[:, None] * svn + offs_dv[None, :] * svd),
                mask=in_rng[:, None],
                other=0.0,
            )
            if UPCAST:
                sc = tl.dot(q, tl.trans(k.to(tl.float32)))
            else:
                sc = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            sc = tl.where(in_rng[None, :], sc * qk_scale, _NEG_INF)
            if HAS_MASK:
                mask_blk = mask_base + tl.cast(start, tl.int64) * smn
                if MASK_HEADS:
                    # 64-bit scalar base + 32-bit [rows, keys] offsets (int64 pointer tiles cost registers).
                    allowed = tl.load(
                        mask_blk + (mask_rows[:, None] + blk[None, :] * smn),
                        mask=active[:, None] & in_rng[None, :],
                        other=0,
                    )
                    sc = tl.where(allowed != 0, sc, _NEG_INF)
                else:  # one mask row for every head (padding masks [B, 1, 1, Lk]): one [BLOCK_N] vector
                    allowed = tl.load(mask_blk + blk * smn, mask=in_rng, other=0)
                    sc = tl.where(allowed[None, :] != 0, sc, _NEG_INF)
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            # A row masked so far keeps m = -inf: shift by 0 instead, so exp2(-inf - -inf) never appears.
            m_use = tl.where(m_new == _NEG_INF, 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(sc - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p_lo = p.to(v.dtype)  # the P operand rounded to the value dtype, as tensor cores take it
            if UPCAST:
                pv = tl.dot(p_lo.to(tl.float32), v.to(tl.float32))
            else:
                pv = tl.dot(p_lo, v, input_precision=DOT_PREC)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        has = l_i > 0.0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse2 = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), _NEG_INF)
        cell = ((head0 + g) * KS + slot) * S + s
        tl.store(po_ptr + cell[:, None] * HEAD_DV + offs_dv[None, :], o, mask=active[:, None])
        tl.store(plse_ptr + cell, lse2, mask=active)


@triton.jit
def _combine_valid(sel_ptr, row, f, n_f, KM1, S, PIECE, own_len):
    """Which partial cells were written: every piece of a selected slot, and the own chunk's non-empty pieces."""
    j = f // S
    piece = f % S
    chosen = tl.load(sel_ptr + row * KM1 + j, mask=(f < n_f) & (j < KM1), other=-1)
    return (f < n_f) & (((j < KM1) & (chosen >= 0)) | ((j == KM1) & (piece * PIECE < own_len)))


@kernel_jit
def _decode_combine_kernel(
    po_ptr,
    plse_ptr,
    sel_ptr,
    out_ptr,
    lse_ptr,
    len_ptr,
    Hq,
    C,
    Lk,
    KM1,
    KS,
    S,
    PIECE,
    own_len,
    HEAD_DV: tl.constexpr,
    BLOCK_F: tl.constexpr,
    DEV_LEN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # flat (batch, query head)
    if DEV_LEN:  # static cache: the own chunk's length from the row's device length
        n = _device_length(len_ptr, row // Hq, Lk)
        own_len = n - ((n - 1) // C) * C
    offs_dv = tl.arange(0, HEAD_DV)
    n_f = KS * S
    # Two passes over the row's cells (a few KiB, L2-resident): the max, then the weighted sum; no rescaling.
    m_vec = tl.full([BLOCK_F], _NEG_INF, tl.float32)
    for f0 in range(0, n_f, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        valid = _combine_valid(sel_ptr, row, f, n_f, KM1, S, PIECE, own_len)
        m_vec = tl.maximum(m_vec, tl.load(plse_ptr + row * n_f + f, mask=valid, other=_NEG_INF))
    m = tl.max(m_vec, 0)
    m_use = tl.where(m == _NEG_INF, 0.0, m)
    l_vec = tl.zeros([BLOCK_F], dtype=tl.float32)
    acc = tl.zeros([BLOCK_F, HEAD_DV], dtype=tl.float32)
    for f0 in range(0, n_f, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        valid = _combine_valid(sel_ptr, row, f, n_f, KM1, S, PIECE, own_len)
        cell = row * n_f + f
        p = tl.math.exp2(tl.load(plse_ptr + cell, mask=valid, other=_NEG_INF) - m_use)  # 0 on empty/unwritten cells
        o = tl.load(po_ptr + cell[:, None] * HEAD_DV + offs_dv[None, :], mask=valid[:, None], other=0.0)
        l_vec += p
        acc += p[:, None] * o
    l_i = tl.sum(l_vec, 0)
    has = l_i > 0.0
    out = tl.sum(acc, 0) / tl.where(has, l_i, 1.0)
    lse = tl.where(has, (m_use + tl.math.log2(tl.where(has, l_i, 1.0))) * _LN2, _NEG_INF)
    tl.store(out_ptr + row * HEAD_DV + offs_dv, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + row, lse)


# --------------------------------------------------------------------------------------------------------------------
# Static cache: the chunks a step completed, found on the device and averaged in place
# --------------------------------------------------------------------------------------------------------------------
@triton.jit
def _static_step_chunk(len_ptr, b, i, new_tokens, slots, C, N_UPD):
    """Chunk ``c`` of update slot ``i`` for batch row ``b`` and whether the step completed it.

    The step wrote keys ``[end - new_tokens, end)``; it completed chunks ``[first, done)``. The ``N_UPD`` slots cover
    ``done - N_UPD .. done - 1`` (from 0 when fewer exist): distinct, in range, a superset of the completed ones.
    """
    end = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), slots)
    done = end // C
    first = tl.maximum(end - new_tokens, 0) // C
    c = tl.maximum(done - N_UPD, 0) + i
    return c, (c >= first) & (c < done)


@kernel_jit
def _static_step_means_kernel(
    k_ptr,
    len_ptr,
    means_ptr,
    Hkv,
    Lk,
    new_tokens,
    C,
    N,
    skb,
    skh,
    skn,
    skd,
    smb,
    smh,
    smc,
    smd,
    HEAD_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per (update slot, batch x key head): N = new_tokens // C + 1 slots cover every chunk the step can
    # complete. Most decode steps complete none: then every program exits after reading one length, so such a step
    # costs a launch, not a chunk's read. A completed chunk is averaged in place from the cache's buffer by the one
    # means computation (_chunk_mean, as the prefill gate's kernel), and its row written; other rows are not touched.
    i = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    b = plane // Hkv
    h = plane % Hkv
    c, completed = _static_step_chunk(len_ptr, b, i, new_tokens, Lk, C, N)
    if completed:
        row = c.to(tl.int64)
        mean = _chunk_mean(k_ptr + b * skb + h * skh, row * C, Lk, C, skn, skd, HEAD_D, BLOCK_N)
        offs_d = tl.arange(0, HEAD_D).to(tl.int64)
        tl.store(means_ptr + b * smb + h * smh + row * smc + offs_d * smd, mean)


# --------------------------------------------------------------------------------------------------------------------
# Static cache: each row's length from the step's boolean mask, on the device
# --------------------------------------------------------------------------------------------------------------------
@kernel_jit
def _static_length_kernel(
    mask_ptr,
    part_ptr,
    out_ptr,
    H,
    Lk,
    N,
    smb,
    smh,
    smn,
    BLOCK: tl.constexpr,
    FINAL: tl.constexpr,
):
    # One program per (mask batch row, block of BLOCK slots) of the mask's last query row: one past the last slot that
    # any head allows in the block (0: none). FINAL (one block covers every slot): the row's length itself.
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < Lk
    seen = tl.zeros([BLOCK], dtype=tl.int32)
    base = mask_ptr + b * smb
    for h in range(0, H):
        allowed = tl.load(base + h * smh + offs.to(tl.int64) * smn, mask=in_row, other=0)
        seen = tl.maximum(seen, allowed.to(tl.int32))
    last = tl.max(tl.where(seen != 0, offs + 1, 0), axis=0)
    if FINAL:
        tl.store(out_ptr + b, tl.where(last == 0, Lk, last).to(tl.int64))
    else:
        tl.store(part_ptr + b * N + blk, last)


@kernel_jit
def _static_length_merge_kernel(part_ptr, out_ptr, Lk, N, BLOCK: tl.constexpr):
    # One program per mask batch row: the largest of its N block results; none (0) means the row allows nothing, whose
    # length is then every slot (what the reference's argmax over an all-False row gives).
    b = tl.program_id(0).to(tl.int64)
    best = tl.zeros([BLOCK], dtype=tl.int32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        best = tl.maximum(best, tl.load(part_ptr + b * N + offs, mask=offs < N, other=0))
    last = tl.max(best, axis=0)
    tl.store(out_ptr + b, tl.where(last == 0, Lk, last).to(tl.int64))


# --------------------------------------------------------------------------------------------------------------------
# Launch planning
# --------------------------------------------------------------------------------------------------------------------
# Keyed by device index, not by any tensor: a device's SM count is fixed for the life of the process.
@lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreted: a handful of "SMs" keeps the split logic exercised at tiny shapes
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class _GatePlan:
    block_c: int
    top: int
    chunks_per_split: int
    n_split: int
    num_warps: int


@dataclass(frozen=True)
class _AttnPlan:
    block_n: int
    piece: int
    n_pieces: int
    num_warps: int
    num_stages: int


def _rows(group: int) -> tuple[int, int, int]:
    """``(rows per row block, row blocks, padded tile rows)`` for ``group`` query heads per key head."""
    rows = min(group, _MAX_ROWS)
    return rows, -(-group // rows), max(16, next_pow2(rows))  # tl.dot wants >= 16 rows


def _gate_plan(planes: int, block_g: int, n_prev: int, km1: int, device: torch.device) -> _GatePlan:
    top = max(2, next_pow2(km1))  # tl.topk / bitonic_merge want powers of two
    if interpreting():
        # One block of 16 means per split: the two-stage path runs in tests from 17 earlier chunks on.
        block_c = max(16, top)
        n_blocks = -(-n_prev // block_c)
        return _GatePlan(block_c, top, block_c, n_blocks, 4)
    # A [rows, BLOCK_C] fp32 score tile + int64 key tile per step; the top-k merge cost grows with log^2(TOP), so
    # wide steps amortise it. Capping rows * BLOCK_C at 1024 keeps 64-row groups (MQA) free of spills (sm_90 compile:
    # a [64, 64] step spilled ~40 KB per thread at 4 warps). The means are small (n_prev * D * 4 bytes per key head,
    # 128 KiB at 1M tokens / chunk 4096), so narrow steps cost little.
    block_c = max(16, top, min(64, next_pow2(n_prev), 1024 // block_g))
    warps = 4 if block_g <= 16 else 8
    n_blocks = -(-n_prev // block_c)
    if n_blocks <= 2:  # two steps in one program beat a second launch
        return _GatePlan(block_c, top, n_blocks * block_c, 1, warps)
    # Otherwise spread the ranges so the (batch, key head) planes fill ~2 waves; one merge launch reduces them. A step
    # is latency-bound (load, dot, top-k network): at B = 1, Hkv = 8, 1M tokens / chunk 4096 (4 steps), 8 programs
    # would run them one after another while 32 programs + a 4-step merge of [rows, TOP] keys run them side by side.
    want = max(1, -(-2 * _num_sms(device) // max(planes, 1)))
    blocks_per = -(-n_blocks // min(n_blocks, want))
    return _GatePlan(block_c, top, blocks_per * block_c, -(-n_blocks // blocks_per), warps)


def _attn_plan(
    work_items: int, chunk_size: int, head_dim: int, head_dim_v: int, dtype: torch.dtype, device: torch.device
) -> _AttnPlan:
    if interpreting():
        # ~2 ms per program x iteration interpreted: 16-key blocks, 32-key pieces (chunks of 64 split in two).
        block_n = 16
        piece = min(-(-chunk_size // block_n) * block_n, 32)
        return _AttnPlan(block_n, piece, -(-chunk_size // piece), 4, 1)
    # H100, memory-bound: a [64, D + Dv] 16-bit K/V block per stage (32 KiB at D = Dv = 128); 3 stages compile to
    # 70 KiB of shared memory and 137 registers (sm_90, no mask), so 2-3 programs per SM, each keeping 2 blocks of
    # loads in flight. D = 64 takes 128-key blocks; fp32 halves the block (64 keys spilled at 255 registers).
    block_n = 64 if head_dim + head_dim_v > 128 else 128
    if dtype == torch.float32:
        block_n //= 2
    # Split chunks into pieces until the grid has ~8 programs per SM (small batches, few key heads), but keep
    # pieces >= 512 keys so a program's prologue (query, selection tile) and epilogue stay a small fraction.
    target = 8 * _num_sms(device)
    splits = max(1, -(-target // max(work_items, 1)))
    piece = max(-(-chunk_size // splits), min(512, chunk_size))
    piece = -(-piece // block_n) * block_n
    # 3 stages = 70 KiB of shared memory (sm_90); elsewhere (not timed) 2 keep it within smaller shared memories.
    stages = 3 if tuned_for(device_capability(device)) else 2
    return _AttnPlan(block_n, piece, -(-chunk_size // piece), 4, stages)


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------
def decode_unsupported_reason(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    chunk_size: int,
    topk: int,
    attn_mask: Tensor | None,
    means: Tensor | None = None,
) -> str | None:
    """Why :func:`moba_decode_triton` cannot run these inputs, or ``None`` when it can.

    Only metadata is read (dtype, device, shapes), so fake/meta tensors work.

    Args:
        query: ``[B, Hq, 1, D]``; key: ``[B, Hkv, Lk, D]``; value: ``[B, Hkv, Lk, Dv]``.
        chunk_size: MoBA chunk size; supported: a multiple of 16 in ``[16, 8192]``.
        topk: chunks per query including its own; supported: ``1 <= topk <= 64``.
        attn_mask: ``None`` or a boolean tensor broadcastable to ``[B, Hq, 1, Lk]`` on the query's device.
        means: ``None`` or fp32 ``[B, Hkv, n_means, D]`` with ``n_means >= (Lk - 1) // chunk_size``.

    Returns:
        ``None`` if supported, else a short reason, e.g. ``"decode needs Lq == 1, got Lq=4"``,
        ``"head dim 96 not in (64, 128)"``, ``"dtype float64 routed to the reference"``,
        ``"chunk_size 24 is not a multiple of 16"``, ``"topk 65 > 64"``, ``"CPU tensors need TRITON_INTERPRET=1"``,
        ``"means has 3 chunks, need >= 5"`` or ``"triton is not installed"``.

    Example:
        >>> q, k = torch.randn(1, 4, 1, 96), torch.randn(1, 2, 40, 96)
        >>> decode_unsupported_reason(q, k, k, 16, 3, None)
        'head dim 96 not in (64, 128)'
    """
    reason = shared_unsupported_reason(query, key, value, chunk_size, topk, attn_mask, head_dims=DECODE_HEAD_DIMS)
    if reason is not None:
        return reason
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    dev = query.device
    if lq != 1:
        return f"decode needs Lq == 1, got Lq={lq}"
    if lk == 0:
        return "empty key cache (Lk = 0)"
    if lk >= 2**31 - 2 * MAX_CHUNK:  # key positions are int32 inside the kernels
        return f"Lk={lk} overflows the kernels' int32 key positions"
    if attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.shape[-3] > 1 and hq * lk >= 2**31:
        return f"a per-head attn_mask with Hq * Lk = {hq * lk} >= 2**31 overflows the kernel's int32 offsets"
    if means is not None:
        n_prev = (lk - 1) // bounded_params(lk, chunk_size, topk)[0]
        if not isinstance(means, Tensor) or means.dim() != 4:
            return "means must be a 4-D tensor [B, Hkv, n_means, D]"
        if means.dtype != torch.float32:
            return f"means must be float32, got {str(means.dtype).removeprefix('torch.')}"
        if means.device != dev:
            return f"means is on {means.device}, query on {dev}"
        if means.shape[0] != b or means.shape[1] != hkv or means.shape[3] != d:
            return f"means shape {tuple(means.shape)} does not match [B={b}, Hkv={hkv}, n, D={d}]"
        if means.shape[2] < n_prev:
            return f"means has {means.shape[2]} chunks, need >= {n_prev}"
    return None


def decode_chunk_means(key: Tensor, chunk_size: int) -> Tensor:
    """Means of the complete key chunks, fp32: what a KV cache keeps so that decode steps skip an O(Lk) read.

    A cache appends one row when a chunk fills (the mean of its ``chunk_size`` keys); a decode step at ``Lk`` keys
    needs the first ``(Lk - 1) // chunk_size`` rows. This function reads every complete chunk (O(Lk)): call it once
    (e.g. after prefill), not per step.

    Args:
        key: ``[B, Hkv, Lk, D]`` fp16/bf16/fp32, any strides, on CUDA (or CPU under ``TRITON_INTERPRET=1``);
            ``D`` in :data:`DECODE_HEAD_DIMS`.
        chunk_size: ``C``, a multiple of 16 in ``[16, 8192]``.

    Returns:
        fp32 ``[B, Hkv, Lk // C, D]``, contiguous: row ``c`` is the mean of keys ``[c*C, (c+1)*C)``, summed in fp32
        by the prefill gate's kernel: bitwise the means a prefill of the same keys computes (and
        ``moba_compile.ops.chunk_means``); to fp32 rounding of ``reference.chunk_means``.

    Raises:
        ValueError: bad shapes, head dim or chunk size.

    Example:
        >>> means = decode_chunk_means(torch.ones(1, 2, 40, 64), 16)  # doctest: +SKIP
        >>> means.shape
        torch.Size([1, 2, 2, 64])
    """
    if key.dim() != 4 or key.shape[-1] not in DECODE_HEAD_DIMS:
        raise ValueError(f"key must be [B, Hkv, Lk, D] with D in {DECODE_HEAD_DIMS}, got {tuple(key.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size % 16 or chunk_size < 16:
        raise ValueError(f"chunk_size must be a positive multiple of 16, got {chunk_size!r}")
    return launch_chunk_means(key, chunk_size, key.shape[2] // chunk_size)


def _launch_gate(
    query: Tensor,
    means: Tensor,
    hkv: int,
    n_prev: int,
    km1: int,
    chunk_size: int = 1,
    length: Tensor | None = None,
    routing: str = "head",
) -> Tensor:
    """``int32 [B, Hq, km1]`` top-``km1`` earlier chunks of the decode query (``km1 <= n_prev``).

    ``length`` (int64 ``[B]``, static caches): each row's key count, read on the device; ``n_prev`` is then the
    buffer's bound ``(slots - 1) // chunk_size`` and slots past a row's ``(length - 1) // chunk_size`` earlier chunks
    hold ``-1``. ``routing="group"``: every query head of a group gets the top-k of the group-summed scores.
    """
    b, hq, _, d = query.shape
    group = hq // hkv
    rows, gb, block_g = _rows(group)
    sel = empty(b, hq, km1, dtype=torch.int32, device=query.device)
    planes = b * hkv * gb
    plan = _gate_plan(planes, block_g, n_prev, km1, query.device)
    if interpreting():
        speed_up_interpreter()
    sqb, sqh, _, sqd = query.stride()
    dev_len = length is not None
    lengths = length if dev_len else query  # never read without DEV_LEN
    common = dict(
        HEAD_D=d, BLOCK_G=block_g, BLOCK_C=plan.block_c, TOP=plan.top, DEV_LEN=dev_len, num_warps=plan.num_warps,
        GROUP=routing == "group" and group > 1,
    )  # fmt: skip
    if plan.n_split == 1:
        _decode_gate_kernel[(planes, 1)](
            query, means, sel, lengths, chunk_size, group, hkv, rows, gb, n_prev, plan.chunks_per_split, km1,
            sqb, sqh, sqd, *means.stride(), FINAL=True, **common,
        )  # fmt: skip
        return sel
    cand = empty(planes, plan.n_split, block_g, plan.top, dtype=torch.int64, device=query.device)
    _decode_gate_kernel[(planes, plan.n_split)](
        query, means, cand, lengths, chunk_size, group, hkv, rows, gb, n_prev, plan.chunks_per_split, km1,
        sqb, sqh, sqd, *means.stride(), FINAL=False, **common,
    )  # fmt: skip
    _decode_gate_merge_kernel[(planes,)](
        cand, sel, group, hkv, rows, gb, plan.n_split, km1, BLOCK_G=block_g, TOP=plan.top, num_warps=4
    )
    return sel


def decode_select_chunks_triton(
    query: Tensor, key: Tensor, chunk_size: int, topk: int, *, means: Tensor | None = None, routing: str = "head"
) -> Tensor:
    """The decode gate alone: the ``topk - 1`` earlier chunks each query head of a decode step attends to.

    Args:
        query: ``[B, Hq, 1, D]``; key: ``[B, Hkv, Lk, D]`` (only its shape is read when ``means`` is given);
            fp16/bf16/fp32 on CUDA (or CPU under ``TRITON_INTERPRET=1``); see :func:`decode_unsupported_reason`.
        chunk_size, topk: MoBA parameters (``topk`` counts the own chunk).
        means: optional fp32 ``[B, Hkv, n_means >= (Lk - 1) // chunk_size, D]`` chunk means (else computed, O(Lk)).
        routing: ``"head"`` or ``"group"`` (the group-summed scores' top-k, the same for each head of a group).

    Returns:
        ``int32 [B, Hq, K' - 1]``, ``K' = min(topk, ceil(Lk / chunk_size))`` (as ``reference.select_chunks``),
        contiguous: chunk indices in descending fp32 score ``q . mean`` (ties: the later chunk first), ``-1`` where
        fewer than ``K' - 1`` earlier chunks exist. Equals
        ``reference.select_chunks(query, key, ...)[:, :, 0]`` except where two scores differ by less than the fp32
        rounding of differently ordered sums.

    Raises:
        ValueError: the inputs are unsupported (the reason of :func:`decode_unsupported_reason`), or an unknown
            ``routing``.

    Example:
        >>> q, k = torch.randn(1, 2, 1, 64), torch.randn(1, 1, 80, 64)
        >>> decode_select_chunks_triton(q, k, 16, 3).shape  # doctest: +SKIP
        torch.Size([1, 2, 2])
    """
    check_routing(routing)
    reason = decode_unsupported_reason(query, key, key, chunk_size, topk, None, means)
    if reason is not None:
        raise ValueError(f"MoBA decode gate cannot run: {reason}")
    b, hq = query.shape[0], query.shape[1]
    hkv, lk = key.shape[1], key.shape[2]
    chunk_size, topk = bounded_params(lk, chunk_size, topk)  # the same call; what the check above judged
    n_prev = (lk - 1) // chunk_size
    km1 = min(topk - 1, n_prev)
    if km1 == 0 or b == 0:
        return torch.full((b, hq, topk - 1), -1, dtype=torch.int32, device=query.device)
    if means is None:
        means = launch_chunk_means(key, chunk_size, n_prev)
    sel = _launch_gate(query, means, hkv, n_prev, km1, routing=routing)
    if km1 < topk - 1:
        sel = torch.nn.functional.pad(sel, (0, topk - 1 - km1), value=-1)
    return sel


def moba_decode_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    chunk_size: int,
    topk: int,
    scale: float,
    attn_mask: Tensor | None = None,
    means: Tensor | None = None,
    *,
    routing: str = "head",
) -> tuple[Tensor, Tensor]:
    """One MoBA decode step: the query at position ``Lk - 1`` against the whole KV cache, read sparsely.

    The query attends to its own chunk ``(Lk - 1) // C`` (all of its keys are in the past) plus the ``topk - 1``
    strictly earlier chunks with the highest fp32 score ``q . mean(key[c])`` (ties to the later chunk), intersected
    with ``attn_mask``; exactly ``reference.moba_attention_forward`` with ``Lq == 1``. GQA/MQA query head ``h`` reads
    key/value head ``h // (Hq // Hkv)``; key/value are never repeated, and a chunk chosen by several heads of one
    group is read once for all of them.

    Cost: with ``means`` given, a step reads the earlier chunks' means, the selected chunks (at most
    ``topk - 1`` per query head, shared within a group) and the own chunk: it grows with ``topk * chunk_size`` and
    ``Lk / chunk_size``, not with ``Lk``. With ``means=None`` the means are computed first, which reads every earlier
    key: O(Lk) per step. Keep them in the cache (:func:`decode_chunk_means`, one row per filled chunk).

    Args:
        query: ``[B, Hq, 1, D]``; key: ``[B, Hkv, Lk, D]``; value: ``[B, Hkv, Lk, Dv]``; one dtype (fp16, bf16 or
            fp32), any strides, on CUDA (or CPU under ``TRITON_INTERPRET=1``); ``D, Dv`` in ``(64, 128)``;
            ``Hq % Hkv == 0``.
        chunk_size: ``C``, a multiple of 16 in ``[16, 8192]``.
        topk: ``1 <= topk <= 64``, counting the own chunk (``topk = 1``: own chunk only).
        scale: softmax scale (``1 / sqrt(D)`` for SDPA's default).
        attn_mask: optional boolean mask broadcastable to ``[B, Hq, 1, Lk]`` (True = may attend), e.g. a
            ``[B, 1, 1, Lk]`` padding mask. The gate ignores it.
        means: optional fp32 ``[B, Hkv, n_means, D]``, ``n_means >= (Lk - 1) // C``: row ``c`` the mean of key
            chunk ``c`` (rows beyond ``(Lk - 1) // C`` are ignored).
        routing: ``"head"`` (default) or ``"group"`` (one selection per key head from the group-summed scores).

    Returns:
        ``(out, lse)``: ``out [B, Hq, 1, Dv]`` contiguous in the query's dtype; ``lse [B, Hq, 1]`` fp32, the natural
        log-sum-exp of the scaled scores over the attended keys. A row with no attended key (fully masked) gets
        ``out = 0`` and ``lse = -inf``.

    Raises:
        ValueError: unsupported inputs, with the reason of :func:`decode_unsupported_reason`; an unknown ``routing``.

    Example:
        >>> q = torch.randn(1, 4, 1, 64, dtype=torch.float16)
        >>> k = v = torch.randn(1, 2, 100, 64, dtype=torch.float16)
        >>> out, lse = moba_decode_triton(q, k, v, 16, 3, 0.125)  # doctest: +SKIP
        >>> out.shape, lse.shape
        (torch.Size([1, 4, 1, 64]), torch.Size([1, 4, 1]))
    """
    check_routing(routing)
    reason = decode_unsupported_reason(query, key, value, chunk_size, topk, attn_mask, means)
    if reason is not None:
        raise ValueError(f"MoBA decode cannot run: {reason}")
    return _launch_decode(query, key, value, chunk_size, topk, scale, attn_mask, means, None, routing)


def _is_device_length(length: object, query: Tensor) -> bool:
    """Whether ``length`` is what the kernels read as per-row key counts: contiguous int64 ``[B]`` on the query's
    device (the one check both static-cache entry points make)."""
    return (
        isinstance(length, Tensor)
        and length.dtype == torch.int64
        and tuple(length.shape) == (query.shape[0],)
        and length.device == query.device
        and length.is_contiguous()
    )


def moba_decode_static_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    means: Tensor,
    length: Tensor,
    chunk_size: int,
    topk: int,
    scale: float,
    attn_mask: Tensor | None = None,
    *,
    routing: str = "head",
) -> tuple[Tensor, Tensor]:
    """One MoBA decode step on a static KV cache, graph-safe: each row's key count comes from a device tensor.

    ``key``/``value`` are the cache's whole buffers of ``slots`` positions; row ``b`` holds ``n = length[b]`` keys,
    its query sits at position ``n - 1`` and attends to its own chunk ``(n - 1) // C`` causally plus the ``topk - 1``
    best strictly earlier chunks scored against ``means`` (slots ``>= n`` are never read as keys, and means rows
    ``>= (n - 1) // C`` are never scored). Launch grids, kernel arguments and allocations depend on shapes only, never
    on ``length``'s value, and nothing synchronises with the host: the call can be captured in a CUDA graph and
    replayed as ``length`` grows. The result equals :func:`moba_decode_triton` on the first ``n`` keys with the same
    means (the same kernels, reading the length on the device).

    Args:
        query: ``[B, Hq, 1, D]``; key: ``[B, Hkv, slots, D]``; value: ``[B, Hkv, slots, Dv]``; as for
            :func:`moba_decode_triton` (one dtype, CUDA or CPU under ``TRITON_INTERPRET=1``, ``D, Dv`` in
            :data:`DECODE_HEAD_DIMS`).
        means: fp32 ``[B, Hkv, >= (slots - 1) // C, D]``, row ``c`` the mean of key chunk ``c`` (by the one means
            kernel, e.g. kept by ``moba_compile.ops.update_static_chunk_means_``), valid for ``c < (n - 1) // C``.
        length: int64 ``[B]`` contiguous, on the query's device: each row's key count, ``1 <= n <= slots`` (values
            outside are clamped to that range on the device; they cannot be checked without a host sync).
        chunk_size, topk, scale, attn_mask, routing: as for :func:`moba_decode_triton` (the mask spans the ``slots``).

    Returns:
        ``(out [B, Hq, 1, Dv], lse [B, Hq, 1] fp32)``, as :func:`moba_decode_triton`.

    Raises:
        ValueError: unsupported inputs (:func:`decode_unsupported_reason`), ``length`` not int64 ``[B]`` on the
            query's device, or an unknown ``routing``.

    Example:
        >>> q = torch.randn(1, 4, 1, 64, dtype=torch.float16)
        >>> k = v = torch.randn(1, 2, 128, 64, dtype=torch.float16)
        >>> means = decode_chunk_means(k, 16)  # doctest: +SKIP
        >>> out, lse = moba_decode_static_triton(q, k, v, means, torch.tensor([70]), 16, 3, 0.125)  # doctest: +SKIP
        >>> out.shape
        torch.Size([1, 4, 1, 64])
    """
    check_routing(routing)
    reason = decode_unsupported_reason(query, key, value, chunk_size, topk, attn_mask, means)
    if reason is None and not _is_device_length(length, query):
        reason = f"length must be a contiguous int64 [B={query.shape[0]}] tensor on {query.device}"
    if reason is not None:
        raise ValueError(f"MoBA static-cache decode cannot run: {reason}")
    return _launch_decode(query, key, value, chunk_size, topk, scale, attn_mask, means, length, routing)


# Dense decode's internal chunk: only the unit of its work grid (a work item per chunk, cut into pieces by _attn_plan),
# never a MoBA parameter. Parallelism comes from both: at 32K keys the 8 chunks are cut into pieces of >= 512 keys until
# the grid has ~8 programs per SM; at 1M the 256 chunks alone give B * Hkv * 256 work items. The chunk bounds the rest:
# the selection (slots / C int32 per row) and the combine's partial cells (slots / piece per row, Dv fp32 each: ~0.4%
# of the bf16 key/value bytes at 1M keys, pieces of 2048, 8 query heads per key head) stay small, and a static buffer
# holding n of its slots runs (slots - n) / piece programs that exit before reading a key. A smaller chunk adds cells
# and slots for no parallelism the pieces do not give already. Interpreted: 64, so that tests at ~100 keys cross chunk
# boundaries.
DENSE_DECODE_CHUNK = 4096
_DENSE_DECODE_CHUNK_INTERPRETED = 64
# CUDA's limit on the grid's second dimension (the attention kernel's work items: one per chunk, plus the own chunk).
_MAX_GRID_Y = 65535


def dense_decode_chunk(slots: int) -> int:
    """The internal chunk of :func:`dense_decode_triton` for a cache of ``slots`` keys (a multiple of 16).

    Example:
        >>> dense_decode_chunk(100) in (64, 112), dense_decode_chunk(1 << 20) in (64, 4096)
        (True, True)
    """
    chunk = _DENSE_DECODE_CHUNK_INTERPRETED if interpreting() else DENSE_DECODE_CHUNK
    return min(chunk, max(MIN_CHUNK, -(-slots // 16) * 16))


def dense_decode_unsupported_reason(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, chunk_size: int | None = None
) -> str | None:
    """Why :func:`dense_decode_triton` cannot run these inputs, or ``None`` when it can (metadata only).

    The limits of :func:`decode_unsupported_reason` (one query row, head dims in :data:`DECODE_HEAD_DIMS`,
    fp16/bf16/fp32, CUDA or the interpreter, a boolean mask), plus the internal chunk: ``chunk_size`` (None: the
    default, :func:`dense_decode_chunk`) a multiple of 16 in ``[16, 8192]`` giving at most 65535 chunks.

    Example:
        >>> q, k = torch.randn(1, 4, 1, 96), torch.randn(1, 2, 40, 96)
        >>> dense_decode_unsupported_reason(q, k, k, None)
        'head dim 96 not in (64, 128)'
    """
    reason = decode_unsupported_reason(query, key, value, MIN_CHUNK, 1, attn_mask)
    if reason is not None:
        return reason
    lk = key.shape[2]
    if chunk_size is None:
        chunk_size = dense_decode_chunk(lk)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size % 16:
        return f"chunk_size {chunk_size!r} is not a multiple of 16"
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        return f"chunk_size {chunk_size} not in [{MIN_CHUNK}, {MAX_CHUNK}]"
    if (lk - 1) // chunk_size + 1 > _MAX_GRID_Y:
        return f"Lk={lk} is more than {_MAX_GRID_Y} chunks of {chunk_size} keys (the kernel's grid limit)"
    return None


def dense_decode_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    scale: float,
    attn_mask: Tensor | None = None,
    length: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Dense causal attention of one decode query per (batch, head) on MoBA's split-K decode kernels, no gate.

    Dense attention of the query at position ``n - 1`` over keys ``0 .. n - 1`` is MoBA with every chunk before the
    query's own selected, so this runs :func:`moba_decode_static_triton`'s attention and combine kernels with that
    selection, built on the device from ``length`` (no chunk means, no gate): ``key.shape[2] / chunk_size`` work items
    per (batch, key head), each cut into pieces, so that ``B = 1`` at 32K-1M keys still fills the GPU, where SDPA's
    decode runs one program per (batch, head) over the whole sequence. GQA/MQA: query head ``h`` reads key head
    ``h // (Hq // Hkv)``; a group's query heads are the rows of one program, so its keys/values are read once.
    Graph-safe: launch grids, kernel arguments and allocations depend on shapes only, ``length`` is read on the
    device, nothing synchronises with the host (CUDA-graph capture and replay while ``length`` grows).

    Args:
        query: ``[B, Hq, 1, D]``; key: ``[B, Hkv, slots, D]``; value: ``[B, Hkv, slots, Dv]``: one dtype (fp16, bf16
            or fp32), any strides, on CUDA (or CPU under ``TRITON_INTERPRET=1``); ``D, Dv`` in
            :data:`DECODE_HEAD_DIMS`; ``Hq % Hkv == 0``.
        scale: softmax scale (``1 / sqrt(D)`` for SDPA's default).
        attn_mask: optional boolean mask broadcastable to ``[B, Hq, 1, slots]`` (True = may attend), e.g.
            transformers' static-cache mask or a ``[B, 1, 1, slots]`` padding mask, intersected with the causal
            range.
        length: None (every one of the ``slots`` keys is the sequence: a dynamic cache), or contiguous int64 ``[B]``
            on the query's device: row ``b`` holds ``length[b]`` keys, its query at position ``length[b] - 1``
            (values outside ``[1, slots]`` are clamped on the device; they cannot be checked without a host sync).
        chunk_size: the internal chunk (None: :func:`dense_decode_chunk`); any valid value gives the same attention.

    Returns:
        ``(out [B, Hq, 1, Dv] contiguous in the query's dtype, lse [B, Hq, 1] fp32)``: the attention and the natural
        log-sum-exp of the scaled scores over the attended keys; a row with no attended key gets ``out = 0`` and
        ``lse = -inf`` (as :func:`moba_decode_static_triton`).

    Raises:
        ValueError: unsupported inputs (:func:`dense_decode_unsupported_reason`), or ``length`` not int64 ``[B]`` on
            the query's device.

    Example:
        >>> q = torch.randn(1, 4, 1, 64, dtype=torch.float16)
        >>> k = v = torch.randn(1, 2, 128, 64, dtype=torch.float16)
        >>> out, lse = dense_decode_triton(q, k, v, 0.125, length=torch.tensor([70]))  # doctest: +SKIP
        >>> out.shape, lse.shape  # doctest: +SKIP
        (torch.Size([1, 4, 1, 64]), torch.Size([1, 4, 1]))
    """
    reason = dense_decode_unsupported_reason(query, key, value, attn_mask, chunk_size)
    if reason is None and length is not None and not _is_device_length(length, query):
        reason = f"length must be None or a contiguous int64 [B={query.shape[0]}] tensor on {query.device}"
    if reason is not None:
        raise ValueError(f"dense split-K decode cannot run: {reason}")
    b, hq = query.shape[0], query.shape[1]
    slots, dv = key.shape[2], value.shape[3]
    chunk = dense_decode_chunk(slots) if chunk_size is None else chunk_size
    out = empty(b, hq, 1, dv, dtype=query.dtype, device=query.device)
    lse = empty(b, hq, 1, dtype=torch.float32, device=query.device)
    if b == 0 or hq == 0:
        return out, lse
    sel = _dense_selection(b, hq, slots, chunk, length, query.device)
    _launch_split_k(query, key, value, sel, out, lse, chunk, scale, attn_mask, length, shared=True)
    return out, lse


def _dense_selection(b: int, hq: int, slots: int, chunk: int, length: Tensor | None, device: torch.device) -> Tensor:
    """``int32 [B, Hq, (slots - 1) // chunk]``: every chunk strictly before the row's own, in the gate's layout.

    The gate writes a row's chosen chunks first and ``-1`` in the slots it could not fill (fewer earlier chunks than
    slots: a static cache's shorter rows), and the attention and combine kernels skip ``-1`` slots; slot ``j`` holds
    chunk ``j`` here. Torch ops on the device, fixed shapes: no host read of ``length``.
    """
    km1 = (slots - 1) // chunk
    idx = torch.arange(km1, dtype=torch.int32, device=device)
    if length is None:  # every row holds all slots: all km1 earlier chunks
        return idx.expand(b, hq, km1).contiguous()
    # The kernels clamp the length to [1, slots] (_device_length): the same clamp, so both agree on the own chunk.
    n_prev = (length.clamp(1, slots) - 1) // chunk  # int64 [B]
    sel = torch.where(idx[None, :] < n_prev[:, None], idx[None, :], -1).to(torch.int32)
    return sel[:, None, :].expand(b, hq, km1).contiguous()


def update_static_means_triton(means: Tensor, key: Tensor, length: Tensor, new_tokens: int, chunk_size: int) -> None:
    """Average, in place, the chunks a step completed in a static cache, found from the device length (graph-safe).

    One launch of a fixed grid, no host synchronisation: ``new_tokens // C + 1`` update slots per (batch, key head),
    covering every chunk the step's keys can complete (found from ``length`` on the device). A program whose chunk the
    step did not complete exits after reading the length, so the decode steps that complete no chunk (all but one in
    ``C``) cost a launch and no key read; a completed chunk is averaged from the cache's buffer in place by the one
    means computation (``gating._chunk_mean``, the prefill gate's: every row is bitwise the mean the prefill gate,
    :func:`decode_chunk_means` and ``moba_compile.ops.chunk_means`` compute) and its row of ``means`` written; the
    other rows are not touched.

    Args:
        means: fp32 ``[B, Hkv, slots // C, D]``, updated in place. key: ``[B, Hkv, slots, D]`` (the cache's buffer,
            the step's keys written), fp16/bf16/fp32 on CUDA (or CPU under ``TRITON_INTERPRET=1``), ``D`` a power of
            two. length: contiguous int64 ``[B]``: keys held after the step (clamped to ``[0, slots]``).
        new_tokens: keys the step wrote (>= 1). chunk_size: ``C``.

    Raises:
        ValueError: shapes, dtypes or devices that do not match.

    Example:
        >>> k = torch.randn(1, 2, 64, 64)
        >>> means = torch.zeros(1, 2, 4, 64)
        >>> update_static_means_triton(means, k, torch.tensor([40]), 40, 16)  # doctest: +SKIP
        >>> torch.equal(means[:, :, :2], decode_chunk_means(k[:, :, :40], 16))  # doctest: +SKIP
        True
    """
    b, hkv, slots, d = key.shape
    if (
        means.dtype != torch.float32
        or tuple(means.shape) != (b, hkv, slots // chunk_size, d)
        or means.device != key.device
        or length.dtype != torch.int64
        or tuple(length.shape) != (b,)
        or not length.is_contiguous()
        or length.device != key.device
        or d & (d - 1)
        or d < 16
    ):
        raise ValueError(
            f"update_static_means_triton: means fp32 {[b, hkv, slots // chunk_size, d]}, length int64 [{b}] "
            f"contiguous, on {key.device}, D a power of two >= 16; got means {means.dtype} {list(means.shape)} on "
            f"{means.device}, length {length.dtype} {list(length.shape)} on {length.device}, D={d}"
        )
    n_upd = min(new_tokens // chunk_size + 1, slots // chunk_size)
    if n_upd == 0 or b * hkv == 0:
        return
    # The launch configuration of the prefill gate's means kernel (launch_chunk_means): the same summation order.
    _static_step_means_kernel[(n_upd, b * hkv)](
        key, length, means, hkv, slots, new_tokens, chunk_size, n_upd, *key.stride(), *means.stride(), HEAD_D=d,
        BLOCK_N=means_block_n(chunk_size), num_warps=MEANS_NUM_WARPS, num_stages=MEANS_NUM_STAGES,
    )  # fmt: skip


# Slots of the mask's last row per program of the length kernel: 4 KiB of a boolean mask, so that a 512K-slot static
# cache's row is read by 128 programs (the H200 has 132 SMs) and each program's loads stay small. Interpreted: 32, so
# that tests at ~100 slots cross blocks. The merge reads the per-block results in tiles of _LENGTH_MERGE_BLOCK.
_LENGTH_BLOCK = 4096
_LENGTH_BLOCK_INTERPRETED = 32
_LENGTH_MERGE_BLOCK = 1024
_LENGTH_MERGE_BLOCK_INTERPRETED = 4


def static_length_unsupported_reason(mask: Tensor) -> str | None:
    """Why :func:`static_length_triton` cannot read this mask, or ``None`` when it can (metadata only).

    Example:
        >>> static_length_unsupported_reason(torch.ones(1, 1, 1, 8, dtype=torch.bool, device="meta"))
        'meta tensors'
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        return "the mask is not a 4-D boolean tensor"
    if mask.device.type == "cpu":
        if not interpreting():
            return "CPU tensors need TRITON_INTERPRET=1"
    elif mask.device.type != "cuda":
        return f"{mask.device.type} tensors"
    if mask.shape[2] == 0 or mask.shape[3] == 0:
        return f"the mask has no query row or no slot (shape {list(mask.shape)})"
    if mask.shape[3] >= 2**31 - 1:
        return f"{mask.shape[3]} slots: the kernel's slot positions are int32"
    return None


def static_length_triton(mask: Tensor) -> Tensor:
    """The keys each batch row of a static KV cache holds, from the step's boolean mask: a graph-safe Triton read.

    One past the last slot that the mask's last query row allows in any head, per mask batch row; ``slots`` for a row
    that allows nothing (as ``moba_compile.ops.static_length_from_mask``'s reference, ``mask[:, :, -1].any(1)``,
    flipped, ``argmax``). The last row is read in blocks of slots, one program each (a 512K-slot row by 128 programs),
    and a second launch takes the largest result per row (one launch when one block covers the row): fixed grids set
    by the shape, no host synchronisation, no atomics (the result does not depend on the order programs run in), so it
    can be captured in a CUDA graph.

    Args:
        mask: boolean ``[B, H, Lq, slots]`` (True = may attend), any strides (broadcast dims included), on CUDA (or
            CPU under ``TRITON_INTERPRET=1``); ``Lq >= 1``, ``slots >= 1``.

    Returns:
        int64 ``[B]`` (the mask's batch size), contiguous, on the mask's device.

    Raises:
        ValueError: the reason of :func:`static_length_unsupported_reason`.

    Example:
        >>> mask = torch.zeros(2, 1, 1, 100, dtype=torch.bool)
        >>> mask[0, ..., :40] = True
        >>> static_length_triton(mask).tolist()  # doctest: +SKIP
        [40, 100]
    """
    reason = static_length_unsupported_reason(mask)
    if reason is not None:
        raise ValueError(f"static length kernel cannot run: {reason}")
    b, h, _, slots = mask.shape
    out = empty(b, dtype=torch.int64, device=mask.device)
    if b == 0:
        return out
    rows = mask.view(torch.uint8)[:, :, -1, :]  # [B, H, slots]: the last query row, one byte per slot
    block = min(_LENGTH_BLOCK_INTERPRETED if interpreting() else _LENGTH_BLOCK, next_pow2(slots))
    n_blocks = -(-slots // block)
    final = n_blocks == 1
    part = out if final else empty(b, n_blocks, dtype=torch.int32, device=mask.device)  # never read when final
    _static_length_kernel[(b, n_blocks)](
        rows, part, out, h, slots, n_blocks, *rows.stride(), BLOCK=block, FINAL=final, num_warps=4
    )
    if not final:
        merge = min(_LENGTH_MERGE_BLOCK_INTERPRETED if interpreting() else _LENGTH_MERGE_BLOCK, next_pow2(n_blocks))
        _static_length_merge_kernel[(b,)](part, out, slots, n_blocks, BLOCK=merge, num_warps=4)
    return out


def _launch_decode(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    chunk_size: int,
    topk: int,
    scale: float,
    attn_mask: Tensor | None,
    means: Tensor | None,
    length: Tensor | None,
    routing: str = "head",
) -> tuple[Tensor, Tensor]:
    """Gate + split-K attention + combine (validated inputs). ``length`` (int64 ``[B]``): a static cache's per-row
    key counts, read on the device; ``key.shape[2]`` is then the buffer's slot count and the grids depend on it only."""
    b, hq = query.shape[0], query.shape[1]
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[3]
    chunk_size, topk = bounded_params(lk, chunk_size, topk)  # the same call; what the check above judged
    dev = query.device
    out = empty(b, hq, 1, dv, dtype=query.dtype, device=dev)
    lse = empty(b, hq, 1, dtype=torch.float32, device=dev)
    if b == 0 or hq == 0:
        return out, lse
    # With a device length: the buffer's last chunk as the bound; the kernels read each row's own chunk.
    own_chunk = (lk - 1) // chunk_size
    km1 = min(topk - 1, own_chunk)
    if km1 > 0:
        if means is None:
            means = launch_chunk_means(key, chunk_size, own_chunk)
        sel = _launch_gate(query, means, hkv, own_chunk, km1, chunk_size, length, routing)
    else:
        sel = empty(b, hq, 0, dtype=torch.int32, device=dev)
    _launch_split_k(query, key, value, sel, out, lse, chunk_size, scale, attn_mask, length, shared=False)
    return out, lse


def _launch_split_k(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    sel: Tensor,
    out: Tensor,
    lse: Tensor,
    chunk_size: int,
    scale: float,
    attn_mask: Tensor | None,
    length: Tensor | None,
    *,
    shared: bool,
) -> None:
    """Split-K attention over the selected chunks (``sel int32 [B, Hq, km1]``, ``-1`` = unused slot) and each row's
    own chunk, then the combine, into ``out``/``lse``. ``shared``: every query head of a group holds the same
    selection (dense decode), so one work item per slot serves the whole row block."""
    b, hq, _, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[3]
    dev = query.device
    km1 = sel.shape[2]
    dev_len = length is not None
    lengths = length if dev_len else query  # never read without DEV_LEN
    group = hq // hkv
    rows, gb, block_g = _rows(group)
    # With a device length: the buffer's last chunk as the bound; the kernels read each row's own chunk.
    own_chunk = (lk - 1) // chunk_size
    own_len = lk - own_chunk * chunk_size
    work_items = (km1 if shared else rows * km1) + 1
    plan = _attn_plan(b * hkv * gb * work_items, chunk_size, d, dv, query.dtype, dev)
    ks = km1 + 1
    # Every (row, slot, piece) cell a combine reads is written by exactly one program; the others are never read.
    po = empty(b * hq * ks * plan.n_pieces * dv, dtype=torch.float32, device=dev)
    plse = empty(b * hq * ks * plan.n_pieces, dtype=torch.float32, device=dev)
    if attn_mask is not None:
        # uint8 view of the broadcast mask: zero strides on broadcast dims, one byte read per attended (head, key).
        mask = attn_mask.expand(b, hq, 1, lk).view(torch.uint8)
        if hq * mask.stride(1) + MAX_CHUNK * mask.stride(3) >= 2**31:  # in-kernel (head, key) offsets are int32
            mask = mask.contiguous()
        smb, smh, _, smn = mask.stride()
    else:
        mask, smb, smh, smn = query, 0, 0, 0  # never read when HAS_MASK is False
    sqb, sqh, _, sqd = query.stride()
    skb, skh, skn, skd = key.stride()
    svb, svh, svn, svd = value.stride()
    upcast = interpreting()
    # fp32 inputs: exact fp32 (FMA) dots; decode is memory-bound, so tf32's speed buys nothing. 16-bit: ignored.
    _decode_attn_kernel[(b * hkv * gb, work_items, plan.n_pieces)](
        query, key, value, mask, sel, po, plse, lengths,
        group, hkv, rows, gb, lk, chunk_size, km1, ks, plan.n_pieces, plan.piece, own_chunk, scale * _LOG2E,
        sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smn,
        HEAD_D=d, HEAD_DV=dv, BLOCK_G=block_g, BLOCK_N=plan.block_n, TOPP=2 if shared else max(2, next_pow2(km1)),
        HAS_MASK=attn_mask is not None, MASK_HEADS=smh != 0, UPCAST=upcast, DOT_PREC=dot_precision(query.dtype),
        DEV_LEN=dev_len, SHARED=shared, num_warps=plan.num_warps, num_stages=plan.num_stages,
    )  # fmt: skip
    n_f = ks * plan.n_pieces
    block_f = min(64 if dv <= 128 else 32, next_pow2(n_f))
    _decode_combine_kernel[(b * hq,)](
        po, plse, sel, out, lse, lengths, hq, chunk_size, lk, km1, ks, plan.n_pieces, plan.piece, own_len,
        HEAD_DV=dv, BLOCK_F=max(block_f, 2), DEV_LEN=dev_len, num_warps=4,
    )  # fmt: skip
