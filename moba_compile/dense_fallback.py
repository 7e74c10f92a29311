"""Dense attention with a boolean mask: the log-sum-exp, gradients and forward-mode tangents of the path
``moba::attention`` takes when a mask turns out, at run time, not to be MoBA's (non-causal, or per-row like a sliding
window).

The forward itself is ``F.scaled_dot_product_attention``; these helpers give what SDPA does not expose (its
log-sum-exp) and its gradients, which a custom op's body cannot ask autograd for. Query rows are processed in blocks,
and GQA folds a group's query heads into rows, so memory stays ``O(rows * Lk)`` and key/value are never repeated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["masked_lse", "masked_backward", "masked_jvp"]

_BLOCK_ELEMENTS = 1 << 24  # [B, Hq, rows, Lk] temporaries of about 64 MiB in fp32


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fold(x: Tensor, heads_kv: int) -> Tensor:
    b, hq, rows, last = x.shape
    return x.reshape(b, heads_kv, (hq // heads_kv) * rows, last)


def _unfold(x: Tensor, heads_q: int) -> Tensor:
    b, hkv, grows, last = x.shape
    return x.reshape(b, heads_q, grows * hkv // heads_q, last)


def _row_blocks(query: Tensor, key: Tensor) -> Iterator[tuple[int, int]]:
    b, hq, lq, _ = query.shape
    rows = max(1, min(lq, _BLOCK_ELEMENTS // max(1, b * hq * key.shape[2])))
    for r0 in range(0, lq, rows):
        yield r0, min(lq, r0 + rows)


def _probabilities(q_blk: Tensor, key: Tensor, mask_blk: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Folded ``(P, lse)`` of one row block: softmax over the allowed keys, rows with none give P = 0, lse = -inf."""
    hkv = key.shape[1]
    s = (_fold(q_blk.to(_acc(q_blk.dtype)), hkv) @ key.to(_acc(key.dtype)).transpose(-1, -2)) * scale
    s = s.masked_fill(~_fold(mask_blk, hkv), -math.inf)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    return p, lse


def masked_lse(query: Tensor, key: Tensor, attn_mask: Tensor, scale: float) -> Tensor:
    """Natural log-sum-exp of dense masked attention scores.

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, Lk, D]``; attn_mask: bool, broadcastable to ``[B, Hq, Lq, Lk]``.
        scale: the softmax scale.

    Returns:
        ``[B, Hq, Lq]`` in fp32 (fp64 for fp64 inputs); ``-inf`` for rows with no allowed key.

    Example:
        >>> q = torch.randn(1, 2, 4, 8)
        >>> masked_lse(q, q, torch.ones(4, 4, dtype=torch.bool), 0.35).shape
        torch.Size([1, 2, 4])
    """
    b, hq, lq, _ = query.shape
    full = attn_mask.expand(b, hq, lq, key.shape[2])
    parts = [
        _unfold(_probabilities(query[:, :, r0:r1], key, full[:, :, r0:r1], scale)[1], hq).squeeze(-1)
        for r0, r1 in _row_blocks(query, key)
    ]
    if not parts:
        return torch.zeros(b, hq, 0, dtype=_acc(query.dtype), device=query.device)
    return torch.cat(parts, dim=2).contiguous()


def masked_backward(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of dense masked attention: ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO V^T * P))``,
    ``dQ = scale * dS K``, ``dK = scale * dS^T Q``; GQA sums over each group's query heads.

    Args:
        grad_out: ``[B, Hq, Lq, Dv]``; query, key, value, attn_mask, scale: as for the forward.

    Returns:
        ``(dq, dk, dv)`` shaped and typed like ``query``, ``key``, ``value``. Rows with no allowed key contribute
        nothing.

    Example:
        >>> q = torch.randn(1, 2, 4, 8)
        >>> [g.shape for g in masked_backward(q, q, q, q, torch.ones(4, 4, dtype=torch.bool), 0.35)][0]
        torch.Size([1, 2, 4, 8])
    """
    b, hq, lq, _ = query.shape
    hkv = key.shape[1]
    acc = _acc(query.dtype)
    full = attn_mask.expand(b, hq, lq, key.shape[2])
    k32, v32 = key.to(acc), value.to(acc)
    dk, dv = torch.zeros_like(k32), torch.zeros_like(v32)
    dq_parts = []
    for r0, r1 in _row_blocks(query, key):
        p, _ = _probabilities(query[:, :, r0:r1], key, full[:, :, r0:r1], scale)
        do = _fold(grad_out[:, :, r0:r1].to(acc), hkv)
        dp = do @ v32.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
        dv += p.transpose(-1, -2) @ do
        dk += (ds.transpose(-1, -2) @ _fold(query[:, :, r0:r1].to(acc), hkv)) * scale
        dq_parts.append(_unfold((ds @ k32) * scale, hq))
    dq = torch.cat(dq_parts, dim=2) if dq_parts else torch.zeros(query.shape, dtype=acc, device=query.device)
    return dq.to(query.dtype).contiguous(), dk.to(key.dtype).contiguous(), dv.to(value.dtype).contiguous()


def masked_jvp(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    tangent_query: Tensor | None,
    tangent_key: Tensor | None,
    tangent_value: Tensor | None,
    attn_mask: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Forward-mode tangents of dense masked attention and of its log-sum-exp.

    With ``dS = scale * (dQ K^T + Q dK^T)``: ``d lse = rowsum(P * dS)``, ``d out = (P * dS) V - d lse * (P V) + P dV``.

    Args:
        query, key, value, attn_mask, scale: as for the forward.
        tangent_query, tangent_key, tangent_value: shaped like their primals, or ``None`` for a zero tangent.

    Returns:
        ``(tangent_out [B, Hq, Lq, Dv]`` in the query's dtype, ``tangent_lse [B, Hq, Lq]`` in fp32 (fp64 for fp64
        inputs)``)``; rows with no allowed key have zero tangents.

    Example:
        >>> q = torch.randn(1, 2, 4, 8)
        >>> masked_jvp(q, q, q, q, None, None, torch.ones(4, 4, dtype=torch.bool), 0.35)[0].shape
        torch.Size([1, 2, 4, 8])
    """
    b, hq, lq, _ = query.shape
    hkv = key.shape[1]
    acc = _acc(query.dtype)
    full = attn_mask.expand(b, hq, lq, key.shape[2])
    k32, v32 = key.to(acc), value.to(acc)
    tk32 = tangent_key.to(acc) if tangent_key is not None else None
    tv32 = tangent_value.to(acc) if tangent_value is not None else None
    t_outs, t_lses = [], []
    for r0, r1 in _row_blocks(query, key):
        p, _ = _probabilities(query[:, :, r0:r1], key, full[:, :, r0:r1], scale)
        ds = torch.zeros_like(p)
        if tangent_query is not None:
            ds += (_fold(tangent_query[:, :, r0:r1].to(acc), hkv) @ k32.transpose(-1, -2)) * scale
        if tk32 is not None:
            ds += (_fold(query[:, :, r0:r1].to(acc), hkv) @ tk32.transpose(-1, -2)) * scale
        pds = p * ds
        t_lse = pds.sum(dim=-1, keepdim=True)
        t_out = pds @ v32 - t_lse * (p @ v32)
        if tv32 is not None:
            t_out += p @ tv32
        t_outs.append(_unfold(t_out, hq))
        t_lses.append(_unfold(t_lse, hq).squeeze(-1))
    if not t_outs:
        return query.new_zeros(b, hq, 0, value.shape[-1]), torch.zeros(b, hq, 0, dtype=acc, device=query.device)
    return torch.cat(t_outs, dim=2).to(query.dtype).contiguous(), torch.cat(t_lses, dim=2).contiguous()
