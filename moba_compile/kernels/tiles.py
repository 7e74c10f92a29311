"""Triton device helpers that several MoBA kernels share: work-tile decoding and the gate's packed top-k keys.

Every helper is a ``@triton.jit`` function that Triton inlines into its caller, so a kernel that calls one compiles to
the code it had when the lines were written out in it. Importing this module needs ``triton``.
"""

import triton
import triton.language as tl

__all__ = [
    "SENTINEL",
    "chunk_indices",
    "key_major_tile",
    "slot_tile",
    "merge_top",
    "own_chunk_rows",
    "own_chunk_span",
    "pack_scores",
    "query_major_program",
]

# Below every packed (score, chunk) key: marks an empty top-k slot and every chunk a row may not choose.
SENTINEL = tl.constexpr(-(2**63))


# --------------------------------------------------------------------------------------------------------------------
# Work tiles
# --------------------------------------------------------------------------------------------------------------------
@triton.jit
def slot_tile(slot_tiles_ptr, j):
    """Work tile of program ``tl.program_id(0)`` in the launch for slot ``j``: ``(t, live)``.

    The slot-major flip (:func:`.gating.flip_by_slot`) stores slot ``j``'s tiles at ``[slot_tiles[j],
    slot_tiles[j + 1])``; a launch's grid is a static bound, so programs past the slot's last tile are not ``live``.
    """
    t = tl.load(slot_tiles_ptr + j) + tl.program_id(0)
    live = t < tl.load(slot_tiles_ptr + j + 1)
    return t, live


@triton.jit
def key_major_tile(
    t,
    tile_seg_ptr,
    tile_row0_ptr,
    seg_start_ptr,
    counts_ptr,
    lists_ptr,
    B,
    Hkv,
    G,
    Lq,
    N,
    BLOCK_M: tl.constexpr,
):
    """Decode key-major work tile ``t`` (a live tile of the slot-major flip, see :func:`.gating.flip_by_slot`).

    Segment ``seg = ((j * B + b) * Hkv + hkv) * N + c``; its list holds int32 entry ids ``g * Lq + i`` (query head
    ``hkv * G + g``, row ``i``). The ids are decoded in 32-bit arithmetic: a 64-bit division is a ~100-instruction
    subroutine per element, which made these decodes the hottest code of the key-major kernels.

    Returns:
        ``(offs_m, row_ok, b, hkv, c, hq, i)``: the tile's row offsets and valid rows, batch, key head and chunk
        (int64 scalars), each row's query head and query row (int64).
    """
    seg = tl.load(tile_seg_ptr + t).to(tl.int64)
    row0 = tl.load(tile_row0_ptr + t)
    start = tl.load(seg_start_ptr + seg) + row0
    n_rows = tl.minimum(tl.load(counts_ptr + seg) - row0, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_rows
    local = tl.load(lists_ptr + start + offs_m, mask=row_ok, other=0)
    plane = seg // N
    c = seg % N
    bh = plane % (B * Hkv)
    b = bh // Hkv
    hkv = bh % Hkv
    g = local // Lq
    i = (local - g * Lq).to(tl.int64)
    hq = hkv * G + g.to(tl.int64)
    return offs_m, row_ok, b, hkv, c, hq, i


@triton.jit
def query_major_program(Hq, G):
    """``(pid_m, b, hq, hkv)`` of a query-major program: grid ``(row tiles, B * Hq)``, GQA group size ``G``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    hkv = hq // G
    return pid_m, b, hq, hkv


@triton.jit
def own_chunk_rows(Hq, G, Lq, Lk, C, BLOCK_M: tl.constexpr):
    """Rows of a query-major own-chunk program: ``(b, hq, hkv, m0, offs_m, row_ok, offs_m64, pos, own_start)``.

    The tile's query rows ``offs_m = m0 + [0, BLOCK_M)`` (``row_ok``: inside ``Lq``; ``offs_m64``: as int64) sit at
    positions ``pos = Lk - Lq + offs_m``; ``own_start`` is the first key of each row's own chunk.
    """
    pid_m, b, hq, hkv = query_major_program(Hq, G)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Lq
    offs_m64 = offs_m.to(tl.int64)
    pos = Lk - Lq + offs_m
    own_start = (pos // C) * C
    return b, hq, hkv, m0, offs_m, row_ok, offs_m64, pos, own_start


@triton.jit
def own_chunk_span(m0, Lq, Lk, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of a query-major tile's own-chunk pass: ``(lo, full_end, p_last)``.

    The tile's rows ``m0 ..`` sit at positions ``Lk - Lq + m0 ..``. Keys ``[lo, full_end)`` are visible to every row of
    the tile (same chunk, at or before the first row): no causal mask there; keys ``[full_end, p_last]`` are masked per
    (row, key).
    """
    p_first = Lk - Lq + m0
    p_last = tl.minimum(p_first + BLOCK_M, Lk) - 1
    lo = (p_first // C) * C
    n_full = (p_first + 1 - lo) // BLOCK_N
    n_full = tl.where(p_first // C == p_last // C, n_full, 0)
    full_end = lo + n_full * BLOCK_N
    return lo, full_end, p_last


# --------------------------------------------------------------------------------------------------------------------
# Gate keys: (score, chunk) packed into one int64 with a total order
# --------------------------------------------------------------------------------------------------------------------
@triton.jit
def pack_scores(sc, offs_c):
    """``(ordered fp32 bits << 32) | chunk`` for an fp32 score tile ``[rows, chunks]`` and its chunk indices.

    Larger key = higher score, and on equal scores the later chunk (the reference's tie rule). ``-0.0`` and ``+0.0``
    become one key, as they are one score for the reference's sort (defensive: dots accumulating from +0 do not return
    -0.0, but a differently lowered dot could).
    """
    sc = tl.where(sc == 0.0, 0.0, sc)
    bits = sc.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving: negative floats get their magnitude flipped
    return (ordered.to(tl.int64) << 32) | offs_c.to(tl.int64)[None, :]


@triton.jit
def merge_top(top, packed, TOP: tl.constexpr):
    """The running top-``TOP`` keys per row (ascending) merged with a tile of candidate keys ``packed``."""
    best = tl.topk(packed, TOP, dim=1)  # descending
    # max(ascending, descending) holds the top TOP of the union as a bitonic sequence; one merge re-sorts it.
    return tl.bitonic_merge(tl.maximum(top, best), dim=1, descending=False)


@triton.jit
def chunk_indices(top):
    """Chunk index (int32) of each packed key, ``-1`` for an empty slot."""
    return tl.where(top == SENTINEL, -1, (top & 0x7FFFFFFF).to(tl.int32))
