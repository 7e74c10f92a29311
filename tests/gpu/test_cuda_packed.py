"""GPU checks of packed sequences (issue 17): the compiled Triton kernels on packed documents against the same
documents run one by one and against a float64 oracle.

Collected only where CUDA is available. Run on the GPU machine with::

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest tests/gpu/test_cuda_packed.py -q

Budgets: packed and unpacked run the same kernels on the same numbers per document, so they must agree to one bf16
rounding of the largest value (bitwise under the interpreter; a shared launch of padded short documents compiles for
other lengths), outputs and the three gradients, in the backward's deterministic mode
(``torch.use_deterministic_algorithms``: the default dQ atomics would make even two unpacked runs differ in the last
bits). Against the float64 reference
(computed on the GPU from the same bf16 inputs), the relative error ``||x - x64|| / ||x64||`` is at most
``2 * ref_err + eps(bf16)``, with ``ref_err`` the reference's own error on the same inputs in fp32 math (as
``tests/gpu/test_cuda.py``).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from moba_compile import moba_attention, ops, reference

assert os.environ.get("TRITON_INTERPRET", "0") in ("0", ""), "run the GPU tests with TRITON_INTERPRET=0"
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _deterministic():
    # warn_only: the float64 oracle's cuBLAS matmuls need not be deterministic, only the MoBA backward must be.
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    floor = 1e-3 * math.sqrt(max(ref.numel(), 1))
    return ((x - ref).norm() / max(ref.norm().item(), floor)).item()


def _inputs(lengths: list[int], hq: int, hkv: int, d: int, seed: int):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(1, hq, t, d, device=CUDA, generator=g).bfloat16()
    k = torch.randn(1, hkv, t, d, device=CUDA, generator=g).bfloat16()
    v = torch.randn(1, hkv, t, d, device=CUDA, generator=g).bfloat16()
    do = torch.randn(1, hq, t, d, device=CUDA, generator=g).bfloat16()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=CUDA)
    return q, k, v, do, cu


def _fwd_bwd(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def _check(lengths: list[int], chunk: int, topk: int, hq: int, hkv: int, d: int, seed: int) -> None:
    q, k, v, do, cu = _inputs(lengths, hq, hkv, d, seed)
    bounds = cu.tolist()
    docs = list(zip(bounds[:-1], bounds[1:]))
    before = ops.CALLS["packed_attention:triton"]
    got = _fwd_bwd(lambda q, k, v: moba_attention(q, k, v, chunk_size=chunk, topk=topk, cu_seqlens=cu), q, k, v, do)
    assert ops.CALLS["packed_attention:triton"] - before == len(lengths)  # impl="auto" took the kernels on CUDA
    for s, e in docs:
        one = _fwd_bwd(
            lambda q, k, v: moba_attention(q, k, v, chunk_size=chunk, topk=topk),
            *(x[:, :, s:e].contiguous() for x in (q, k, v, do)),
        )
        for x, y in zip(got, one):
            # Interpreted they are bitwise equal; compiled, a padded shared launch specialises on other lengths, so
            # allow one bf16 rounding of the largest value (a wrong key or chunk moves results by far more).
            atol = torch.finfo(torch.bfloat16).eps * float(y.abs().max())
            torch.testing.assert_close(x[:, :, s:e], y, rtol=0, atol=atol, msg=f"document [{s}, {e})")
    # Against float64 (and the reference's own fp32 error on the same bf16 inputs).
    q64, k64, v64, do64 = (x.double() for x in (q, k, v, do))
    q32, k32, v32, do32 = (x.float() for x in (q, k, v, do))
    want = _fwd_bwd(lambda q, k, v: reference.moba_attention_packed(q, k, v, cu, chunk_size=chunk, topk=topk),
                    q64, k64, v64, do64)  # fmt: skip
    ref32 = _fwd_bwd(lambda q, k, v: reference.moba_attention_packed(q, k, v, cu, chunk_size=chunk, topk=topk),
                     q32, k32, v32, do32)  # fmt: skip
    eps = torch.finfo(torch.bfloat16).eps
    for name, x, y, r in zip(("out", "dq", "dk", "dv"), got, want, ref32):
        budget = 2 * rel_err(r, y) + eps
        assert rel_err(x, y) <= budget, (name, rel_err(x, y), budget)


@pytest.mark.parametrize(
    "lengths,chunk,topk,hq,hkv,d",
    [
        ([1, 700, 64, 1, 2000, 333, 1], 128, 3, 8, 2, 128),  # 1-token documents, mid-chunk starts, GQA
        ([4096, 2048, 1500, 8192], 512, 4, 4, 4, 128),  # long documents, MHA
        ([3000, 5000], 1024, 2, 8, 1, 64),  # MQA, D = 64
    ],
)
def test_packed_equals_unpacked_and_the_float64_oracle(lengths, chunk, topk, hq, hkv, d):
    _check(lengths, chunk, topk, hq, hkv, d, seed=0)


def test_many_short_documents_share_launches():
    # 150 documents of 20-900 tokens: grouped by padded length, a handful of launch sequences instead of 150.
    lengths = torch.randint(20, 901, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    before = ops.CALLS["packed_attention:triton-shared-launch"]
    _check(lengths, 128, 3, 4, 2, 128, seed=1)
    assert 0 < ops.CALLS["packed_attention:triton-shared-launch"] - before <= 8


@settings(max_examples=10, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(
    lengths=st.lists(st.integers(1, 1500), min_size=1, max_size=6),
    chunk=st.sampled_from([64, 128, 256]),
    topk=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_packed_hypothesis(lengths, chunk, topk, seed):
    _check(lengths, chunk, topk, 4, 2, 64, seed)


def test_block_diagonal_mask_path_on_cuda():
    lengths = [900, 1, 2500, 700]
    q, k, v, do, cu = _inputs(lengths, 4, 2, 128, seed=3)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=CUDA), torch.tensor(lengths, device=CUDA))
    pos = torch.arange(sum(lengths), device=CUDA)
    mask = ((doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None]))[None, None]
    kind = torch.ops.moba.analyse_mask(mask, q, k, "")
    assert int(kind) == ops.MASK_DOCUMENTS

    def masked(q, k, v):
        return ops.attention(q, k, v, chunk_size=256, topk=3, attn_mask=mask, mask_kind=kind)

    def packed(q, k, v):
        return moba_attention(q, k, v, chunk_size=256, topk=3, cu_seqlens=cu)

    for x, y in zip(_fwd_bwd(masked, q, k, v, do), _fwd_bwd(packed, q, k, v, do)):
        assert torch.equal(x, y)
