"""Input checks shared by the public API, the ops and the reference.

Every check raises ``ValueError`` (or ``TypeError`` for wrong kinds of object) with a message that names the
argument, what it holds and what was expected, so a user never meets a compiler stack trace for a bad call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["INT64_MAX", "MobaShapes", "bounded_params", "check_moba_inputs", "check_moba_params"]

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
