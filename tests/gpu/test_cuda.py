"""GPU-only checks: the compiled Triton kernels at shapes the interpreter cannot afford.

Collected only where CUDA is available (``tests/conftest.py`` ignores ``tests/gpu`` elsewhere, since nothing here can
run on a CPU). Run on the GPU machine with::

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest tests/gpu -q

Whole models on CUDA are in ``test_cuda_models.py``. The small-shape suites (``tests/test_kernels_*.py``) also run
compiled there with ``MOBA_TEST_DEVICE=cuda``.

Budgets (float64 oracle computed on the GPU from the same rounded inputs):

- gate: exact index sets, as on the CPU.
- ``out`` and gradients: relative error ``||x - x64|| / ||x64||`` at most ``2 * ref_err + eps(dtype)``, where
  ``ref_err`` is the reference's own relative error on the same low-precision inputs (fp32 math, one rounding) and
  ``eps(dtype)`` covers the kernel rounding the probabilities to the input dtype before the value product.
- ``lse``: the ``-inf`` rows exactly; elsewhere within ``1e-4 * max(1, |lse|)`` (fp32 sums in another order).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import moba_compile
from moba_compile import ops, reference
from moba_compile.kernels import moba_backward_triton, moba_forward_triton, select_chunks_triton
from moba_compile.kernels.decode import decode_chunk_means, moba_decode_triton

assert os.environ.get("TRITON_INTERPRET", "0") in ("0", ""), "run the GPU tests with TRITON_INTERPRET=0"
CUDA = torch.device("cuda")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / max(||ref||, 1e-3 * sqrt(numel))``: relative, except where the reference is (near) zero.

    A reference that is exactly zero (``dq`` of a row attending to a single key: ``dS = P (dP - D) = 0``) would make
    any fp32 rounding of ``D = rowsum(dO * O)`` an infinite relative error; the floor treats 1e-3 per element (inputs
    are N(0, 1), gradients O(0.1-1)) as the smallest magnitude the budget is relative to.
    """
    x, ref = x.double(), ref.double()
    floor = 1e-3 * math.sqrt(max(ref.numel(), 1))
    return ((x - ref).norm() / max(ref.norm().item(), floor)).item()


def inputs(b, hq, hkv, lq, lk, d, dtype, seed, mask: str | None = None, dv: int | None = None):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, hq, lq, d, device=CUDA, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, device=CUDA, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, dv, device=CUDA, generator=g).to(dtype)
    do = torch.randn(b, hq, lq, dv, device=CUDA, generator=g).to(dtype)
    m = None
    if mask == "pad":  # left padding of a different length per batch element, the Hugging Face form
        pos = torch.arange(lk, device=CUDA)
        m = torch.stack([pos >= (i * lk) // (2 * b) for i in range(b)])[:, None, None, :]
    elif mask == "random":
        m = torch.rand(b, 1, lq, lk, device=CUDA, generator=g) > 0.2
        m[:, :, :: max(1, lq // 5)] = False  # fully masked rows
    return q, k, v, do, m


def check_close(name: str, got: torch.Tensor, low: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(got).all(), f"{name} has NaN/inf"
    ref_err = rel_err(low, ref64)
    err = rel_err(got, ref64)
    tol = 2 * ref_err + torch.finfo(dtype).eps
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.3e} (reference's own {ref_err:.3e})"


# (B, Hq, Hkv, Lq, Lk, D, chunk, topk, dtype, mask)
LARGE = [
    (1, 4, 4, 8192, 8192, 128, 512, 3, torch.bfloat16, None),  # spec row 1 per head
    (2, 4, 2, 8192, 8192, 128, 128, 8, torch.bfloat16, None),  # FlashMoBA's setting, GQA
    (1, 4, 1, 4096, 4096, 64, 256, 4, torch.float16, None),  # MQA, D=64
    (1, 2, 2, 3000, 20000, 128, 8192, 3, torch.bfloat16, None),  # chunked prefill, chunk 8192, partial chunk
    (1, 4, 2, 6000, 6000, 128, 4096, 12, torch.bfloat16, None),  # K beyond the chunk count
    (2, 4, 2, 2500, 2500, 128, 1024, 2, torch.bfloat16, "pad"),  # padded batch
    (1, 4, 2, 2048, 2048, 128, 64, 5, torch.float16, "random"),  # arbitrary mask, empty rows
    (1, 2, 1, 1000, 1000, 128, 48, 4, torch.bfloat16, None),  # chunk 48 (not a power of two)
    (1, 2, 2, 1024, 1024, 128, 128, 3, torch.float32, None),  # fp32 inputs
]


def _id(c) -> str:
    b, hq, hkv, lq, lk, d, ch, k, dt, m = c
    return f"B{b}-Hq{hq}-Hkv{hkv}-Lq{lq}-Lk{lk}-D{d}-C{ch}-K{k}-{str(dt)[6:]}" + (f"-{m}" if m else "")


@pytest.mark.parametrize("case", LARGE, ids=_id)
def test_forward_gate_and_backward_large(case) -> None:
    b, hq, hkv, lq, lk, d, c, k, dtype, mask_kind = case
    q, key, v, do, mask = inputs(b, hq, hkv, lq, lk, d, dtype, seed=lq + c, mask=mask_kind)
    scale = 1.0 / math.sqrt(d)

    sel = select_chunks_triton(q, key, c, k)
    ref_sel = reference.select_chunks(q, key, chunk_size=c, topk=k)
    same = (sel.long().sort(-1).values == ref_sel.sort(-1).values).all(-1)
    assert bool(same.all()), f"gate differs on {int((~same).sum())} of {same.numel()} rows"

    out, lse = moba_forward_triton(q, key, v, c, k, scale, mask)
    kw = dict(chunk_size=c, topk=k, scale=scale, attn_mask=mask)
    out64, lse64 = reference.moba_attention_forward(q.double(), key.double(), v.double(), **kw)
    out_lp, _ = reference.moba_attention_forward(q, key, v, **kw)
    check_close("out", out, out_lp, out64, dtype)
    empty = torch.isinf(lse64)
    assert torch.equal(torch.isinf(lse), empty) and torch.all(out[empty] == 0)
    lse_err = (lse.double() - lse64)[~empty].abs()
    assert bool((lse_err <= 1e-4 * lse64[~empty].abs().clamp_min(1)).all()), f"lse error {lse_err.max():.3e}"

    grads = moba_backward_triton(do, q, key, v, out, lse, c, k, scale, mask)
    ref64 = reference.moba_attention_backward(*(t.double() for t in (do, q, key, v, out, lse)), **kw)
    ref_lp = reference.moba_attention_backward(do, q, key, v, out, lse, **kw)
    for name, got, r64, rlp in zip(("dq", "dk", "dv"), grads, ref64, ref_lp):
        check_close(name, got, rlp, r64, dtype)


def test_deterministic_backward_is_bitwise_stable_large() -> None:
    q, key, v, do, _ = inputs(1, 8, 2, 8192, 8192, 128, torch.bfloat16, seed=3)
    out, lse = moba_forward_triton(q, key, v, 128, 8, 0.088)
    runs = [moba_backward_triton(do, q, key, v, out, lse, 128, 8, 0.088, deterministic=True) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    torch.use_deterministic_algorithms(True)
    try:
        q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, key, v))
        moba_compile.moba_attention(q2, k2, v2, chunk_size=128, topk=8, scale=0.088).backward(do)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(runs[0], (q2.grad, k2.grad, v2.grad)):
        assert torch.equal(a, b), "torch.use_deterministic_algorithms must select the deterministic backward"


@pytest.mark.parametrize(
    "lk,c,k,hq,hkv,mask",
    [(100_000, 4096, 12, 32, 8, None), (65_537, 128, 8, 16, 16, None), (30_000, 512, 3, 8, 2, "pad")],
)
def test_decode_large(lk, c, k, hq, hkv, mask) -> None:
    q, key, v, _, m = inputs(2, hq, hkv, 1, lk, 128, torch.bfloat16, seed=lk, mask=mask)
    scale = 1 / math.sqrt(128)
    kw = dict(chunk_size=c, topk=k, scale=scale, attn_mask=m)
    out64, lse64 = reference.moba_attention_forward(q.double(), key.double(), v.double(), **kw)
    out_lp, _ = reference.moba_attention_forward(q, key, v, **kw)
    for means in (None, decode_chunk_means(key, c)):
        out, lse = moba_decode_triton(q, key, v, c, k, scale, attn_mask=m, means=means)
        check_close("decode out", out, out_lp, out64, torch.bfloat16)
        assert (lse.double() - lse64).abs().max().item() <= 1e-4 * max(1.0, lse64.abs().max().item())


# No shrinking: on a GPU each new shape compiles kernels; the first failing example is reported as drawn.
@settings(deadline=None, derandomize=True, database=None, max_examples=25, phases=[Phase.explicit, Phase.generate])
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 4),
    group=st.sampled_from([1, 2, 4]),
    chunk=st.integers(1, 64).map(lambda i: 16 * i),
    lk=st.integers(1, 3000),
    lq_frac=st.floats(0.0, 1.0),
    topk=st.integers(1, 64),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    d=st.sampled_from([64, 128]),
    masked=st.booleans(),
    routing=st.sampled_from(["head", "group"]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes_cuda(b, hkv, group, chunk, lk, lq_frac, topk, dtype, d, masked, routing, seed) -> None:
    lq = max(1, round(lq_frac * lk))
    q, key, v, do, mask = inputs(b, hkv * group, hkv, lq, lk, d, dtype, seed, mask="random" if masked else None)
    for t in (q, key, v):
        t.requires_grad_()
    out = moba_compile.moba_attention(q, key, v, chunk_size=chunk, topk=topk, attn_mask=mask, routing=routing)
    out.backward(do)
    leaves = [t.detach().double().requires_grad_() for t in (q, key, v)]
    out64 = reference.moba_attention(*leaves, chunk_size=chunk, topk=topk, attn_mask=mask, routing=routing)
    out64.backward(do.double())
    low = [t.detach().requires_grad_() for t in (q, key, v)]
    out_lp = reference.moba_attention(*low, chunk_size=chunk, topk=topk, attn_mask=mask, routing=routing)
    out_lp.backward(do)
    check_close("out", out, out_lp, out64, dtype)
    for name, got, r64, rlp in zip(("dq", "dk", "dv"), (q, key, v), leaves, low):
        check_close(name, got.grad, rlp.grad, r64.grad, dtype)


def test_auto_picks_triton_on_cuda() -> None:
    q, key, v, do, _ = inputs(1, 4, 2, 512, 512, 128, torch.bfloat16, seed=1)
    before = (ops.CALLS["attention:triton"], ops.CALLS["attention_backward:triton"])
    q.requires_grad_()
    moba_compile.moba_attention(q, key, v, chunk_size=64, topk=3).backward(do)
    assert (ops.CALLS["attention:triton"], ops.CALLS["attention_backward:triton"]) == (before[0] + 1, before[1] + 1)


def _compiled_variants(kernel) -> int:
    """How many binaries Triton holds for ``kernel`` on any device (its JIT cache, one entry per specialisation)."""
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


def test_lengths_do_not_recompile() -> None:
    """Decode steps and prefills of any length reuse one binary per kernel (lengths are not specialised on)."""
    from moba_compile.kernels import backward, decode, forward, gating

    kernels = [
        getattr(module, name)
        for module in (forward, gating, decode, backward)
        for name in dir(module)
        if name.endswith("_kernel")
    ]
    scale = 1 / math.sqrt(128)
    q, key, v, _, _ = inputs(1, 8, 2, 1, 4096 + 64, 128, torch.bfloat16, seed=3)
    means = decode_chunk_means(key, 512)
    # Own-chunk fills 1, 2, ..., 33 (the classes "== 1", "% 16 == 0" and neither) after a chunk boundary.
    moba_decode_triton(q, key[:, :, :4097], v[:, :, :4097], 512, 3, scale, means=means)
    before = {k: _compiled_variants(k) for k in kernels}
    for lk in range(4097, 4097 + 33):
        moba_decode_triton(q, key[:, :, :lk], v[:, :, :lk], 512, 3, scale, means=means)
    torch.cuda.synchronize()
    grew = [k.fn.__name__ for k in kernels if _compiled_variants(k) != before[k]]
    assert not grew, f"decode kernels recompiled for new lengths: {grew}"
    # Prefill + backward at lengths of every class (odd, multiple of 16, different chunk counts).
    for n in (1000, 1024, 1537, 2048):
        q, key, v, do, _ = inputs(1, 4, 2, n, n, 128, torch.bfloat16, seed=n)
        q.requires_grad_()
        moba_compile.moba_attention(q, key, v, chunk_size=128, topk=3).backward(do)
        if n == 1000:
            before = {k: _compiled_variants(k) for k in kernels}
    torch.cuda.synchronize()
    grew = [k.fn.__name__ for k in kernels if _compiled_variants(k) != before[k]]
    assert not grew, f"prefill/backward kernels recompiled for new lengths: {grew}"
