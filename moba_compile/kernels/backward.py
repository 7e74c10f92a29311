"""MoBA backward in Triton: ``Delta`` preprocess, key-major dK/dV (written once), dQ by atomics or slot by slot.

With ``P = exp(scale * q k^T - lse)`` on the attended keys (0 elsewhere) and ``Delta = rowsum(dO * O)``:
``dV = P^T dO``, ``dS = P * (dO V^T - Delta)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q`` (the formulas of
``reference.moba_attention_backward``); GQA sums dK/dV over the query heads of a group.

Order of launches (all on the query's device, no host synchronisation on CUDA):

1. ``_bwd_preprocess_kernel``: ``Delta`` (fp32) and the log2-domain LSE, with ``+inf`` for rows that attended no key
   (``lse = -inf``), so that ``exp2(s - lse2)`` is exactly 0 on such rows and nothing on them turns into NaN.
2. The gate and the index flip are recomputed (the selection is a pure function of ``q`` and ``k``): chunk means,
   fused top-(K-1) gate writing its selection slot-major, :func:`.gating.flip_slot_major` (lists sorted in
   deterministic mode).
3. ``_bwd_dkdv_kernel``, key-major: one program per (batch, key head, key block of ``BLOCK_N`` keys). The key block
   lies in one chunk ``c``; the program keeps its K/V tile and fp32 dK/dV accumulators on chip, streams (a) the rows of
   every query head of the group whose own chunk is ``c`` and whose position is at or after the block (causal mask on
   the diagonal tiles only), then (b) the gathered rows of chunk ``c``'s flip lists, one per slot (the rows that chose
   ``c``; no causal mask: an earlier chunk is complete and before every such row), and writes dK/dV once. No atomics on
   dK/dV.
   Default mode: each tile's ``scale * dS K`` is added to an fp32 ``[B, Hq, Lq, D]`` buffer with ``tl.atomic_add``
   (then cast to the query dtype).
4. Deterministic mode only (no float atomics anywhere): ``_bwd_own_dq_kernel``, query-major, writes the own chunk's
   causal ``dQ`` to an fp32 ``[B, Hq, Lq, D]`` buffer; then one ``_bwd_sparse_dq_kernel`` launch per slot
   ``j = 0 .. K'-2``, key-major like the forward (one program per flip tile of that slot gathers up to ``BLOCK_M``
   rows and streams the chosen chunk's keys), adds each row's ``dQ`` for that chunk to the buffer. A row is in one tile
   per launch, so there is no race and the summation order is fixed; the buffer is cast to the query dtype at the end.
"""

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gating import SlotFlip, _launch_gate, chunk_means_triton, flip_slot_major
from .jit import kernel_jit
from .launch import MaskArgs, device_capability, empty, on_device, tuned_for
from .support import (
    bounded_params,
    check_routing,
    dot_precision,
    interpreting,
    list_tile_rows,
    require_triton,
    triton_unsupported_reason,
)
from .tiles import key_major_tile, own_chunk_rows, own_chunk_span, slot_tile

__all__ = ["moba_backward_triton"]

_LOG2E = math.log2(math.e)
_LOG2E_C = tl.constexpr(_LOG2E)
_NEG_INF = tl.constexpr(float("-inf"))
_POS_INF = tl.constexpr(float("inf"))


@triton.jit
def _round_to(x, lo_ty: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 ``x`` rounded to nearest in ``lo_ty``; kept in fp32 when ``UPCAST`` (interpreter), else cast.

    The interpreter (triton 3.9) truncates fp32 -> bf16 where the GPU rounds to nearest even; rounding the bits first
    (exactly, ignoring NaN) makes the interpreted numerics the GPU's. fp16 casts already round to nearest there.
    """
    if UPCAST:
        if lo_ty == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
        return x.to(lo_ty).to(tl.float32)
    else:
        return x.to(lo_ty)


# --------------------------------------------------------------------------------------------------------------------
# Preprocess: Delta = rowsum(dO * O), lse in the log2 domain
# --------------------------------------------------------------------------------------------------------------------
@kernel_jit
def _bwd_preprocess_kernel(
    o_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    lse2_ptr,
    Hq,
    Lq,
    sob,
    soh,
    som,
    sod,
    sdob,
    sdoh,
    sdom,
    sdod,
    HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Lq
    rows = offs_m.to(tl.int64)
    offs_dv = tl.arange(0, HEAD_DV).to(tl.int64)
    o = tl.load(
        o_ptr + b * sob + h * soh + rows[:, None] * som + offs_dv[None, :] * sod, mask=row_ok[:, None], other=0.0
    )
    do = tl.load(
        do_ptr + b * sdob + h * sdoh + rows[:, None] * sdom + offs_dv[None, :] * sdod, mask=row_ok[:, None], other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse = tl.load(lse_ptr + pid_bh * Lq + rows, mask=row_ok, other=0.0)
    # A row that attended nothing has lse = -inf: +inf makes every exp2(s - lse2) of that row exactly 0.
    lse2 = tl.where(lse == _NEG_INF, _POS_INF, lse * _LOG2E_C)
    tl.store(delta_ptr + pid_bh * Lq + rows, delta, mask=row_ok)
    tl.store(lse2_ptr + pid_bh * Lq + rows, lse2, mask=row_ok)


# --------------------------------------------------------------------------------------------------------------------
# Key-major dK/dV (+ dQ atomics in the default mode)
# --------------------------------------------------------------------------------------------------------------------
@triton.jit
def _offset(x, OFFS32: tl.constexpr):
    """``x`` as a row offset: int32 when ``OFFS32`` (the launcher proved every in-group offset fits), else int64."""
    if OFFS32:
        return x
    else:
        return x.to(tl.int64)


@triton.jit
def _row_stat(rows, row_ok, other, NEUTRAL: tl.constexpr, DUP: tl.constexpr):
    """``tl.load(rows, mask=row_ok, other=other)`` for a tile's per-row statistic (lse2 or Delta), loaded as a
    ``[BLOCK_M, DUP]`` tile whose column 0 holds it (the other columns are masked off) and summed over the columns with
    the exact neutral ``NEUTRAL``: ``x + (-0.0)`` is ``x`` for every float, -0.0 and infinities included.

    Why (Triton 3.6, the GPU machines' version): the statistic feeds the ``[BLOCK_N, BLOCK_M]`` MMA accumulator, whose
    column slice repeats each value in 64 threads (16 per thread at 64 x 128 over 8 warps). A load of fewer elements
    than the program has threads is rematerialised in its consumer's layout, so every thread gathered its 16 values
    with their own address arithmetic and predicates (up to about 200 instructions per statistic and tile). A load of at
    least as many elements as threads keeps its compact layout (one value per thread) and reaches the MMA layout
    through shared memory. The ``DUP`` columns are contiguous addresses so that they lie in one warp (the reduction is
    two shuffles, no barrier). The launcher sets ``DUP = num_warps * 32 // BLOCK_M`` (see :func:`stat_dup`).
    """
    if DUP == 1:
        return tl.load(rows, mask=row_ok, other=other)
    cols = tl.arange(0, DUP)
    first = (cols == 0)[None, :]
    tile = tl.load(rows[:, None] + cols[None, :], mask=row_ok[:, None] & first, other=other)
    return tl.sum(tl.where(first, tile, NEUTRAL), 1)


@triton.jit
def _dkdv_tile(
    dk,
    dv,
    k,
    v,
    q_rows,
    do_rows,
    lse2_rows,
    delta_rows,
    mask_rows,
    dq_rows,
    row_ok,
    pos,
    offs_n,
    key_ok,
    sqd,
    sdod,
    smn,
    qk_scale,
    scale,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    STAT_DUP: tl.constexpr,
):
    """One tile of ``BLOCK_M`` query rows (given by one pointer per row into q, dO, lse2, Delta, the mask and dQ)
    against the program's key block.

    Works transposed (keys x rows), as the dK/dV accumulators are key-major. ``CAUSAL`` masks keys after each row's
    position (own-chunk diagonal tiles); rows outside the problem arrive with ``row_ok`` False and get ``lse2 = +inf``,
    hence ``P = 0``. The row pointers are built by the caller from 64-bit per-head or per-plane bases; here each costs
    one add per element of the tile's load layout.
    """
    lo_ty = q_rows.dtype.element_ty
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    q = tl.load(q_rows[:, None] + (offs_d * sqd)[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_rows[:, None] + (offs_dv * sdod)[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = _row_stat(lse2_rows, row_ok, _POS_INF, -0.0, STAT_DUP)
    delta = _row_stat(delta_rows, row_ok, 0.0, -0.0, STAT_DUP)
    if UPCAST:  # interpreter: its bf16 tl.dot is wrong; the upcast is exact
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
    p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
    if CAUSAL:
        p_t = tl.where(offs_n[:, None] <= pos[None, :], p_t, 0.0)
    if HAS_MASK:
        allowed = tl.load(mask_rows[None, :] + (offs_n * smn)[:, None], mask=key_ok[:, None] & row_ok[None, :], other=0)
        p_t = tl.where(allowed != 0, p_t, 0.0)
    # P and dS are rounded to the input dtype before their MMAs, as in FlashAttention (and the forward's P @ V).
    p_lo = _round_to(p_t, lo_ty, UPCAST)
    dv += tl.dot(p_lo, do, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    ds_lo = _round_to(ds_t, lo_ty, UPCAST)
    dk += tl.dot(ds_lo, q, input_precision=DOT_PREC)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(ds_lo), k, input_precision=DOT_PREC) * scale
        tl.atomic_add(dq_rows[:, None] + offs_d[None, :], dq, mask=row_ok[:, None], sem="relaxed")
    return dk, dv


@kernel_jit
def _bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    mask_ptr,
    lse2_ptr,
    delta_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    lists_ptr,
    seg_start_ptr,
    counts_ptr,
    B,
    Hq,
    Hkv,
    G,
    Lq,
    Lk,
    N,
    C,
    KM1,
    qk_scale,
    scale,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdob,
    sdoh,
    sdom,
    sdod,
    smb,
    smh,
    smm,
    smn,
    lq_magic,
    lq_shift,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LIST: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    STAT_DUP: tl.constexpr = 1,
    OFFS32: tl.constexpr = False,
):
    kb = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    b = plane // Hkv
    hkv = plane % Hkv
    n0 = kb * BLOCK_N
    c = n0 // C  # BLOCK_N divides C: the block lies in one chunk
    blk = tl.arange(0, BLOCK_N)
    offs_n = n0 + blk
    key_ok = offs_n < Lk
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    # 64-bit scalar base + 32-bit in-block offsets (a key block's offset from its base is at most BLOCK_N * stride).
    k_base = k_ptr + b * skb + hkv * skh + tl.cast(n0, tl.int64) * skn
    v_base = v_ptr + b * svb + hkv * svh + tl.cast(n0, tl.int64) * svn
    k = tl.load(k_base + (blk[:, None] * skn + offs_d[None, :] * skd), mask=key_ok[:, None], other=0.0)
    v = tl.load(v_base + (blk[:, None] * svn + offs_dv[None, :] * svd), mask=key_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DV], dtype=tl.float32)

    # (a) Own chunk: rows at positions [max(n0, Lk - Lq), chunk end) of every query head of the group. Rows before
    # n0 + BLOCK_N may precede some keys of the block (diagonal tiles, causal mask); later rows see the whole block.
    off = Lk - Lq
    c_end = tl.minimum((c + 1) * C, Lk)
    p_lo = tl.maximum(n0, off)
    diag_end = tl.minimum(n0 + BLOCK_N, c_end)
    n_diag = (tl.maximum(diag_end - p_lo, 0) + BLOCK_M - 1) // BLOCK_M
    full_lo = p_lo + n_diag * BLOCK_M
    # Row pointers: one 64-bit base per head (a) or per (batch, key head) plane (b), plus in-plane row offsets.
    # - Delta, lse2 (and the dQ buffer, times D) are contiguous [B, Hq, Lq(, D)] (the launcher allocates them), so a
    #   row's statistics sit at the int32 offset g * Lq + i from the plane's base: the entry id itself, below
    #   G * Lq <= 2^31 - 1 (the launcher's G * Lq * max(K - 1, 1) < 2^31 check).
    # - Offsets into q, dO, the mask and dQ scale by strides: int32 when OFFS32 (the launcher checked that the largest
    #   one of the head group, (G - 1) * s_head + (Lq - 1) * s_row, and G * Lq * D for dQ, are below 2^31), else
    #   int64. Rows past the chunk's end get i = 0 (masked anyway), so i < Lq as well.
    stat_plane = (b * Hq + hkv * G) * Lq
    for g in range(0, G):
        hq = hkv * G + g
        q_head = q_ptr + (b * sqb + hq * sqh)
        do_head = do_ptr + (b * sdob + hq * sdoh)
        lse2_head = lse2_ptr + (stat_plane + g * Lq)
        delta_head = delta_ptr + (stat_plane + g * Lq)
        m_head = mask_ptr + (b * smb + hq * smh)
        dq_head = dq_ptr + (stat_plane + g * Lq) * HEAD_D
        for m0 in range(p_lo, full_lo, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            # (the select also hides the rows' contiguity from Triton 3.6's layout choice: the statistics' tile then
            # reduces inside a warp, without shared memory and barriers)
            i = tl.where(pos < c_end, pos - off, 0)
            iw = _offset(i, OFFS32)
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_head + iw * sqm, do_head + iw * sdom, lse2_head + i, delta_head + i,
                m_head + iw * smm, dq_head + iw * HEAD_D,
                pos < c_end, pos, offs_n, key_ok, sqd, sdod, smn, qk_scale, scale,
                HEAD_D, HEAD_DV, True, HAS_MASK, ATOMIC_DQ, UPCAST, DOT_PREC, STAT_DUP,
            )  # fmt: skip
        for m0 in range(full_lo, c_end, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            i = tl.where(pos < c_end, pos - off, 0)
            iw = _offset(i, OFFS32)
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_head + iw * sqm, do_head + iw * sdom, lse2_head + i, delta_head + i,
                m_head + iw * smm, dq_head + iw * HEAD_D,
                pos < c_end, pos, offs_n, key_ok, sqd, sdod, smn, qk_scale, scale,
                HEAD_D, HEAD_DV, False, HAS_MASK, ATOMIC_DQ, UPCAST, DOT_PREC, STAT_DUP,
            )  # fmt: skip

    # (b) The rows (any head of the group) that chose chunk c, gathered from its lists, one per slot. Their chunk is
    # complete and lies before them: no causal or bounds mask on the keys. Entry ids are e = g * Lq + i: the
    # statistics' (and, times D, dQ's) in-plane offset as they stand; q, dO and the mask (any strides) need the head
    # and the row, g = e // Lq by a multiply-high with the launcher's magic number for Lq (exact for every e < 2^32,
    # see _udiv_magic; a general division is about ten instructions per element, a 64-bit one a subroutine).
    if HAS_LIST:
        q_plane = q_ptr + (b * sqb + (hkv * G) * sqh)
        do_plane = do_ptr + (b * sdob + (hkv * G) * sdoh)
        lse2_plane = lse2_ptr + stat_plane
        delta_plane = delta_ptr + stat_plane
        m_plane = mask_ptr + (b * smb + (hkv * G) * smh)
        dq_plane = dq_ptr + stat_plane * HEAD_D
        magic = lq_magic.to(tl.uint32, bitcast=True)
        shift = lq_shift.to(tl.uint32)
        for j in range(0, KM1):
            seg = ((j * B + b) * Hkv + hkv) * N + c
            start = tl.load(seg_start_ptr + seg)
            count = tl.load(counts_ptr + seg)
            seg_lists = lists_ptr + start
            for r0 in range(0, count, BLOCK_M):
                offs_m = r0 + tl.arange(0, BLOCK_M)
                row_ok = offs_m < count
                e = tl.load(seg_lists + offs_m, mask=row_ok, other=0)
                # (names differ from the own-chunk loop's: Triton wants one type per loop-carried name)
                eu = e.to(tl.uint32, bitcast=True)
                g_l = ((tl.umulhi(eu, magic) + eu) >> shift).to(tl.int32, bitcast=True)
                gw = _offset(g_l, OFFS32)
                rw = _offset(e - g_l * Lq, OFFS32)
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, q_plane + (gw * sqh + rw * sqm), do_plane + (gw * sdoh + rw * sdom),
                    lse2_plane + e, delta_plane + e, m_plane + (gw * smh + rw * smm),
                    dq_plane + _offset(e, OFFS32) * HEAD_D,
                    row_ok, offs_m, offs_n, key_ok, sqd, sdod, smn, qk_scale, scale,
                    HEAD_D, HEAD_DV, False, HAS_MASK, ATOMIC_DQ, UPCAST, DOT_PREC, STAT_DUP,
                )  # fmt: skip

    # dK/dV are contiguous [B, Hkv, Lk, D]: written once, in the key/value dtype.
    rows = plane * Lk + offs_n.to(tl.int64)
    dk = _round_to(dk * scale, dk_ptr.dtype.element_ty, UPCAST)
    dv = _round_to(dv, dv_ptr.dtype.element_ty, UPCAST)
    tl.store(dk_ptr + rows[:, None] * HEAD_D + offs_d[None, :], dk, mask=key_ok[:, None])
    tl.store(dv_ptr + rows[:, None] * HEAD_DV + offs_dv[None, :], dv, mask=key_ok[:, None])


# --------------------------------------------------------------------------------------------------------------------
# Deterministic dQ: query-major own chunk, then key-major launches slot by slot into one fp32 buffer
# --------------------------------------------------------------------------------------------------------------------
@triton.jit
def _dq_block(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    skn,
    skd,
    svn,
    svd,
    start_n,
    qk_scale,
    row_ok,
    pos,
    own_start,
    Lk,
    mask_ptr,
    mask_rows,
    smn,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BOUNDARY: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """``dq += dS @ K`` for one key block (unscaled). ``BOUNDARY`` adds the causal / own-chunk / bounds mask."""
    blk = tl.arange(0, BLOCK_N)
    offs_n = start_n + blk
    k_ptrs = (k_base + tl.cast(start_n, tl.int64) * skn) + (blk[:, None] * skn + tl.arange(0, HEAD_D)[None, :] * skd)
    v_ptrs = (v_base + tl.cast(start_n, tl.int64) * svn) + (blk[:, None] * svn + tl.arange(0, HEAD_DV)[None, :] * svd)
    if BOUNDARY:
        in_k = offs_n < Lk
        k = tl.load(k_ptrs, mask=in_k[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=in_k[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    lo_ty = k.dtype
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if BOUNDARY:
        keep = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] >= own_start[:, None])
        p = tl.where(keep, p, 0.0)
    if HAS_MASK:
        allowed = tl.load(
            mask_ptr + mask_rows[:, None] + (offs_n * smn)[None, :], mask=row_ok[:, None] & (offs_n < Lk)[None, :]
        )
        p = tl.where(allowed != 0, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    ds_lo = _round_to(ds, lo_ty, UPCAST)
    return tl.dot(ds_lo, k, dq, input_precision=DOT_PREC)


@kernel_jit
def _bwd_sparse_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    mask_ptr,
    lse2_ptr,
    delta_ptr,
    dq_ptr,
    lists_ptr,
    seg_start_ptr,
    counts_ptr,
    tile_seg_ptr,
    tile_row0_ptr,
    slot_tiles_ptr,
    j,
    B,
    Hq,
    Hkv,
    G,
    Lq,
    Lk,
    N,
    C,
    qk_scale,
    scale,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdob,
    sdoh,
    sdom,
    sdod,
    smb,
    smh,
    smm,
    smn,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    t, live = slot_tile(slot_tiles_ptr, j)
    if not live:  # past slot j's last tile (the grid is a static bound)
        return
    offs_m, row_ok, b, hkv, c, hq, i = key_major_tile(
        t, tile_seg_ptr, tile_row0_ptr, seg_start_ptr, counts_ptr, lists_ptr, B, Hkv, G, Lq, N, BLOCK_M
    )
    offs_d = tl.arange(0, HEAD_D).to(tl.int64)
    offs_dv = tl.arange(0, HEAD_DV).to(tl.int64)
    q = tl.load(
        q_ptr + (b * sqb + hq * sqh + i * sqm)[:, None] + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0
    )
    do = tl.load(
        do_ptr + (b * sdob + hq * sdoh + i * sdom)[:, None] + offs_dv[None, :] * sdod, mask=row_ok[:, None], other=0.0
    )
    stat = (b * Hq + hq) * Lq + i
    lse2 = tl.load(lse2_ptr + stat, mask=row_ok, other=_POS_INF)
    delta = tl.load(delta_ptr + stat, mask=row_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    k_base = k_ptr + b * skb + hkv * skh
    v_base = v_ptr + b * svb + hkv * svh
    mask_rows = b * smb + hq * smh + i * smm
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    lo = (c * C).to(tl.int32)
    for start_n in range(lo, lo + C, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, start_n, qk_scale,
            row_ok, offs_m, offs_m, Lk, mask_ptr, mask_rows, smn,
            HEAD_D, HEAD_DV, BLOCK_N, False, HAS_MASK, UPCAST, DOT_PREC,
        )  # fmt: skip
    # Each row appears once per slot: this program alone adds to these rows' fp32 dQ in this launch, and the slots
    # are added in order after the own chunk's dQ, so the sum's order is fixed.
    d_ptrs = dq_ptr + stat[:, None] * HEAD_D + offs_d[None, :]
    acc = tl.load(d_ptrs, mask=row_ok[:, None], other=0.0)
    tl.store(d_ptrs, acc + dq * scale, mask=row_ok[:, None])


@kernel_jit
def _bwd_own_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    mask_ptr,
    lse2_ptr,
    delta_ptr,
    dq_ptr,
    Hq,
    G,
    Lq,
    Lk,
    C,
    qk_scale,
    scale,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdob,
    sdoh,
    sdom,
    sdod,
    smb,
    smh,
    smm,
    smn,
    stb,
    sth,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b, hq, hkv, m0, offs_m, row_ok, rows64, pos, own_start = own_chunk_rows(Hq, G, Lq, Lk, C, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D).to(tl.int64)
    offs_dv = tl.arange(0, HEAD_DV).to(tl.int64)
    q = tl.load(
        q_ptr + b * sqb + hq * sqh + rows64[:, None] * sqm + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0
    )
    do = tl.load(
        do_ptr + b * sdob + hq * sdoh + rows64[:, None] * sdom + offs_dv[None, :] * sdod,
        mask=row_ok[:, None],
        other=0.0,
    )
    stat = b * stb + hq * sth + rows64
    lse2 = tl.load(lse2_ptr + stat, mask=row_ok, other=_POS_INF)
    delta = tl.load(delta_ptr + stat, mask=row_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    k_base = k_ptr + b * skb + hkv * skh
    v_base = v_ptr + b * svb + hkv * svh
    mask_rows = b * smb + hq * smh + rows64 * smm
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    # Keys [lo, full_end) are visible to every row of the tile (same chunk, at or before the first row).
    lo, full_end, p_last = own_chunk_span(m0, Lq, Lk, C, BLOCK_M, BLOCK_N)
    for start_n in range(lo, full_end, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, start_n, qk_scale,
            row_ok, pos, own_start, Lk, mask_ptr, mask_rows, smn,
            HEAD_D, HEAD_DV, BLOCK_N, False, HAS_MASK, UPCAST, DOT_PREC,
        )  # fmt: skip
    for start_n in range(full_end, p_last + 1, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, start_n, qk_scale,
            row_ok, pos, own_start, Lk, mask_ptr, mask_rows, smn,
            HEAD_D, HEAD_DV, BLOCK_N, True, HAS_MASK, UPCAST, DOT_PREC,
        )  # fmt: skip
    # fp32 dQ of the own chunk: the key-major passes over the slots add the chosen chunks' dQ to it afterwards.
    d_ptrs = dq_ptr + stat[:, None] * HEAD_D + offs_d[None, :]
    tl.store(d_ptrs, dq * scale, mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _BwdConfig:
    kv_block_m: int  # query rows per tile of the key-major dK/dV kernel
    kv_block_n: int  # keys per dK/dV program
    kv_warps: int
    kv_stages: int
    dq_block_m: int  # query rows per program of the deterministic dQ kernels
    dq_block_n: int  # keys per step of the deterministic dQ kernels
    dq_warps: int
    dq_stages: int


def _bwd_config(
    head_dim: int, head_dim_v: int, dtype: torch.dtype, has_mask: bool, capability: tuple[int, int] | None = None
) -> _BwdConfig:
    """Launch tiles for the GPU of compute ``capability`` (``None``: no GPU to ask, the tuned sm_90 table)."""
    if interpreting():
        # ~2 ms per program x loop step when interpreted: few, mid-sized tiles.
        return _BwdConfig(32, 32, 4, 1, 32, 32, 4, 1)
    cfg = _sm90_bwd_config(head_dim, head_dim_v, dtype, has_mask)
    if tuned_for(capability):
        return cfg
    # Not timed off sm_90. The one tiling chosen despite spilling (D <= 128 without a mask: 128 keys x 64 rows,
    # ~1.3 KB of local memory, paid back by the H100's bandwidth) gives way to the spill-free tiles of the masked
    # case; every pipeline is capped at 2 stages (smaller shared memories than sm_90's 228 KB).
    if dtype != torch.float32 and 64 < max(head_dim, head_dim_v) <= 128 and not has_mask:
        cfg = _sm90_bwd_config(head_dim, head_dim_v, dtype, True)
    return replace(cfg, kv_stages=min(cfg.kv_stages, 2), dq_stages=min(cfg.dq_stages, 2))


def _sm90_bwd_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, has_mask: bool) -> _BwdConfig:
    # H100 choices, checked by compiling for sm_90a on a CPU machine (python -m benchmarks.attention --compile-check:
    # triton.compile + ptxas -v with the launch-time specialisations); timed on an H100 in docs/benchmarks.md, not
    # autotuned. The dK/dV kernel holds two fp32 [BLOCK_N, D] accumulators plus K/V for the whole program, so it is
    # the register-bound one.
    d = max(head_dim, head_dim_v)
    if dtype == torch.float32:
        # IEEE fp32 dots run on CUDA cores with the operands in registers: a correctness path, small tiles (the dK/dV
        # kernel still reports ~100-600 B of local memory at D=128).
        return _BwdConfig(32, 16, 8, 1, 64, 16, 8, 1)
    if d <= 64:
        # dK/dV 64 x 64 over 8 warps: 247 registers (255 with a mask), no spill; 4 warps spill ~240 B.
        return _BwdConfig(64, 64, 8, 2, 128, 64, 8, 2)
    if d <= 128:
        # dK/dV without a mask: 128 keys x 64 rows over 8 warps. Timed on an H100 (benchmarks/tune_backward.py,
        # results/tune_backward-*.json) against 17 other tilings at 8K-64K: the backward ran 1.4-2.1x faster than with
        # the former spill-free 64 x 32, although this one spills ~1.3 KB: e.g. 6.46 -> 3.65 ms at 8K C512 K3
        # (atomics), 73.6 -> 40.2 ms at 32K C2048 K3 (no atomics); 4 warps, 16-32 rows or 256 keys were slower.
        # With a user mask the [keys, rows] mask tile spills at 64 keys (56 B), not at 32 (179): that case keeps
        # 32 x 32 (not re-timed).
        # Re-timed on the H200 (2026-11-30, tune_backward-nvidia-h200-20261130-stages*.json, six shapes from 8K C512
        # K3 to 128K C4096 K12 and FlashMoBA's C128 K8): a third pipeline stage for dK/dV saved 2-8% everywhere (the
        # gathered query rows arrive one more tile ahead; 128K C4096 K12: 993 -> 915 ms with atomics), and the
        # deterministic dQ kernels run best on 64 x 64 tiles over 4 warps (two programs per SM) at all but the two
        # longest-list shapes, where they trail the best tiles by 1.2% and 0.5% (e.g. FlashMoBA 64K: 38.5 -> 34.7 ms,
        # 128K C4096 K12: 903 -> 886 ms).
        # With a mask: the forward's 128 x 32 dQ tiles (226-232 registers, no spill), not re-timed.
        if has_mask:
            return _BwdConfig(32, 32, 8, 2, 128, 32, 8, 2)
        return _BwdConfig(64, 128, 8, 3, 64, 64, 4, 2)
    # D = 256: small tiles, one stage (221 registers for dK/dV at 32 x 32; a mask needs 16-key blocks). Not tuned.
    bn = 16 if has_mask else 32
    return _BwdConfig(32, bn, 8, 1, 32, bn, 8, 1)


def _udiv_magic(d: int) -> tuple[int, int]:
    """``(magic, shift)`` such that ``e // d == (umulhi(e, magic) + e) >> shift`` for every ``0 <= e < 2**32``
    (``magic`` read as uint32; returned as the int32 with the same bits, so the kernel argument stays ``i32``).

    Round-up multiplier (Granlund and Montgomery, "Division by invariant integers using multiplication", 1994, thm.
    4.2, N = 32): ``l = ceil(log2 d)``, ``m = ceil(2^(32+l) / d)``; then ``0 <= m*d - 2^(32+l) < d <= 2^l``, which makes
    ``floor(e*m / 2^(32+l)) = floor(e / d)`` for every ``e < 2^32``. ``m`` lies in ``[2^32, 2^33)``, so ``m - 2^32``
    fits 32 bits and ``e*m / 2^32 = umulhi(e, m - 2^32) + e``; the sum stays below ``2^32`` for the kernel's
    ``e < 2^31``.

    Example:
        >>> _udiv_magic(1), _udiv_magic(7)
        ((0, 0), (613566757, 3))
    """
    if not 1 <= d < 2**31:
        raise ValueError(f"divisor {d} outside [1, 2^31)")
    shift = (d - 1).bit_length()
    magic = -(-(1 << (32 + shift)) // d) - (1 << 32)
    return magic - (1 << 32) if magic >= 1 << 31 else magic, shift


def _offsets_fit_int32(p: "_BwdProblem", g: int) -> bool:
    """Whether every in-group row offset the dK/dV kernel forms from a 64-bit base fits int32 (its ``OFFS32``): into q
    and dO, ``(G - 1) * s_head + (Lq - 1) * s_row``, likewise the mask's, and ``G * Lq * D`` into the dQ buffer."""
    lq, d = p.query.shape[2], p.query.shape[3]
    spans = [(g - 1) * t.stride(1) + (lq - 1) * t.stride(2) for t in (p.query, p.grad_out)]
    _, smh, smm, _ = p.mask.strides
    spans += [(g - 1) * smh + (lq - 1) * smm, g * lq * d]
    return max(spans) < 2**31


def stat_dup(block_m: int, num_warps: int) -> int:
    """The dK/dV kernel's ``STAT_DUP``: copies per row in its statistics loads, so that a load has at least as many
    elements as the program has threads (see ``_row_stat``)."""
    return max(1, num_warps * 32 // block_m)


# --------------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------------
def moba_backward_triton(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    chunk_size: int,
    topk: int,
    scale: float | None,
    attn_mask: Tensor | None = None,
    deterministic: bool | None = None,
    *,
    routing: str = "head",
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of MoBA attention with the Triton kernels: ``(dq, dk, dv)`` as ``reference.moba_attention_backward``.

    The selection is recomputed from ``query`` and ``key`` (the gate is a pure function of them), so the result is
    the gradient of exactly the attention the forward computed. No gradient flows through the gate. Rows that attended
    no key (``lse = -inf``) contribute nothing; keys no query attended (e.g. chunks nobody chose) get exact zeros.
    GQA/MQA: dK/dV are summed over the query heads of each group on chip; key/value are never repeated.

    Atomics: with ``deterministic=False`` (the default) ``dQ`` is accumulated with fp32
    ``tl.atomic_add`` into an fp32 ``[B, Hq, Lq, D]`` buffer (then cast), so its low bits may vary run to run; the order
    of the rows in the index flip's lists (counted with integer atomics) also changes the fp32 summation order of dK/dV.
    dK/dV themselves are never accumulated with atomics: each key block is written once by one program. In
    deterministic mode there are no float atomics: the flip lists are sorted, and ``dQ`` is summed in one fp32 buffer
    in a fixed order (own chunk, then one launch per slot); results are bitwise reproducible on one GPU and software
    stack, at the cost of recomputing ``S`` and ``dP`` for ``dQ``.

    Args:
        grad_out: ``[B, Hq, Lq, Dv]``, the gradient of ``out`` (cast to the query dtype if it differs); any strides.
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, Lk, D]``; value: ``[B, Hkv, Lk, Dv]``: the forward's inputs, one
            dtype among fp16, bf16 and fp32 (fp32: IEEE dots, slow), on one CUDA device or on the CPU under
            ``TRITON_INTERPRET=1``; ``D, Dv in (16, 32, 64, 128, 256)``; ``Hq % Hkv == 0``; ``Lq <= Lk``.
        out: ``[B, Hq, Lq, Dv]``, the forward's output (used for ``Delta = rowsum(dO * O)``).
        lse: ``[B, Hq, Lq]``, the forward's natural-log log-sum-exp (``-inf`` for rows without keys).
        chunk_size: ``C``, a multiple of 16 in ``[16, 8192]``.
        topk: ``1 <= K <= 64`` chunks per query, its own included.
        scale: the forward's softmax scale; ``None`` means ``1 / sqrt(D)``.
        attn_mask: the forward's optional boolean mask, broadcastable to ``[B, Hq, Lq, Lk]`` (True = may attend).
        deterministic: ``True`` for bitwise reproducible results (no float atomics); ``False`` for dQ by atomics;
            ``None``: deterministic exactly when ``torch.are_deterministic_algorithms_enabled()``. (Until 2026-12-01
            ``None`` also meant deterministic from chunk 1024 on, where that path was the faster one on an H100; after
            the dK/dV rework dQ atomics measured faster on the H200 at every spec shape: 19.3 vs 20.3 ms at 32K C2048
            K3, 598 vs 625 ms at 128K C4096 K12, 283 vs 287 ms at 128K C8192 K3; docs/benchmarks.md.)
        routing: the forward's routing, ``"head"`` or ``"group"`` (the selection is recomputed with it).

    Returns:
        ``(dq, dk, dv)``, contiguous, shaped and typed like ``query``, ``key`` and ``value``. Extra memory: fp32
        ``Delta``/LSE ``[B, Hq, Lq]``, about 12 bytes per (row, head, slot) of index arrays, and the fp32 dQ buffer
        ``[B, Hq, Lq, D]`` (both modes).

    Raises:
        RuntimeError: Triton is not installed.
        ValueError: :func:`triton_unsupported_reason` gives a reason, ``grad_out``/``out``/``lse`` do not match, or
            an unknown ``routing``.

    Example:
        >>> q = torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> k = v = torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> out, lse = moba_forward_triton(q, k, v, 32, 2, 0.125)  # doctest: +SKIP
        >>> dq, dk, dv = moba_backward_triton(torch.ones_like(out), q, k, v, out, lse, 32, 2, 0.125)  # doctest: +SKIP
        >>> dq.shape, dk.dtype  # doctest: +SKIP
        (torch.Size([1, 4, 128, 64]), torch.bfloat16)
    """
    require_triton()
    check_routing(routing)
    reason = triton_unsupported_reason(query, key, value, chunk_size, topk, attn_mask)
    if reason is not None:
        raise ValueError(f"moba_backward_triton cannot run this call: {reason}")
    b, hq, lq, d = query.shape
    hkv, lk, dv_dim = key.shape[1], key.shape[2], value.shape[3]
    chunk_size, topk = bounded_params(lk, chunk_size, topk)  # the same call; what the check above judged
    _check_grad_inputs(grad_out, out, lse, query, dv_dim)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    dev = query.device
    dk = empty(b, hkv, lk, d, dtype=key.dtype, device=dev)
    dv = empty(b, hkv, lk, dv_dim, dtype=value.dtype, device=dev)
    if b * hq * lq == 0 or lk == 0:
        return torch.zeros_like(query, memory_format=torch.contiguous_format), dk.zero_(), dv.zero_()
    grad_out = grad_out.to(query.dtype)
    out = out.to(query.dtype)
    lse = lse.to(torch.float32).contiguous()
    cfg = _bwd_config(d, dv_dim, query.dtype, attn_mask is not None, device_capability(dev))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    p = _BwdProblem(
        query=query, key=key, value=value, grad_out=grad_out, mask=MaskArgs.build(attn_mask, (b, hq, lq, lk), query),
        chunk_size=chunk_size, topk=topk, km1=min(topk - 1, (lk - 1) // chunk_size), scale=scale,
        qk_scale=scale * _LOG2E, cfg=cfg, deterministic=deterministic, routing=routing,
    )  # fmt: skip
    with on_device(dev):
        delta, lse2 = _preprocess(out, grad_out, lse)
        by_slot, dq_block_m = _gate_and_flip(p)
        dq_acc = None if deterministic else torch.zeros(b, hq, lq, d, dtype=torch.float32, device=dev)
        _dkdv(p, delta, lse2, by_slot, dq_acc, dk, dv)
        if dq_acc is not None:
            return dq_acc.to(query.dtype), dk, dv
        dq = _deterministic_dq(p, delta, lse2, by_slot, dq_block_m)
    return dq, dk, dv


@dataclass(frozen=True)
class _BwdProblem:
    """One backward call as every pass sees it: inputs (already cast), the mask's kernel arguments, the bounded
    parameters (``km1 = K' - 1``, the slots any row can fill), the scales and the launch configuration."""

    query: Tensor
    key: Tensor
    value: Tensor
    grad_out: Tensor
    mask: MaskArgs
    chunk_size: int
    topk: int
    km1: int
    scale: float
    qk_scale: float
    cfg: _BwdConfig
    deterministic: bool
    routing: str = "head"

    @property
    def n_chunks(self) -> int:
        """``N = ceil(Lk / C)``."""
        return -(-self.key.shape[2] // self.chunk_size)

    def block_n(self, configured: int) -> int:
        """``configured`` cut to a whole number of key blocks per chunk (the largest power of two dividing ``C``)."""
        return min(configured, self.chunk_size & -self.chunk_size)

    def common(self) -> dict:
        """Launch keywords every kernel of the call shares."""
        q = self.query
        return dict(
            HEAD_D=q.shape[3], HEAD_DV=self.value.shape[3], HAS_MASK=self.mask.present, UPCAST=interpreting(),
            DOT_PREC=dot_precision(q.dtype),
        )  # fmt: skip


def _check_grad_inputs(grad_out: Tensor, out: Tensor, lse: Tensor, query: Tensor, dv_dim: int) -> None:
    """Raise ``ValueError`` unless ``grad_out``/``out`` are ``[B, Hq, Lq, Dv]`` and ``lse`` is ``[B, Hq, Lq]``, all on
    the query's device."""
    b, hq, lq, _ = query.shape
    if tuple(grad_out.shape) != (b, hq, lq, dv_dim) or tuple(out.shape) != (b, hq, lq, dv_dim):
        raise ValueError(
            f"grad_out {tuple(grad_out.shape)} and out {tuple(out.shape)} must be [B, Hq, Lq, Dv] = "
            f"{[b, hq, lq, dv_dim]}"
        )
    if tuple(lse.shape) != (b, hq, lq):
        raise ValueError(f"lse {tuple(lse.shape)} must be [B, Hq, Lq] = {[b, hq, lq]}")
    if grad_out.device != query.device or out.device != query.device or lse.device != query.device:
        raise ValueError("grad_out, out and lse must be on the query's device")


def _preprocess(out: Tensor, grad_out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Pass 1: ``(Delta, lse2)``, fp32 ``[B, Hq, Lq]`` each (``lse2`` in the log2 domain, ``+inf`` for empty rows)."""
    b, hq, lq, dv_dim = out.shape
    delta = empty(b, hq, lq, dtype=torch.float32, device=out.device)
    lse2 = empty(b, hq, lq, dtype=torch.float32, device=out.device)
    pre_m = 32 if interpreting() else 64
    _bwd_preprocess_kernel[(triton.cdiv(lq, pre_m), b * hq)](
        out, grad_out, lse, delta, lse2, hq, lq, *out.stride(), *grad_out.stride(),
        HEAD_DV=dv_dim, BLOCK_M=pre_m, num_warps=4,
    )  # fmt: skip
    return delta, lse2


def _gate_and_flip(p: _BwdProblem) -> tuple[SlotFlip | None, int]:
    """Pass 2: the forward's selection recomputed and inverted per slot: ``(by_slot, dq_block_m)``.

    ``by_slot`` is ``None`` when no row has an earlier chunk to choose (``K' = 1``). ``dq_block_m`` is the
    deterministic dQ kernel's key-major tile height, cut per chunk list.
    """
    query, key, km1 = p.query, p.key, p.km1
    hkv, lk = key.shape[1], key.shape[2]
    if km1 == 0:
        return None, p.cfg.dq_block_m
    g, lq = query.shape[1] // hkv, query.shape[2]
    means = chunk_means_triton(key, p.chunk_size)
    sel = _launch_gate(query, means, p.chunk_size, km1, lk, slot_major=True, routing=p.routing)
    # The deterministic dQ tiles are cut per chunk list (one slot's entries): short lists would leave big tiles
    # mostly padding.
    dq_block_m = list_tile_rows(p.cfg.dq_block_m, g * lq, (lk - 1) // p.chunk_size)
    # Default mode never uses the flip's tiles: large tiles keep those arrays small.
    block_m = dq_block_m if p.deterministic else 1024
    return flip_slot_major(sel, hkv, p.n_chunks, block_m, deterministic=p.deterministic), dq_block_m


def _dkdv(
    p: _BwdProblem,
    delta: Tensor,
    lse2: Tensor,
    by_slot: SlotFlip | None,
    dq_acc: Tensor | None,
    dk: Tensor,
    dv: Tensor,
) -> None:
    """Pass 3: key-major dK/dV into ``dk``/``dv`` (written once), plus dQ atomics into ``dq_acc`` when it is given."""
    query, key, value, cfg = p.query, p.key, p.value, p.cfg
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    dev = query.device
    dummy_i32 = torch.zeros(1, dtype=torch.int32, device=dev)
    dummy_i64 = torch.zeros(1, dtype=torch.int64, device=dev)
    strides = (*query.stride(), *key.stride(), *value.stride(), *p.grad_out.stride(), *p.mask.strides)
    kv_block_n = p.block_n(cfg.kv_block_n)
    flip = by_slot.flip if by_slot is not None else None
    _bwd_dkdv_kernel[(triton.cdiv(lk, kv_block_n), b * hkv)](
        query, key, value, p.grad_out, p.mask.arg, lse2, delta, dq_acc if dq_acc is not None else lse2, dk, dv,
        flip.lists if flip is not None else dummy_i32,
        flip.seg_start if flip is not None else dummy_i64,
        flip.counts if flip is not None else dummy_i32,
        b, hq, hkv, hq // hkv, lq, lk, p.n_chunks, p.chunk_size, max(p.km1, 1), p.qk_scale, p.scale, *strides,
        *_udiv_magic(lq),
        BLOCK_M=cfg.kv_block_m, BLOCK_N=kv_block_n, HAS_LIST=flip is not None, ATOMIC_DQ=dq_acc is not None,
        STAT_DUP=stat_dup(cfg.kv_block_m, cfg.kv_warps), OFFS32=_offsets_fit_int32(p, hq // hkv),
        num_warps=cfg.kv_warps, num_stages=cfg.kv_stages, **p.common(),
    )  # fmt: skip


def _deterministic_dq(p: _BwdProblem, delta: Tensor, lse2: Tensor, by_slot: SlotFlip | None, dq_block_m: int) -> Tensor:
    """Pass 4 (deterministic mode): dQ without float atomics into an fp32 ``[B, Hq, Lq, D]`` buffer: the own chunk's
    dQ first (query-major), then one key-major launch per slot adding the chosen chunk's dQ to each of its rows; every
    row is in one tile per launch, so the sum runs in a fixed order. Returns dQ in the query dtype."""
    query, key, value, cfg = p.query, p.key, p.value, p.cfg
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    dq = empty(b, hq, lq, d, dtype=torch.float32, device=query.device)
    strides = (*query.stride(), *key.stride(), *value.stride(), *p.grad_out.stride(), *p.mask.strides)
    common = dict(p.common(), BLOCK_N=p.block_n(cfg.dq_block_n), num_warps=cfg.dq_warps, num_stages=cfg.dq_stages)
    _bwd_own_dq_kernel[(triton.cdiv(lq, cfg.dq_block_m), b * hq)](
        query, key, value, p.grad_out, p.mask.arg, lse2, delta, dq,
        hq, hq // hkv, lq, lk, p.chunk_size, p.qk_scale, p.scale, *strides, delta.stride(0), delta.stride(1),
        BLOCK_M=cfg.dq_block_m, **common,
    )  # fmt: skip
    if by_slot is not None:
        flip = by_slot.flip
        for j, grid in enumerate(by_slot.grids):
            if grid == 0:
                continue
            _bwd_sparse_dq_kernel[(grid,)](
                query, key, value, p.grad_out, p.mask.arg, lse2, delta, dq,
                flip.lists, flip.seg_start, flip.counts, flip.tile_seg, flip.tile_row0, by_slot.slot_tiles, j,
                b, hq, hkv, hq // hkv, lq, lk, p.n_chunks, p.chunk_size, p.qk_scale, p.scale, *strides,
                BLOCK_M=dq_block_m, **common,
            )  # fmt: skip
    return dq.to(query.dtype)
