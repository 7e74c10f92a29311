"""Shared helpers for the MoBA reference and op tests: seeded inputs, masks, dense oracles and named tolerances.

Test modules import the helpers directly (``from conftest import ...``); pytest puts ``tests/`` on ``sys.path`` the same
way it does for ``tests/naive.py``.
"""

from __future__ import annotations

import os

# Triton decides at import whether its kernels run interpreted, and torch._inductor (used by other test modules)
# imports it early: set the flag here, before any test module is imported, so the interpreted kernel tests (which use
# CPU tensors) pass in any order. impl="auto" still picks the reference on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

# tests/gpu holds checks that need a CUDA GPU (compiled kernels at large shapes, whole models on CUDA); on a machine
# without one there is nothing of them to run, so they are not collected (run them with TRITON_INTERPRET=0 on a GPU).
collect_ignore = [] if torch.cuda.is_available() else ["gpu"]

# Float64 comparisons of two correct implementations that only sum in different orders (blocked matmuls vs per-row
# loops, fused SDPA vs explicit softmax): observed differences are ~1e-15 on O(1) values. 1e-10 leaves five orders of
# magnitude of headroom and is still ~8 orders below the O(1e-2) change that one wrongly included or excluded key makes.
F64 = {"rtol": 1e-10, "atol": 1e-10}


def low_precision_atol(dtype: torch.dtype, reference: Tensor) -> float:
    """Error budget of a bf16/fp16 result against the float64 reference computed on the *same* (already rounded) inputs.

    The reference path accumulates in fp32 and rounds once to ``dtype`` at the end, so the dominant error is that final
    rounding: at most half an ulp, i.e. ``eps / 2 * |x| <= eps / 2 * max|ref|``. fp32 accumulation adds ~``Lk * 2**-24``
    relative, far below ``eps / 2`` for the short test sequences. Budget: ``eps * max|ref|``, twice the rounding bound.
    """
    return torch.finfo(dtype).eps * float(reference.detach().abs().max())


@dataclass(frozen=True)
class Case:
    """One MoBA call's shapes and parameters; ``id`` gives names like ``B2-Lq37-Lk37-Hq4-Hkv2-C5-K3``."""

    b: int
    lq: int
    lk: int
    hq: int
    hkv: int
    c: int
    k: int
    d: int = 8
    dv: int | None = None
    scale: float | None = None
    mask: str = "none"
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [f"B{self.b}-Lq{self.lq}-Lk{self.lk}-Hq{self.hq}-Hkv{self.hkv}-C{self.c}-K{self.k}"]
        if self.d != 8 or self.dv is not None:
            parts.append(f"D{self.d}-Dv{self.dv if self.dv is not None else self.d}")
        if self.scale is not None:
            parts.append(f"s{self.scale}")
        if self.mask != "none":
            parts.append(f"mask_{self.mask}")
        return "-".join(parts)

    def with_(self, **kw) -> Case:
        return replace(self, **kw)

    def inputs(self, dtype: torch.dtype = torch.float64, requires_grad: bool = False):
        """``(q, k, v, mask)`` for this case: seeded normal q/k/v (drawn in float64, then cast) and the named mask."""
        q, k, v = rand_qkv(
            self.seed, self.b, self.hq, self.hkv, self.lq, self.lk, self.d, self.dv, dtype=dtype, requires_grad=False
        )
        mask = make_mask(self.mask, self.b, self.hq, self.lq, self.lk, self.seed)
        if requires_grad:
            q, k, v = (t.requires_grad_() for t in (q, k, v))
        return q, k, v, mask

    def params(self) -> dict:
        return {"chunk_size": self.c, "topk": self.k, "scale": self.scale}


def rand_qkv(
    seed: int,
    b: int,
    hq: int,
    hkv: int,
    lq: int,
    lk: int,
    d: int,
    dv: int | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    requires_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded ``q [b, hq, lq, d]``, ``k [b, hkv, lk, d]``, ``v [b, hkv, lk, dv]``; same values for every dtype."""
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, lk, dv, generator=gen, dtype=torch.float64).to(dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v


def bottom_right_causal(lq: int, lk: int) -> Tensor:
    """Bool ``[lq, lk]``: query row ``i`` (position ``lk - lq + i``) may see keys ``<=`` its position."""
    rows = torch.arange(lq)[:, None] + (lk - lq)
    return torch.arange(lk)[None, :] <= rows


def make_mask(kind: str, b: int, hq: int, lq: int, lk: int, seed: int = 0) -> Tensor | None:
    """Named boolean masks (True = may attend), all broadcastable to ``[b, hq, lq, lk]``.

    ``random``: i.i.d. keep-probability 0.7 per (batch, head, row, key); ``random_b1``: shared over heads;
    ``left_pad``/``right_pad``: ``[b, 1, 1, lk]`` padding masks hiding a different number of keys per batch element (the
    first element unpadded); ``empty_rows``: random with some rows fully masked; ``causal_pad``: bottom-right causal AND
    left padding (the form Hugging Face builds); ``all_false``: nothing may attend.
    """
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(10_000 + seed)
    if kind == "random":
        return torch.rand(b, hq, lq, lk, generator=gen) < 0.7
    if kind == "random_b1":
        return torch.rand(b, 1, lq, lk, generator=gen) < 0.7
    if kind in ("left_pad", "right_pad", "causal_pad"):
        pads = [(i * max(1, lk // 3)) % lk for i in range(b)]  # 0, lk//3, 2*lk//3, ... keys hidden per element
        pos = torch.arange(lk)
        rows = []
        for pad in pads:
            rows.append(pos >= pad if kind != "right_pad" else pos < lk - pad)
        mask = torch.stack(rows)[:, None, None, :]
        if kind == "causal_pad":
            mask = mask & bottom_right_causal(lq, lk)
        return mask
    if kind == "empty_rows":
        mask = torch.rand(b, hq, lq, lk, generator=gen) < 0.7
        mask[..., :: max(1, lq // 3), :] = False
        return mask
    if kind == "all_false":
        return torch.zeros(b, 1, 1, lk, dtype=torch.bool)
    raise ValueError(f"unknown mask kind {kind!r}")


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float | None = None, *, dtype: torch.dtype | None = None
) -> Tensor:
    """Explicit softmax attention over ``allowed`` (bool, broadcastable to ``[B, Hq, Lq, Lk]``); empty rows give 0.

    Differentiable; GQA by repeating key/value (fine for an oracle on small shapes). Computes in ``dtype``
    (default: the inputs').
    """
    dtype = q.dtype if dtype is None else dtype
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kr = k.to(dtype).repeat_interleave(group, dim=1)
    vr = v.to(dtype).repeat_interleave(group, dim=1)
    s = (q.to(dtype) @ kr.transpose(-1, -2)) * scale
    allowed = allowed.expand(s.shape)
    s = s.masked_fill(~allowed, -math.inf)
    row_max = s.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(s - row_max)
    denom = p.sum(-1, keepdim=True)
    return (p @ vr) / torch.where(denom > 0, denom, torch.ones_like(denom))


def own_chunk_causal(lq: int, lk: int, chunk_size: int) -> Tensor:
    """Bool ``[lq, lk]``: block-diagonal causal mask, each row sees only keys of its own chunk up to its position."""
    rows = torch.arange(lq)[:, None] + (lk - lq)
    keys = torch.arange(lk)[None, :]
    return (keys <= rows) & (keys // chunk_size == rows // chunk_size)
