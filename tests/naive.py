"""An independent, brute-force MoBA: the spec read literally, one query row at a time, in float64.

It shares no code with ``moba_compile.reference``; tests use it to check the reference (and through it, everything).
Only for small shapes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def naive_moba_mask(query: Tensor, key: Tensor, chunk_size: int, topk: int, attn_mask: Tensor | None = None) -> Tensor:
    """Boolean ``[B, Hq, Lq, Lk]``: which keys each query row attends to under MoBA (spec section 1)."""
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    group = hq // hkv
    n_chunks = math.ceil(lk / chunk_size)
    allowed = torch.zeros(b, hq, lq, lk, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            kh = key[bi, h // group].double()
            means = [kh[c * chunk_size : min(lk, (c + 1) * chunk_size)].mean(0) for c in range(n_chunks)]
            for i in range(lq):
                p = lk - lq + i
                own = p // chunk_size
                q = query[bi, h, i].double()
                scored = [(float(q @ means[c]), c) for c in range(own)]
                # highest score first; on equal scores the higher chunk index first
                scored.sort(key=lambda sc: (sc[0], sc[1]), reverse=True)
                for _, c in scored[: topk - 1]:
                    allowed[bi, h, i, c * chunk_size : min(lk, (c + 1) * chunk_size)] = True
                allowed[bi, h, i, own * chunk_size : p + 1] = True
    if attn_mask is not None:
        allowed &= attn_mask.expand(b, hq, lq, lk).cpu()
    return allowed


def naive_moba(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """MoBA output in float64 on CPU from the explicit mask; rows with no key give zeros."""
    hq, hkv = query.shape[1], key.shape[1]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    allowed = naive_moba_mask(
        query.detach().cpu(), key.detach().cpu(), chunk_size, topk, None if attn_mask is None else attn_mask.cpu()
    )
    k = key.cpu().double().repeat_interleave(hq // hkv, dim=1)
    v = value.cpu().double().repeat_interleave(hq // hkv, dim=1)
    s = (query.cpu().double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v
