"""GPU-only checks of group routing (spec section 6): the compiled kernels against the float64 reference.

Collected only where CUDA is available (``tests/conftest.py`` ignores ``tests/gpu`` elsewhere). Run on the GPU machine
with::

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest tests/gpu/test_cuda_routing_group.py -q

Budgets, as ``test_cuda.py`` (float64 oracle on the GPU from the same rounded inputs):

- gate: the kernel's chunk sets equal the float64 reference's, except on rows where the two differ only between
  chunks whose float64 group scores lie within the fp32 rounding of the sums (a near tie): the kernel adds ``3 G``
  bf16 products (or ``G`` tf32x3 dots) into one fp32 accumulator, the reference rounds each head's dot, so a gap
  below ``2**-20 * sum_h |q_h| |mean_c|`` (16 fp32 ulps of the magnitudes summed) may order either way.
- ``out`` and gradients: ``test_cuda.check_close`` (relative error within twice the reference's own error on the same
  low-precision inputs plus one ulp of the dtype), with the oracle run on the kernel's own selection (the selection is
  part of the data, so a near-tie chosen differently is not an attention error).
- deterministic mode: bitwise equal across runs.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_cuda import check_close, inputs

from moba_compile import reference
from moba_compile.kernels import moba_backward_triton, moba_forward_triton, select_chunks_triton
from moba_compile.kernels.decode import decode_chunk_means, moba_decode_triton

assert os.environ.get("TRITON_INTERPRET", "0") in ("0", ""), "run the GPU tests with TRITON_INTERPRET=0"


def group_scores64(q: torch.Tensor, k: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 group scores ``[B, Hkv, Lq, N]`` and their rounding scale ``sum_h |q_h| |mean_c|`` (same shape)."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    means = reference.chunk_means(k.double(), chunk)  # [B, Hkv, N, D]
    qg = q.double().view(b, hkv, hq // hkv, lq, d)
    scores = torch.einsum("bhgld,bhnd->bhln", qg, means)
    scale = torch.einsum("bhgl,bhn->bhln", qg.norm(dim=-1), means.norm(dim=-1))
    return scores, scale


def check_gate(q: torch.Tensor, k: torch.Tensor, chunk: int, topk: int) -> torch.Tensor:
    """The kernel's group selection; asserts it is the float64 reference's up to near ties (module doc)."""
    sel = select_chunks_triton(q, k, chunk, topk, routing="group")
    ref = reference.select_chunks(q.double(), k.double(), chunk_size=chunk, topk=topk, routing="group")
    b, hq, lq, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    got = sel.long().view(b, hkv, g, lq, -1)
    assert torch.equal(got, got[:, :, :1].expand_as(got)), "every query head of a group must hold the same selection"
    differ = (sel.long().sort(-1).values != ref.sort(-1).values).any(-1)
    if not differ.any():
        return sel
    scores, scale = group_scores64(q, k, chunk)
    tol = 2.0**-20 * scale
    for bi, h, i in differ.view(b, hkv, g, lq)[:, :, 0].nonzero().tolist():
        mine = [c for c in got[bi, h, 0, i].tolist() if c >= 0]
        theirs = [c for c in ref.view(b, hkv, g, lq, -1)[bi, h, 0, i].tolist() if c >= 0]
        s, t = scores[bi, h, i], tol[bi, h, i]
        worst_mine = min(s[c] for c in mine)
        best_left = max(s[c] for c in theirs if c not in mine)
        assert best_left - worst_mine <= t[mine + theirs].max(), (
            f"row (b={bi}, key head={h}, i={i}): kernel {sorted(mine)} vs reference {sorted(theirs)} is not a near tie"
        )
    assert differ.float().mean() < 1e-3, f"{int(differ.sum())} of {differ.numel()} rows differ (near ties)"
    return sel


def selection_mask(sel: torch.Tensor, lq: int, lk: int, chunk: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Bool ``[B, Hq, Lq, Lk]`` of the attended keys for a given selection (own chunk causal + chosen chunks)."""
    b, hq = sel.shape[:2]
    n = -(-lk // chunk)
    dev = sel.device
    chosen = torch.zeros(b, hq, lq, n + 1, dtype=torch.bool, device=dev)
    chosen.scatter_(-1, torch.where(sel < 0, n, sel).long(), True)
    key_chunk = torch.arange(lk, device=dev) // chunk
    pos = torch.arange(lq, device=dev)[:, None] + (lk - lq)
    own = (key_chunk[None, :] == pos // chunk) & (torch.arange(lk, device=dev)[None, :] <= pos)
    allowed = chosen[..., :n].gather(-1, key_chunk.expand(b, hq, lq, lk)) | own
    return allowed if mask is None else allowed & mask


# (B, Hq, Hkv, Lq, Lk, D, chunk, topk, dtype)
CASES = [
    (1, 8, 2, 8192, 8192, 128, 512, 3, torch.bfloat16),  # spec row 1 per key head, GQA 4
    (2, 8, 2, 8192, 8192, 128, 128, 8, torch.bfloat16),  # FlashMoBA's setting, GQA
    (1, 8, 1, 4096, 4096, 128, 256, 4, torch.bfloat16),  # MQA
    (1, 7, 1, 2048, 2048, 128, 128, 5, torch.bfloat16),  # a group of 7 (Qwen-style 28/4), not a power of two
    (1, 4, 2, 3000, 20000, 128, 2048, 3, torch.bfloat16),  # chunked prefill, partial last chunk
    (1, 8, 2, 4096, 4096, 64, 256, 4, torch.float16),  # fp16 (tf32x3 gate), D=64
]


def _id(c) -> str:
    b, hq, hkv, lq, lk, d, ch, k, dt = c
    return f"B{b}-Hq{hq}-Hkv{hkv}-Lq{lq}-Lk{lk}-D{d}-C{ch}-K{k}-{str(dt)[6:]}"


def oracle(q, k, v, do, allowed, scale: float, acc: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``(out, dq, dk, dv)`` of softmax attention over ``allowed`` in ``acc`` (autograd), one query head at a time so
    that the ``[Lq, Lk]`` temporaries stay bounded (float64 at 8K x 8K: 512 MiB per head and tensor)."""
    g = q.shape[1] // k.shape[1]
    leaves = [t.detach().to(acc).requires_grad_() for t in (q, k, v)]
    outs = []
    for h in range(q.shape[1]):
        kv = slice(h // g, h // g + 1)
        s = (leaves[0][:, h : h + 1] @ leaves[1][:, kv].transpose(-1, -2)) * scale
        s = s.masked_fill(~allowed[:, h : h + 1], -math.inf)
        outs.append(torch.softmax(s, -1) @ leaves[2][:, kv])
    out = torch.cat(outs, 1)
    out.backward(do.to(acc))
    return (out.detach(), *(t.grad for t in leaves))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_group_gate_forward_and_backward(case) -> None:
    b, hq, hkv, lq, lk, d, c, k, dtype = case
    q, key, v, do, _ = inputs(b, hq, hkv, lq, lk, d, dtype, seed=lq + c)
    scale = 1.0 / math.sqrt(d)
    sel = check_gate(q, key, c, k)
    out, lse = moba_forward_triton(q, key, v, c, k, scale, routing="group")
    grads = moba_backward_triton(do, q, key, v, out, lse, c, k, scale, routing="group")
    # The oracle attends over the kernel's own selection: a near tie chosen the other way is data, not an error.
    allowed = selection_mask(sel, lq, lk, c, None)
    ref64 = oracle(q, key, v, do, allowed, scale, torch.float64)
    # The reference's own low-precision result: fp32 math on the same inputs, rounded once to the dtype.
    low = [t.to(dtype) for t in oracle(q, key, v, do, allowed, scale, torch.float32)]
    for name, got, rlp, r64 in zip(("out", "dq", "dk", "dv"), (out, *grads), low, ref64):
        check_close(name, got, rlp, r64, dtype)
    assert torch.isfinite(lse).all()


def test_group_deterministic_backward_is_bitwise_stable() -> None:
    q, key, v, do, _ = inputs(1, 8, 2, 8192, 8192, 128, torch.bfloat16, seed=3)
    out, lse = moba_forward_triton(q, key, v, 128, 8, 0.088, routing="group")
    runs = [
        moba_backward_triton(do, q, key, v, out, lse, 128, 8, 0.088, deterministic=True, routing="group")
        for _ in range(3)
    ]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("lk,c,k,hq,hkv", [(100_000, 4096, 12, 32, 8), (30_000, 512, 3, 8, 1), (65_537, 128, 8, 28, 4)])
def test_group_decode(lk, c, k, hq, hkv) -> None:
    q, key, v, _, _ = inputs(2, hq, hkv, 1, lk, 128, torch.bfloat16, seed=lk)
    scale = 1 / math.sqrt(128)
    check_gate(q, key, c, k)  # the gate at these group sizes (7 heads per key head included)
    kw = dict(chunk_size=c, topk=k, scale=scale, routing="group")
    out64, lse64 = reference.moba_attention_forward(q.double(), key.double(), v.double(), **kw)
    out_lp, _ = reference.moba_attention_forward(q, key, v, **kw)
    for means in (None, decode_chunk_means(key, c)):
        out, lse = moba_decode_triton(q, key, v, c, k, scale, means=means, routing="group")
        check_close("decode out", out, out_lp, out64, torch.bfloat16)
        assert (lse.double() - lse64).abs().max().item() <= 1e-4 * max(1.0, lse64.abs().max().item())
