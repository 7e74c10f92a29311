"""MoBA forward in Triton: the own-chunk pass opens a running state per row; key-major passes merge each chosen chunk.

Order of launches (all on the query's device, no host synchronisation on CUDA):

1. ``_own_fwd_kernel``, query-major: causal attention to each row's own chunk (the block diagonal) with an online
   softmax; writes the row's state: normalised ``out`` (output dtype), its rounding residual ``lo`` (when there is
   anything to merge: int8 in steps of 1/256 of ``out``'s ulp by default, bf16 under ``residual="bf16"``) and ``lse``;
2. chunk means + fused gate (:mod:`.gating`), only when some row has an earlier chunk and ``topk > 1``;
3. index flip by slot (:func:`.gating.flip_slot_major`, on the gate's slot-major output): per (slot, batch, key
   head, chunk) lists of the (head, row) entries whose slot-``j`` choice the chunk is;
4. ``_sparse_fwd_kernel``, key-major, one launch per slot ``j = 0 .. K'-2``: one program per tile of up to ``BLOCK_M``
   entries of one segment gathers their query rows into a dense tile, streams that chunk's keys/values once, and merges
   the result into each row's state (an exact log-sum-exp merge; the key sets are disjoint). A row is in one tile per
   launch, so no two programs touch its state at once and the merge order is fixed.

Softmax runs in the log2 domain (``exp2`` with ``scale * log2(e)`` folded into the scores); ``lse`` is returned in
natural log. Rows with no attended key get ``out = 0`` and ``lse = -inf``.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gating import _launch_gate, chunk_means_triton, flip_slot_major
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

__all__ = ["RESIDUALS", "moba_forward_triton"]

RESIDUALS = ("int8", "bf16")  # how the running output's rounding residual is stored (``moba_forward_triton``)

_LOG2E = math.log2(math.e)
_LN2 = tl.constexpr(math.log(2.0))
_LOG2E_C = tl.constexpr(_LOG2E)
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _attend_block(
    acc,
    l_i,
    m_i,
    q,
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
    """One [BLOCK_M, BLOCK_N] step of the online softmax (log2 domain). BOUNDARY adds the causal/own-chunk mask."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # 64-bit scalar block base + 32-bit in-block offsets: an int64 [BLOCK_N, D] offset tensor would cost two registers
    # per element, while the 64-bit part (batch/head/block start) is one scalar.
    blk = tl.arange(0, BLOCK_N)
    k_ptrs = (k_base + tl.cast(start_n, tl.int64) * skn) + (blk[:, None] * skn + tl.arange(0, HEAD_D)[None, :] * skd)
    v_ptrs = (v_base + tl.cast(start_n, tl.int64) * svn) + (blk[:, None] * svn + tl.arange(0, HEAD_DV)[None, :] * svd)
    if BOUNDARY:
        in_k = offs_n < Lk
        k = tl.load(k_ptrs, mask=in_k[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=in_k[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if UPCAST:  # interpreter: its bf16 tl.dot is wrong; the upcast is exact
        s = tl.dot(q, tl.trans(k.to(tl.float32)))
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    s = s * qk_scale
    if BOUNDARY:
        keep = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] >= own_start[:, None])
        s = tl.where(keep, s, _NEG_INF)
    if HAS_MASK:
        allowed = tl.load(mask_rows[:, None] + (offs_n * smn)[None, :], mask=row_ok[:, None] & (offs_n < Lk)[None, :])
        s = tl.where(allowed != 0, s, _NEG_INF)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row whose keys are all masked so far keeps m = -inf: shift by 0 instead, so exp2(-inf - -inf) never appears.
    m_use = tl.where(m_new == _NEG_INF, 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p_lo = p.to(v.dtype)  # the P operand is rounded to the value dtype, as on the GPU's tensor cores
    if UPCAST:
        pv = tl.dot(p_lo.to(tl.float32), v.to(tl.float32))
    else:
        pv = tl.dot(p_lo, v, input_precision=DOT_PREC)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


# The 8-bit residual of the running output (``residual="int8"``). ``hi`` is the output rounded to its dtype (MANT
# explicit mantissa bits: 7 for bf16, 10 for fp16) and ``e`` its exponent; the residual ``o - hi`` is at most half an
# ulp of ``hi``, 2^(e - MANT - 1), and is stored as ``q = round((o - hi) * 2^(MANT + 8 - e))`` in [-127, 127]: steps
# of 1/256 of ``hi``'s ulp. Decoding, ``hi + q * 2^(e - MANT - 8)``, is exact in fp32 (``hi`` has MANT + 1 significant
# bits, the step is 8 bits below its last one: at most 19 bits), so it gives ``o`` to within one step: ``|q|`` reaches
# 128 only for a residual of exactly half an ulp, clamped to 127; elsewhere rounding costs half a step. The
# exponent is clamped below to ``E_LO`` (an fp32 exponent field): that keeps both powers of two normal fp32 numbers
# (``E_LO >= MANT + 9``) and, for fp16, gives subnormal outputs the step of the smallest normal exponent, their real
# ulp. Below it (bf16 outputs under 2^-111 and zeros) the step is 2^(E_LO - 127 - MANT - 8): an absolute error of at
# most 2^-126. The powers of two are built from their exponent bits, never with exp2/log2.
_MAGIC_RINT = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + this has round(x) in its low mantissa bits for |x| < 2^22


def residual_exponent_floor(dtype: torch.dtype) -> int:
    """``E_LO`` of the int8 residual for output ``dtype``: the smallest fp32 exponent field the step is taken from."""
    mant = residual_mantissa_bits(dtype)
    emin_field = 127 - 14 if dtype == torch.float16 else 1  # fp16's smallest normal is 2^-14; bf16 shares fp32's range
    return max(mant + 9, emin_field)


def residual_mantissa_bits(dtype: torch.dtype) -> int:
    """Explicit mantissa bits of the output ``dtype`` (bf16: 7, fp16: 10): ``MANT`` of the int8 residual."""
    if dtype == torch.bfloat16:
        return 7
    if dtype == torch.float16:
        return 10
    raise ValueError(f"no int8 residual for {dtype}: only bf16 and fp16 outputs round")


@triton.jit
def round_to_output(o, out_ptr, INTERPRETED: tl.constexpr):
    """``o`` (fp32) rounded to nearest even in ``out_ptr``'s element type, as the GPU's conversion does.

    The Triton interpreter truncates fp32 -> bf16 (up to a whole ulp off, where the compiled cast is within half of
    one, which the residual's range relies on) and mishandles subnormals: interpreted, bf16 is rounded here on the
    fp32 bits (the usual ``+ 0x7FFF + lsb`` on the 16 bits dropped; finite values) and its upper half taken as is.
    """
    if INTERPRETED and out_ptr.dtype.element_ty == tl.bfloat16:
        bits = o.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return o.to(out_ptr.dtype.element_ty)


@triton.jit
def widen_output(hi, INTERPRETED: tl.constexpr):
    """``hi`` (the output dtype) as fp32; interpreted, bf16 by its bits (the interpreter's cast mishandles
    subnormals)."""
    if INTERPRETED and hi.dtype == tl.bfloat16:
        return (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return hi.to(tl.float32)


@triton.jit
def _residual_step_bits(hi, MANT: tl.constexpr, E_LO: tl.constexpr):
    """fp32 bits of the step ``2^(max(e, E_LO - 127) - MANT - 8)``, ``e`` the exponent of ``hi`` (bf16 or fp16).

    Read from hi's own 16 bits: its exponent field (the 15 - MANT bits above the mantissa, bias 2^(14 - MANT) - 1),
    clamped below, moved to fp32's place and rebiased: an int16 load's bits, a mask, a max, a shift and an add. (The
    same exponent read from hi's fp32 bits cost the masked key-major kernels 56-88 B of spills under Triton 3.9.)
    """
    bias = (1 << (14 - MANT)) - 1
    e = (hi.to(tl.int16, bitcast=True) & (((1 << (15 - MANT)) - 1) << MANT)).to(tl.int32)
    e = tl.maximum(e, (E_LO - 127 + bias) << MANT)
    return (e << (23 - MANT)) + ((127 - bias - MANT - 8) << 23)


@triton.jit
def decode_residual(hi, q, MANT: tl.constexpr, E_LO: tl.constexpr, INTERPRETED: tl.constexpr):
    """``hi + q * step`` in fp32: the running output from its rounded part ``hi`` (the output dtype) and its int8
    residual ``q``."""
    step = _residual_step_bits(hi, MANT, E_LO).to(tl.float32, bitcast=True)
    return widen_output(hi, INTERPRETED) + q.to(tl.float32) * step


@triton.jit
def encode_residual(o, hi, MANT: tl.constexpr, E_LO: tl.constexpr, INTERPRETED: tl.constexpr):
    """The int8 residual of ``o`` (fp32) over ``hi`` (``o`` rounded to the output dtype): ``round((o - hi) / step)``,
    clamped to [-127, 127]."""
    inv_step = ((254 << 23) - _residual_step_bits(hi, MANT, E_LO)).to(tl.float32, bitcast=True)  # 1 / step, exact
    x = tl.minimum(tl.maximum((o - widen_output(hi, INTERPRETED)) * inv_step, -127.0), 127.0)
    # Round to nearest (even) by the magic addition: the low byte of the sum's bits is round(x) as a two's complement
    # byte (the constant's low 23 bits are 0x400000, so |round(x)| <= 127 never borrows past them).
    return (x + _MAGIC_RINT).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _residual_of(o, hi, lo_ptr, LO_MANT: tl.constexpr, LO_E_LO: tl.constexpr, INTERPRETED: tl.constexpr):
    """What ``lo`` stores for the fp32 output ``o`` rounded to ``hi``: the int8 code, or ``o - hi`` in lo's dtype."""
    if LO_MANT > 0:
        return encode_residual(o, hi, LO_MANT, LO_E_LO, INTERPRETED)
    else:
        return (o - widen_output(hi, INTERPRETED)).to(lo_ptr.dtype.element_ty)


@triton.jit
def _load_state(out_ptr, lo_ptr, lse_ptr, rows, row_ok, HEAD_DV: tl.constexpr, HAS_LO: tl.constexpr):
    """The rows' running state as stored: ``(out, lo, lse)`` tiles, ``lo`` raw (int8 steps or bf16; ``out`` itself
    when there is no residual, unused then). Masked rows read ``out = lo = 0`` and ``lse = -inf``."""
    offs_dv = tl.arange(0, HEAD_DV).to(tl.int64)
    hi_s = tl.load(out_ptr + rows[:, None] * HEAD_DV + offs_dv[None, :], mask=row_ok[:, None], other=0.0)
    if HAS_LO:
        lo_s = tl.load(lo_ptr + rows[:, None] * HEAD_DV + offs_dv[None, :], mask=row_ok[:, None], other=0)
    else:
        lo_s = hi_s
    lse_s = tl.load(lse_ptr + rows, mask=row_ok, other=_NEG_INF)
    return hi_s, lo_s, lse_s


@triton.jit
def _merge_into_state(
    out_ptr,
    lo_ptr,
    lse_ptr,
    rows,
    row_ok,
    acc,
    l_i,
    m_i,
    hi_s,
    lo_s,
    lse_s,
    HEAD_DV: tl.constexpr,
    HAS_LO: tl.constexpr,
    LO_MANT: tl.constexpr,
    LO_E_LO: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Fold a partial result (``acc / l_i``, log2 LSE ``m_i + log2(l_i)``) into the rows' running state, given as
    loaded by :func:`_load_state` (``hi_s``, ``lo_s``, ``lse_s``), and store the new state.

    The state is the normalised output so far, kept as ``out`` (the output dtype) plus ``lo``, the rounding residual
    ``o - out`` (when ``HAS_LO``), and its natural-log LSE ``lse``. ``lo`` is int8 in steps of 1/256 of ``out``'s ulp
    when ``LO_MANT > 0`` (:func:`encode_residual`; ``out + lo`` then carries about 15 significant bits for bf16, 18 for
    fp16), else bf16 (about 16, 19 for fp16). The merge is an exact log-sum-exp merge, since the key sets of the own
    chunk and the chosen chunks are disjoint. Either residual keeps the K'-1 merges' rounding well below the output's
    own, and ``out`` after the last merge is the output rounded once. A side with no key (``LSE = -inf``) gets weight
    0; two such sides keep ``out = 0``, ``lse = -inf``.
    """
    offs_dv = tl.arange(0, HEAD_DV).to(tl.int64)
    has = l_i > 0.0
    o_p = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2_p = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), _NEG_INF)
    o_ptrs = out_ptr + rows[:, None] * HEAD_DV + offs_dv[None, :]
    if HAS_LO:
        lo_ptrs = lo_ptr + rows[:, None] * HEAD_DV + offs_dv[None, :]
        if LO_MANT > 0:
            o_s = decode_residual(hi_s, lo_s, LO_MANT, LO_E_LO, INTERPRETED)
        else:
            o_s = widen_output(hi_s, INTERPRETED) + lo_s.to(tl.float32)
    else:
        o_s = widen_output(hi_s, INTERPRETED)
    lse2_s = lse_s * _LOG2E_C
    m = tl.maximum(lse2_s, lse2_p)
    m_use = tl.where(m == _NEG_INF, 0.0, m)
    w_s = tl.math.exp2(lse2_s - m_use)
    w_p = tl.math.exp2(lse2_p - m_use)
    tot = w_s + w_p
    tot_safe = tl.where(tot > 0.0, tot, 1.0)
    o = (o_s * (w_s / tot_safe)[:, None]) + (o_p * (w_p / tot_safe)[:, None])
    hi = round_to_output(o, out_ptr, INTERPRETED)
    tl.store(o_ptrs, hi, mask=row_ok[:, None])
    if HAS_LO:
        lo = _residual_of(o, hi, lo_ptr, LO_MANT, LO_E_LO, INTERPRETED)
        tl.store(lo_ptrs, lo, mask=row_ok[:, None])
    tl.store(lse_ptr + rows, tl.where(tot > 0.0, (m_use + tl.math.log2(tot_safe)) * _LN2, _NEG_INF), mask=row_ok)


@kernel_jit
def _sparse_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    out_ptr,
    lo_ptr,
    lse_ptr,
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
    smb,
    smh,
    smm,
    smn,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LO: tl.constexpr,
    LO_MANT: tl.constexpr,
    LO_E_LO: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PREFETCH_STATE: tl.constexpr = False,
):
    t, live = slot_tile(slot_tiles_ptr, j)
    if not live:  # past slot j's last tile (the grid is a static bound)
        return
    offs_m, row_ok, b, hkv, c, hq, i = key_major_tile(
        t, tile_seg_ptr, tile_row0_ptr, seg_start_ptr, counts_ptr, lists_ptr, B, Hkv, G, Lq, N, BLOCK_M
    )
    offs_d = tl.arange(0, HEAD_D).to(tl.int64)
    q = tl.load(
        q_ptr + (b * sqb + hq * sqh + i * sqm)[:, None] + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * skb + hkv * skh
    v_base = v_ptr + b * svb + hkv * svh
    mask_rows = mask_ptr + b * smb + hq * smh + i * smm
    m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DV], dtype=tl.float32)
    rows = (b * Hq + hq) * Lq + i
    if PREFETCH_STATE:
        # The state's loads go out before the key loop, so their latency hides behind it instead of following it (a
        # tile of a short chunk has only a step or two of keys); costs the raw state's registers across the loop.
        hi_s, lo_s, lse_s = _load_state(out_ptr, lo_ptr, lse_ptr, rows, row_ok, HEAD_DV, HAS_LO)
    lo = (c * C).to(tl.int32)
    # An earlier chunk is always complete (the last chunk is nobody's earlier chunk) and lies before every row's
    # position: no bounds or causal masks, only the user's mask.
    for start_n in range(lo, lo + C, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, start_n, qk_scale,
            row_ok, offs_m, offs_m, Lk, mask_rows, smn,
            HEAD_D, HEAD_DV, BLOCK_N, False, HAS_MASK, UPCAST, DOT_PREC,
        )  # fmt: skip
    # Each row appears once per slot: this program alone updates these rows' state in this launch.
    if not PREFETCH_STATE:
        hi_s, lo_s, lse_s = _load_state(out_ptr, lo_ptr, lse_ptr, rows, row_ok, HEAD_DV, HAS_LO)
    _merge_into_state(
        out_ptr, lo_ptr, lse_ptr, rows, row_ok, acc, l_i, m_i, hi_s, lo_s, lse_s,
        HEAD_DV, HAS_LO, LO_MANT, LO_E_LO, UPCAST,
    )  # fmt: skip


@kernel_jit
def _own_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    out_ptr,
    lo_ptr,
    lse_ptr,
    Hq,
    G,
    Lq,
    Lk,
    C,
    qk_scale,
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
    smb,
    smh,
    smm,
    smn,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LO: tl.constexpr,
    LO_MANT: tl.constexpr,
    LO_E_LO: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b, hq, hkv, m0, offs_m, row_ok, offs_m64, pos, own_start = own_chunk_rows(Hq, G, Lq, Lk, C, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D).to(tl.int64)
    offs_dv = tl.arange(0, HEAD_DV).to(tl.int64)
    q = tl.load(
        q_ptr + b * sqb + hq * sqh + offs_m64[:, None] * sqm + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * skb + hkv * skh
    v_base = v_ptr + b * svb + hkv * svh
    mask_rows = mask_ptr + b * smb + hq * smh + offs_m64 * smm
    m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DV], dtype=tl.float32)

    # Keys [lo, full_end) are visible to every row of the tile (same chunk, at or before the first row): no causal
    # mask there. The rest up to the last row's position is masked per (row, key).
    lo, full_end, p_last = own_chunk_span(m0, Lq, Lk, C, BLOCK_M, BLOCK_N)
    for start_n in range(lo, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, start_n, qk_scale,
            row_ok, pos, own_start, Lk, mask_rows, smn,
            HEAD_D, HEAD_DV, BLOCK_N, False, HAS_MASK, UPCAST, DOT_PREC,
        )  # fmt: skip
    for start_n in range(full_end, p_last + 1, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, start_n, qk_scale,
            row_ok, pos, own_start, Lk, mask_rows, smn,
            HEAD_D, HEAD_DV, BLOCK_N, True, HAS_MASK, UPCAST, DOT_PREC,
        )  # fmt: skip

    # The own chunk opens each row's state (the key-major passes over the slots fold into it afterwards).
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * _LN2, _NEG_INF)
    rows = (b * Hq + hq) * Lq + offs_m64
    hi = round_to_output(out, out_ptr, UPCAST)
    tl.store(out_ptr + rows[:, None] * HEAD_DV + offs_dv[None, :], hi, mask=row_ok[:, None])
    if HAS_LO:
        lo = _residual_of(out, hi, lo_ptr, LO_MANT, LO_E_LO, UPCAST)
        tl.store(lo_ptr + rows[:, None] * HEAD_DV + offs_dv[None, :], lo, mask=row_ok[:, None])
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@dataclass(frozen=True)
class _FwdConfig:
    """Launch tiles of the own-chunk kernel (``block_m`` rows x ``block_n`` keys, warps, stages) and of the key-major
    kernel (``sp_*``; 0 = the own-chunk kernel's value). ``sp_block_m`` is an upper bound: short lists get smaller
    tiles (:func:`list_tile_rows`). ``sp_prefetch`` = 1 loads the rows' running state before the key loop instead of
    after it (``PREFETCH_STATE``)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    sp_block_m: int = 0
    sp_block_n: int = 0
    sp_warps: int = 0
    sp_stages: int = 0
    sp_prefetch: int = 0

    def sparse(self) -> tuple[int, int, int, int]:
        """The key-major kernel's ``(block_m, block_n, num_warps, num_stages)``."""
        return (
            self.sp_block_m or self.block_m,
            self.sp_block_n or self.block_n,
            self.sp_warps or self.num_warps,
            self.sp_stages or self.num_stages,
        )


def _fwd_config(
    head_dim: int,
    head_dim_v: int,
    dtype: torch.dtype,
    has_mask: bool,
    chunk_size: int = 0,
    capability: tuple[int, int] | None = None,
) -> _FwdConfig:
    """Launch tiles for the GPU of compute ``capability`` (``None``: no GPU to ask, the tuned sm_90 table)."""
    if interpreting():
        # ~2 ms per program x loop step when interpreted: few, mid-sized tiles.
        return _FwdConfig(32, 32, 4, 1)
    cfg = _sm90_fwd_config(head_dim, head_dim_v, dtype, has_mask, chunk_size)
    if tuned_for(capability):
        return cfg
    # Not timed off sm_90: both kernels on the 64-row tiles over 4 warps (register-checked: 255 registers per thread
    # on every architecture since Volta; the 128-row tiles plus 3 stages of K/V need ~128 KB of shared memory, and
    # sm_86/89 have ~100 KB), the pipeline capped at 2 stages, the state loaded after the key loop (the prefetch's
    # registers were only timed on sm_90).
    block_m, warps = cfg.block_m, cfg.num_warps
    if dtype != torch.float32 and 64 < max(head_dim, head_dim_v) <= 128:
        block_m, warps = 64, 4  # a [64, 128] fp32 accumulator over 4 warps, as timed on the H100 before 2026-12-01
    return _FwdConfig(block_m, cfg.block_n, warps, min(cfg.num_stages, 2))


def _sm90_fwd_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, has_mask: bool, chunk_size: int) -> _FwdConfig:
    # H100 choices below were checked by compiling for sm_90a on a CPU machine (triton.compile + ptxas -v, the
    # launch-time divisibility-16 specialisations included): none spills for D <= 128. Timed on an H100
    # (docs/benchmarks.md), not autotuned.
    d = max(head_dim, head_dim_v)
    if dtype == torch.float32:
        # IEEE fp32 dots run on CUDA cores (operands in registers): a correctness path. 64 x 16 tiles over 8 warps
        # are the largest tried that do not spill at D=128 (64 x 32 spills ~800 B).
        return _FwdConfig(64, 16, 8, 1)
    if d <= 64:
        # [128, 64] fp32 accumulator over 4 warps (237 registers, no spill); the gathered user mask adds a [128, 64]
        # tile of 64-bit addresses, which spills at 4 warps: 8 warps then (207 registers).
        return _FwdConfig(128, 64, 8 if has_mask else 4, 3)
    if d <= 128:
        # Timed on an H100 (benchmarks/tune_forward.py, 12 tilings x 5 shapes, results/tune_forward-*.json): the
        # own-chunk kernel is fastest at 64 rows x 64 keys over 4 warps (a [64, 128] fp32 accumulator = 64
        # registers/thread; more programs per SM hide the merge's partial loads), 2-13% below the FlashAttention-2
        # setting of 128 rows over 8 warps at every shape. The key-major kernel likes 64-row tiles for chunks below
        # 1024 (-12% at 8K C512, -11% at C128) and 128-row tiles over 8 warps for longer lists (-4% at C2048, -3% at
        # C4096). 3 stages of K+V tiles (2 x 64 x 128 x 2 B = 32 KB each) + Q. With a user mask the 64-bit mask
        # addresses spill at BLOCK_N=64, not at 32.
        # Re-timed on the H200 after the forward lost its partials (2026-12-01, tune_forward-nvidia-h200-20261201*.json,
        # 16 tilings x 5 shapes): the own-chunk kernel, now without the merge, runs 15-20% faster on 128 rows over 8
        # warps at chunks >= 2048 (32K C2048: 1.77 -> 1.51 ms; 64K C4096 K12 H8: 1.65 -> 1.32) and 11% slower at C128,
        # and loading the state before the key loop (sp_prefetch) takes 2-8% off the key-major kernel (FlashMoBA's
        # C128 K8 at 8K: 1.556 -> 1.439 ms; 8K C512: 0.609 -> 0.591; 32K C2048: 5.46 -> 5.33). With the prefetch, short
        # chunks (< 1024) run the key-major kernel best on 32-key steps with 4 stages (tune_forward-nvidia-h200-
        # 20261201-short.json: FlashMoBA's C128 K8 1.442 -> 1.410 ms at 8K, 5.89 -> 5.72 at 32K; 8K C512 0.589 ->
        # 0.578). The masked tiles were not re-timed and keep the state loads after the loop.
        if has_mask:
            if 0 < chunk_size < 1024:
                return _FwdConfig(64, 32, 4, 3)
            return _FwdConfig(64, 32, 4, 3, 128, 32, 8, 3)
        if 0 < chunk_size < 1024:
            return _FwdConfig(64, 64, 4, 3, 64, 32, 4, 4, sp_prefetch=1)
        return _FwdConfig(128, 64, 8, 3, 128, 64, 8, 3, sp_prefetch=1)
    # D=256: 64 rows keep the [64, 256] accumulator at 64 registers/thread; BLOCK_N=32 keeps the key-major kernel
    # spill-free (the own-chunk kernel still spills ~180 B: D=256 is not a tuned target).
    return _FwdConfig(64, 32, 8, 2)


def moba_forward_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    chunk_size: int,
    topk: int,
    scale: float | None,
    attn_mask: Tensor | None = None,
    *,
    routing: str = "head",
    residual: str = "int8",
) -> tuple[Tensor, Tensor]:
    """MoBA attention forward with the Triton kernels: ``(out, lse)`` exactly as ``reference.moba_attention_forward``.

    Query row ``i`` (position ``p = Lk - Lq + i``) attends causally to its own chunk ``p // C`` and fully to the
    ``topk - 1`` strictly earlier chunks of highest gate score ``q . mean(key[c])`` (fp32; ties to the later chunk),
    intersected with ``attn_mask``. GQA/MQA query head ``h`` reads key/value head ``h // (Hq // Hkv)``; key/value are
    never repeated. Inputs may have any strides.

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, Lk, D]``; value: ``[B, Hkv, Lk, Dv]``; one dtype among fp16, bf16
            and fp32 (fp32 uses IEEE fp32 dots: correct but slow); on one CUDA device, or on the CPU under
            ``TRITON_INTERPRET=1``; ``D, Dv in (16, 32, 64, 128, 256)``; ``Hq % Hkv == 0``; ``Lq <= Lk``.
        chunk_size: ``C``, a multiple of 16 in ``[16, 8192]``.
        topk: ``1 <= K <= 64`` chunks per query, its own included (``K = 1``: own chunk only).
        scale: softmax scale; ``None`` means ``1 / sqrt(D)``.
        attn_mask: optional boolean mask broadcastable to ``[B, Hq, Lq, Lk]`` (True = may attend), on the same device;
            the gate ignores it.
        routing: ``"head"`` (the default: one top-k per query head) or ``"group"`` (one per key head and row, from
            the group-summed scores, given to every query head of the group; the attention kernels are the same).
        residual: how the running output's rounding residual is stored between the merges (bf16/fp16 outputs with
            ``K' > 1``; fp32 keeps none): ``"int8"`` (the default: one byte per output element, in steps of 1/256 of
            the output's ulp, about 15 significant bits for bf16 and 18 for fp16 in ``out + lo``) or ``"bf16"`` (two
            bytes, about 16 and 19 bits). Both keep the merges' rounding well below the output's own.

    Returns:
        ``(out, lse)``: ``out [B, Hq, Lq, Dv]`` contiguous in the query's dtype; ``lse [B, Hq, Lq]`` contiguous fp32,
        the natural log-sum-exp of the scaled scores over the attended keys. Rows with no attended key (all masked)
        give ``out = 0`` and ``lse = -inf``. Extra memory: the residual, of ``out``'s shape in int8 (``"int8"``) or bf16
        (when ``K' > 1`` and the dtype is not fp32), allocated once the gate's selection and the flip's ranks are freed,
        plus the flip's int32 lists (4 bytes per (row, head, slot)); the flip itself peaks at about 12 bytes of int32
        index arrays per (row, head, slot), ``K' = min(K, ceil(Lk / C))``.

    Raises:
        RuntimeError: Triton is not installed.
        ValueError: :func:`triton_unsupported_reason` gives a reason (the message contains it); an unknown
            ``routing`` or ``residual``.

    Example:
        >>> q = torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> k = v = torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> out, lse = moba_forward_triton(q, k, v, 32, 2, 0.125)  # doctest: +SKIP
        >>> out.shape, lse.dtype  # doctest: +SKIP
        (torch.Size([1, 4, 128, 64]), torch.float32)
    """
    require_triton()
    check_routing(routing)
    if residual not in RESIDUALS:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
    reason = triton_unsupported_reason(query, key, value, chunk_size, topk, attn_mask)
    if reason is not None:
        raise ValueError(f"moba_forward_triton cannot run this call: {reason}")
    b, hq, lq, d = query.shape
    lk, dv = key.shape[2], value.shape[3]
    chunk_size, topk = bounded_params(lk, chunk_size, topk)  # the same call; what the check above judged
    dev = query.device
    out = empty(b, hq, lq, dv, dtype=query.dtype, device=dev)
    lse = empty(b, hq, lq, dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out.zero_(), lse
    cfg = _fwd_config(d, dv, query.dtype, attn_mask is not None, chunk_size, device_capability(dev))
    qk_scale = (1.0 / math.sqrt(d) if scale is None else float(scale)) * _LOG2E
    km1 = min(topk - 1, (lk - 1) // chunk_size)
    # The residual of the running output: only where there is something to merge and the output dtype rounds.
    has_lo = km1 > 0 and query.dtype != torch.float32
    int8_lo = has_lo and residual == "int8"
    shared = dict(HEAD_D=d, HEAD_DV=dv, UPCAST=interpreting(), DOT_PREC=dot_precision(query.dtype))
    shared.update(HAS_MASK=attn_mask is not None, HAS_LO=has_lo, LO_MANT=0, LO_E_LO=0)
    if int8_lo:
        shared.update(LO_MANT=residual_mantissa_bits(query.dtype), LO_E_LO=residual_exponent_floor(query.dtype))
    sp_block_m, sp_block_n, sp_warps, sp_stages = cfg.sparse()
    whole = chunk_size & -chunk_size  # key blocks no longer than this tile every chunk exactly
    own = dict(shared, BLOCK_N=min(cfg.block_n, whole), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    sparse = dict(
        shared, BLOCK_N=min(sp_block_n, whole), num_warps=sp_warps, num_stages=sp_stages,
        PREFETCH_STATE=bool(cfg.sp_prefetch),
    )  # fmt: skip
    mask = MaskArgs.build(attn_mask, (b, hq, lq, lk), query)
    hkv = key.shape[1]
    g = hq // hkv
    n_chunks = -(-lk // chunk_size)
    strides = (*query.stride(), *key.stride(), *value.stride(), *mask.strides)
    with on_device(dev):
        by_slot = None
        block_m_sp = 0
        if km1 > 0:
            # Gate and flip before the residual exists: the selection and the flip's ranks (8 bytes per entry) are
            # freed before the residual (the output's shape, int8 or bf16) is allocated, so the two never add up. The
            # own pass does not need the selection, and it still merges first.
            means = chunk_means_triton(key, chunk_size)
            sel = _launch_gate(query, means, chunk_size, km1, lk, slot_major=True, routing=routing)
            block_m_sp = list_tile_rows(sp_block_m, g * lq, (lk - 1) // chunk_size)  # one slot's entries per plane
            by_slot = flip_slot_major(sel, hkv, n_chunks, block_m_sp)
            del sel, means  # the flip's lists replace the selection
        lo_dtype = torch.int8 if int8_lo else torch.bfloat16
        lo = empty(b, hq, lq, dv, dtype=lo_dtype, device=dev) if has_lo else out
        _own_fwd_kernel[(triton.cdiv(lq, cfg.block_m), b * hq)](
            query, key, value, mask.arg, out, lo, lse, hq, g, lq, lk, chunk_size, qk_scale, *strides,
            BLOCK_M=cfg.block_m, **own,
        )  # fmt: skip
        if by_slot is None:
            return out, lse
        flip = by_slot.flip
        # One launch per slot, in slot order: every row is in at most one tile of a launch, so its state is updated
        # by one program at a time, and the merge order (own chunk, then slots 0 .. K'-2) is fixed.
        for j, grid in enumerate(by_slot.grids):
            if grid == 0:
                continue
            _sparse_fwd_kernel[(grid,)](
                query, key, value, mask.arg, out, lo, lse,
                flip.lists, flip.seg_start, flip.counts, flip.tile_seg, flip.tile_row0, by_slot.slot_tiles, j,
                b, hq, hkv, g, lq, lk, n_chunks, chunk_size, qk_scale, *strides,
                BLOCK_M=block_m_sp, **sparse,
            )  # fmt: skip
    return out, lse
