"""Input checks shared by the public API, the ops and the reference.

Every check raises ``ValueError`` (or ``TypeError`` for wrong kinds of object) with a message that names the
argument, what it holds and what was expected, so a user never meets a compiler stack trace for a bad call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "INT64_MAX",
    "ROUTINGS",
    "MobaShapes",
    "bounded_params",
    "check_cu_seqlens",
    "check_moba_inputs",
    "check_moba_params",
    "check_packed_inputs",
    "check_routing",
]

#: How the gate selects chunks (spec section 6, "Group routing"): ``"head"`` (the default, the MoBA paper's): one
#: top-k per query head; ``"group"``: one top-k per key head of a GQA/MQA group, from the scores summed over the
#: group's query heads, shared by all of them. With ``Hq == Hkv`` both select the same.
ROUTINGS: tuple[str, ...] = ("head", "group")

# The ops' schemas take ``int`` parameters as int64: a larger value cannot reach any implementation.
INT64_MAX = 2**63 - 1
# Chunk sizes at or beyond the key length all describe one chunk; clamping stops at this floor (the Triton kernels'
# largest chunk size, kernels.support.MAX_CHUNK), so a chunk size the kernels already take keeps its tiling and
# compiled kernels as a decode cache grows, while a larger one never reaches a loop bound or buffer size.
_CHUNK_CLAMP_FLOOR = 8192


class MobaShapes:
    """The sizes of one MoBA call, read once from validated inputs."""

    __slots__ = ("batch", "heads_q", "heads_kv", "len_q", "len_k", "head_dim", "head_dim_v")

    def __init__(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        self.batch, self.heads_q, self.len_q, self.head_dim = query.shape
        _, self.heads_kv, self.len_k, _ = key.shape
        self.head_dim_v = value.shape[-1]

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 for MHA, ``heads_q`` for MQA)."""
        return self.heads_q // self.heads_kv


def check_moba_params(chunk_size: object, topk: object, scale: object = None) -> None:
    """Check the scalar MoBA parameters; raise ``ValueError``/``TypeError`` naming the bad one."""
    for name, val in (("chunk_size", chunk_size), ("topk", topk)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int >= 1, got {val!r} ({type(val).__name__})")
        if val < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
        if val > INT64_MAX:
            raise ValueError(f"{name} must fit in int64 (<= 2**63 - 1), got {val}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {scale!r} ({type(scale).__name__})")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale!r}")


def check_routing(routing: object) -> str:
    """Check a ``routing`` argument; return it.

    Args:
        routing: ``"head"`` or ``"group"`` (:data:`ROUTINGS`).

    Returns:
        ``routing`` unchanged.

    Raises:
        ValueError: any other value; the message names the value and the allowed ones.

    Example:
        >>> check_routing("group")
        'group'
        >>> check_routing("token")
        Traceback (most recent call last):
        ...
        ValueError: routing must be one of 'head', 'group'; got 'token'
    """
    if not isinstance(routing, str) or routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(map(repr, ROUTINGS))}; got {routing!r}")
    return routing


def bounded_params(len_k: int, chunk_size: int, topk: int) -> tuple[int, int]:
    """``(chunk_size, topk)`` clamped to what ``len_k`` keys can use, giving exactly the same MoBA call.

    Every implementation works on these values, so no buffer, loop or launch size follows a parameter beyond the
    sequence (``topk=10**9`` or ``chunk_size=2**40`` on 512 tokens): memory and time stay bounded by the inputs.

    - ``chunk_size >= len_k``: one chunk holds every key, whatever its size. It is clamped to
      ``max(8192, len_k rounded up to 16)``: at least ``len_k`` (still one chunk), a multiple of 16 when clamped (the
      Triton kernels' requirement), and sizes up to 8192 unchanged.
    - ``topk >= n = ceil(len_k / chunk_size)``: a row never has more than ``n - 1`` earlier chunks, so ``topk = n``
      selects the same (all of them).

    Args:
        len_k: key length ``Lk`` (``<= 0`` leaves the parameters as they are: nothing to bound them by).
        chunk_size, topk: validated MoBA parameters (ints ``>= 1``).

    Returns:
        ``(chunk_size', topk')`` with ``chunk_size' <= max(chunk_size, ...)`` as above and ``1 <= topk' <= n``.

    Example:
        >>> bounded_params(512, 2**40, 10**9), bounded_params(512, 64, 10**9), bounded_params(512, 64, 3)
        ((8192, 1), (64, 8), (64, 3))
    """
    if len_k <= 0:
        return chunk_size, topk
    if chunk_size >= len_k:
        chunk_size = min(chunk_size, max(_CHUNK_CLAMP_FLOOR, -(-len_k // 16) * 16))
    return chunk_size, min(topk, -(-len_k // chunk_size))


def check_moba_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    chunk_size: object,
    topk: object,
    scale: object = None,
    attn_mask: Tensor | None = None,
) -> MobaShapes:
    """Check a MoBA call in the SDPA layout and return its sizes.

    Raises ``TypeError`` or ``ValueError`` naming the argument at fault: non-tensors, ranks other than 4, batch or
    head-dim mismatches, ``Hq % Hkv != 0``, ``Lq > Lk``, an empty key sequence, mixed or non-floating dtypes, mixed
    devices, float (additive) masks and masks that do not broadcast to ``[B, Hq, Lq, Lk]``.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    b, hq, lq, d = query.shape
    bk, hk, lk, dk = key.shape
    bv, hv, lv, _ = value.shape
    if not (b == bk == bv):
        raise ValueError(f"batch sizes differ: query {b}, key {bk}, value {bv}")
    if hk != hv:
        raise ValueError(f"key and value head counts differ: key {hk}, value {hv}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk})")
    if d != dk:
        raise ValueError(f"query and key head dims differ: query {d}, key {dk}")
    if lk != lv:
        raise ValueError(f"key and value sequence lengths differ: key {lk}, value {lv}")
    if lk == 0:
        raise ValueError("key sequence is empty (Lk = 0): MoBA needs at least one key")
    if lq > lk:
        raise ValueError(
            f"query is longer than key (Lq={lq} > Lk={lk}): MoBA places queries bottom-right, at positions Lk-Lq+i"
        )
    check_moba_params(chunk_size, topk, scale)
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a bool tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool:
            raise ValueError(
                f"attn_mask has dtype {attn_mask.dtype}: only boolean masks (True = may attend) are MoBA; "
                "float (additive) masks must stay on dense SDPA"
            )
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        try:
            fits = tuple(torch.broadcast_shapes(attn_mask.shape, (b, hq, lq, lk))) == (b, hq, lq, lk)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Lq, Lk] = {[b, hq, lq, lk]}"
            )
    return MobaShapes(query, key, value)


def check_cu_seqlens(
    cu_seqlens: object, total: int, device: torch.device | None = None, *, read_values: bool = True
) -> list[int]:
    """Check packed-sequence document boundaries and return them as Python ints (one host read of the tensor).

    The packed layout (the fla / FlashAttention-varlen convention): ``query [B, Hq, total, D]``, usually ``B = 1``,
    holds ``n`` documents one after another; document ``d`` is positions ``[cu_seqlens[d], cu_seqlens[d + 1])`` of
    every batch row (all batch rows share the boundaries).

    Args:
        cu_seqlens: int32 or int64 tensor ``[n + 1]``, ``n >= 1``, strictly increasing (every document has at least
            one token), starting at 0 and ending at ``total``.
        total: the packed sequence length (``Lq == Lk``).
        device: where the tensor must live (the query's device), or ``None`` to skip that check.
        read_values: ``False`` checks only the dtype, shape and device (no host read: under ``torch.compile``, where
            the op's body checks the values at run time) and returns ``[]``.

    Returns:
        The boundaries as a list of ``n + 1`` Python ints (``[]`` when ``read_values`` is false).

    Raises:
        TypeError: ``cu_seqlens`` is not a tensor.
        ValueError: wrong dtype, rank, length, device; a first value other than 0, a last value other than ``total``,
            or boundaries that do not increase; the message names the problem and shows the values.

    Example:
        >>> check_cu_seqlens(torch.tensor([0, 3, 8], dtype=torch.int32), 8)
        [0, 3, 8]
    """
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be an int32/int64 tensor [n_docs + 1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64 (document boundaries), got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D [n_docs + 1] with n_docs >= 1 (e.g. [0, len0, len0 + len1, ...]), got shape "
            f"{tuple(cu_seqlens.shape)}"
        )
    if device is not None and cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but query is on {device}")
    if not read_values:
        return []
    bounds = [int(v) for v in cu_seqlens.tolist()]
    shown = bounds if len(bounds) <= 12 else [*bounds[:6], "...", *bounds[-5:]]
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]} (cu_seqlens = {shown})")
    if bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens must end at the packed sequence length {total}, got {bounds[-1]}: the boundaries disagree "
            f"with the tensor shapes (cu_seqlens = {shown})"
        )
    for d in range(len(bounds) - 1):
        if bounds[d + 1] <= bounds[d]:
            raise ValueError(
                f"cu_seqlens must be strictly increasing (every document at least one token), but document {d} is "
                f"[{bounds[d]}, {bounds[d + 1]}) (cu_seqlens = {shown})"
            )
    return bounds


def check_packed_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: object,
    chunk_size: object,
    topk: object,
    scale: object = None,
    attn_mask: object = None,
    *,
    read_values: bool = True,
) -> tuple[MobaShapes, list[int]]:
    """Check a packed-sequence MoBA call (``cu_seqlens`` given) and return its sizes and document boundaries.

    On top of :func:`check_moba_inputs`: the queries and keys are the same packed sequence (``Lq == Lk``: a KV-cache
    step is per sequence, not packed), no ``attn_mask`` (a padding mask combined with packing is ambiguous: pack only
    real tokens, so that the documents say everything), and :func:`check_cu_seqlens` on ``Lk`` (``read_values`` is
    passed on).

    Raises:
        TypeError, ValueError: naming the argument and the problem.

    Example:
        >>> q = torch.zeros(1, 2, 8, 16)
        >>> check_packed_inputs(q, q, q, torch.tensor([0, 5, 8]), 4, 2)[1]
        [0, 5, 8]
    """
    shapes = check_moba_inputs(query, key, value, chunk_size, topk, scale)
    if attn_mask is not None:
        raise ValueError(
            "attn_mask cannot be combined with cu_seqlens (packed documents): a padding mask and packing together are "
            "ambiguous; pack only the real tokens and let cu_seqlens give the documents"
        )
    if shapes.len_q != shapes.len_k:
        raise ValueError(
            f"packed sequences (cu_seqlens) need queries and keys of one packed sequence, Lq == Lk; got "
            f"Lq={shapes.len_q}, Lk={shapes.len_k} (decode and chunked prefill run per sequence, without cu_seqlens)"
        )
    return shapes, check_cu_seqlens(cu_seqlens, shapes.len_k, query.device, read_values=read_values)
