"""The Triton MoBA decode kernel (one query at position Lk - 1 against a KV cache) versus the reference, interpreted.

Runs under the Triton interpreter (``TRITON_INTERPRET=1``, set below before anything imports triton) on small CPU
shapes. Nothing is skipped: without triton these tests fail, CI installs it.

Oracle and tolerances (each derived from data or named):

- gate: exact. The kernel's chunk index sets equal ``reference.select_chunks`` on the same inputs (exact ties too).
- ``out``: ``oracle`` is float64 softmax attention over the reference's attended set (own chunk + the reference
  gate's chunks, AND the mask), so both implementations are measured against the same keys. Budget:
  ``2 * ref_err + eps(dtype) * max|oracle|``, where ``ref_err`` is the max error of
  ``reference.moba_attention_forward`` on the same fp16/bf16 inputs against that oracle (fp32 math + one rounding to
  the dtype; the kernel does the same math in another order), and the second term (the floor) is one ulp of the
  output's magnitude: the kernel rounds the probabilities P to the input dtype before ``P @ V``, as tensor cores do,
  which the reference does not.
- ``lse``: ``2 * ref_lse_err + 8 * eps(fp32) * max(1, max|lse|)``: an fp32 log-sum-exp in both, summed in another
  order (a few fp32 ulps); ``-inf`` rows (no attended key) must match exactly, with ``out = 0`` there.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (a missing triton must fail the tests, not skip them)
from conftest import Case, decode_case  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_cases import TEST_DEVICE, assert_out_lse_within_budget, on_test_device, prefill_inputs  # noqa: E402

from moba_compile import ops, reference  # noqa: E402
from moba_compile.kernels import chunk_means_triton  # noqa: E402
from moba_compile.kernels import support as ksupport  # noqa: E402
from moba_compile.kernels.decode import (  # noqa: E402
    decode_chunk_means,
    decode_select_chunks_triton,
    decode_unsupported_reason,
    moba_decode_triton,
)

# MOBA_TEST_DEVICE=cuda: the launchers run compiled on the GPU (kernel_cases.on_test_device); identity on the CPU.
decode_chunk_means = on_test_device(decode_chunk_means)
decode_select_chunks_triton = on_test_device(decode_select_chunks_triton)
# The reason checks read metadata only and stay on the CPU: moving their inputs would materialise the expanded
# 2**29-key tensors of the int32 cases (512 GiB) and turn the CPU-routing cases into CUDA ones.
cpu_decode_unsupported_reason = decode_unsupported_reason
moba_decode_triton = on_test_device(moba_decode_triton)
chunk_means_triton = on_test_device(chunk_means_triton)
ops_chunk_means = on_test_device(ops.chunk_means)


def make_inputs(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Seeded ``(q [B, Hq, 1, D], k, v, mask)`` of a decode case (``mask`` may be ``None``)."""
    return prefill_inputs(case, seed)  # type: ignore[return-value]


def oracle(q, k, v, sel: torch.Tensor, chunk_size: int, scale: float, mask) -> torch.Tensor:
    """float64 attention of the decode query over its own chunk + the chunks in ``sel [B, Hq, K-1]``, AND ``mask``."""
    b, hq, _, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    pos = lk - 1
    key_chunk = torch.arange(lk) // chunk_size
    allowed = key_chunk.expand(b, hq, lk) == pos // chunk_size
    for j in range(sel.shape[-1]):
        allowed = allowed | (key_chunk.expand(b, hq, lk) == sel[..., j : j + 1].long())
    allowed = allowed[:, :, None, :]
    if mask is not None:
        allowed = allowed & mask
    group = hq // hkv
    kr = k.double().repeat_interleave(group, 1)
    vr = v.double().repeat_interleave(group, 1)
    s = (q.double() @ kr.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, -math.inf)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    return (p @ vr) / torch.where(den > 0, den, torch.ones_like(den))


def check_decode(
    q, k, v, chunk_size: int, topk: int, mask=None, means=None, scale: float | None = None, routing: str = "head"
):
    """Run the kernel and compare (out, lse) and the gate with the reference under the budgets above."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = moba_decode_triton(q, k, v, chunk_size, topk, scale, attn_mask=mask, means=means, routing=routing)
    assert out.dtype == q.dtype and out.is_contiguous() and out.shape == (*q.shape[:3], v.shape[-1])
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]

    ref_sel = reference.select_chunks(q, k, chunk_size=chunk_size, topk=topk, routing=routing)[:, :, 0]
    sel = decode_select_chunks_triton(q, k, chunk_size, topk, means=means, routing=routing)
    assert sel.dtype == torch.int32 and sel.shape == ref_sel.shape
    assert torch.equal(sel.long().sort(-1).values, ref_sel.sort(-1).values), "gate index sets differ"

    kw = dict(chunk_size=chunk_size, topk=topk, scale=scale, attn_mask=mask, routing=routing)
    out_lp, lse_lp = reference.moba_attention_forward(q, k, v, **kw)
    _, lse64 = reference.moba_attention_forward(q.double(), k.double(), v.double(), **kw)
    out64 = oracle(q, k, v, ref_sel, chunk_size, scale, mask)
    assert_out_lse_within_budget(out, lse, out64, out_lp, lse64, lse_lp, torch.isinf(lse_lp), q.dtype)
    return out, lse, sel


GRID = [
    decode_case(2, 100, 4, 2, 16, 3, torch.float16),  # GQA, partial own chunk (100 = 6 * 16 + 4)
    decode_case(2, 100, 4, 2, 16, 3, torch.bfloat16),
    decode_case(2, 100, 4, 4, 16, 3, torch.bfloat16),  # MHA
    decode_case(2, 100, 4, 1, 16, 3, torch.float16),  # MQA
    decode_case(1, 97, 6, 2, 16, 3, torch.bfloat16),  # Lk at a chunk boundary + 1: own chunk of 1 key; group of 3
    decode_case(1, 96, 4, 2, 16, 3, torch.float16),  # Lk a multiple of C: own chunk full
    decode_case(2, 100, 4, 2, 16, 1, torch.float16),  # K = 1: own chunk only
    decode_case(1, 70, 4, 2, 16, 8, torch.bfloat16),  # K beyond the chunk count: dense causal
    decode_case(1, 10, 4, 2, 16, 3, torch.float16),  # Lk < C: no earlier chunk
    decode_case(1, 200, 4, 2, 64, 2, torch.float16),  # chunk 64: two pieces per chunk (split-K), partial own chunk
    decode_case(1, 300, 2, 1, 48, 4, torch.bfloat16),  # chunk 48 (not a power of two): pieces of 32 + 16 keys
    decode_case(1, 600, 4, 2, 16, 4, torch.float16),  # 37 earlier chunks: two-stage gate (3 ranges + merge)
    decode_case(1, 300, 4, 2, 32, 4, torch.float32),  # fp32: IEEE dots
    decode_case(1, 150, 2, 1, 32, 3, torch.bfloat16, d=128),  # head dim 128
    decode_case(1, 150, 2, 2, 16, 3, torch.float16, dv=128),  # value head dim differs
    decode_case(1, 50, 80, 1, 16, 2, torch.float16),  # MQA with 80 heads: two row blocks (64 + 16) per key head
    decode_case(3, 100, 4, 2, 16, 3, torch.float16, mask="left_pad_spread"),  # padding mask [B, 1, 1, Lk]
    decode_case(3, 100, 4, 2, 16, 3, torch.bfloat16, mask="left_pad_spread"),
    decode_case(2, 100, 4, 2, 16, 3, torch.float16, mask="left_pad_spread_empty"),  # a fully masked row
    decode_case(2, 120, 4, 2, 16, 3, torch.bfloat16, mask="random_heads_p06"),  # per-head mask [B, Hq, 1, Lk]
    decode_case(2, 100, 4, 2, 16, 3, torch.bfloat16, strided=True),  # non-contiguous inputs
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_decode_matches_reference(case: Case) -> None:
    q, k, v, mask = make_inputs(case)
    check_decode(q, k, v, case.c, case.k, mask)


@pytest.mark.parametrize(
    "case",
    [
        decode_case(2, 100, 4, 2, 16, 3, torch.float16),
        decode_case(1, 600, 4, 2, 16, 4, torch.bfloat16, mask="left_pad_spread"),
    ],
    ids=lambda c: c.id,
)
def test_means_given_equals_means_computed(case: Case) -> None:
    # The attention never reads the means, so the same selection gives bitwise the same result. Means from the
    # kernel's own helper (all complete chunks, more rows than the step needs) and from the reference (fp32 sums in
    # another order, plus the partial last chunk, which the step must ignore).
    q, k, v, mask = make_inputs(case)
    scale = 1.0 / math.sqrt(case.d)
    out0, lse0 = moba_decode_triton(q, k, v, case.c, case.k, scale, attn_mask=mask)
    for means in (decode_chunk_means(k, case.c), reference.chunk_means(k, case.c)):
        assert means.shape[2] >= (case.lk - 1) // case.c
        out1, lse1, _ = check_decode(q, k, v, case.c, case.k, mask, means=means)
        assert torch.equal(out0, out1) and torch.equal(lse0, lse1)


def test_chunk_means_match_reference() -> None:
    # fp32 sums of 16..48 bf16 keys in another order: agreement to a few fp32 ulps of the sum's magnitude.
    k = torch.randn(2, 3, 100, 64).to(torch.bfloat16)
    for chunk in (16, 32, 48):
        means = decode_chunk_means(k, chunk)
        assert means.shape == (2, 3, 100 // chunk, 64) and means.dtype == torch.float32
        torch.testing.assert_close(means, reference.chunk_means(k, chunk)[:, :, : 100 // chunk], rtol=1e-6, atol=1e-6)


def means_tolerance(k: torch.Tensor, chunk: int) -> torch.Tensor:
    """Bound on |Triton mean - reference mean| per element (docs/kernels.md, "Chunk means").

    Both sum the chunk's ``C`` keys in fp32, in different orders: each sum is within ``(C - 1) * u * sum|k|`` of the
    exact one (``u = 2**-24``), so the two means differ by at most ``2 * (C - 1) * u * mean|k|``, plus half an ulp from
    each division (``2 * u * |mean|``, bounded here by ``mean|k|``).
    """
    u = 2.0**-24
    n = k.shape[2] // chunk
    mean_abs = k[:, :, : n * chunk].float().abs().unflatten(2, (n, chunk)).mean(3)
    return (2 * (chunk - 1) + 2) * u * mean_abs


@pytest.mark.parametrize(
    ("dtype", "chunk", "lk"),
    [(torch.bfloat16, 16, 100), (torch.float16, 48, 150), (torch.float32, 32, 96), (torch.bfloat16, 64, 200)],
)
def test_one_means_computation_for_prefill_decode_and_cache(dtype: torch.dtype, chunk: int, lk: int) -> None:
    # Issue 14: the prefill gate, a decode step and a KV cache (ops.chunk_means) take their chunk means from one
    # kernel, so a decode step ranks chunks exactly as the prefill of the same row did, even near ties.
    g = torch.Generator().manual_seed(lk + chunk)
    k = torch.randn(2, 3, lk, 64, generator=g).to(dtype)
    n = lk // chunk
    gate = chunk_means_triton(k, chunk)  # what the prefill forward and backward score against
    decode = decode_chunk_means(k, chunk)
    cache = ops_chunk_means(k, chunk, impl="triton")
    assert cache.shape == (2, 3, n, 64) and cache.dtype == torch.float32 and cache.is_contiguous()
    assert gate.shape[2] == -(-lk // chunk)
    assert torch.equal(decode, cache) and torch.equal(gate[:, :, :n], cache)
    # A partial last chunk is excluded, and chunks completed later leave earlier rows unchanged (a cache appends).
    assert ops_chunk_means(k[:, :, : n * chunk - 1], chunk, impl="triton").shape[2] == n - 1
    assert torch.equal(ops_chunk_means(k[:, :, : n * chunk - 1], chunk, impl="triton"), cache[:, :, : n - 1])
    assert torch.equal(ops_chunk_means(k[:, :, chunk : 2 * chunk], chunk, impl="triton")[:, :, 0], cache[:, :, 1])
    # The reference sums in another order: equal to within the fp32 summation bound, not bitwise.
    ref = reference.chunk_means(k, chunk)[:, :, :n]
    assert torch.all((cache - ref).abs() <= means_tolerance(k, chunk))
    assert torch.equal(ops.chunk_means(k, chunk, impl="reference"), ref)
    # The decode gate scores the cache's means exactly as it scores its own.
    q = torch.randn(2, 6, 1, 64, generator=g).to(dtype)
    topk = min(4, n)
    given = decode_select_chunks_triton(q, k, chunk, topk, means=cache)
    assert torch.equal(given, decode_select_chunks_triton(q, k, chunk, topk))


def test_reads_only_means_selected_and_own_chunks() -> None:
    # The cost claim, checked functionally: with the means precomputed from clean keys, poisoning every key/value of
    # the chunks the step did not select (NaN) must not change a single bit of the result.
    case = decode_case(2, 300, 4, 2, 16, 3, torch.float16)
    q, k, v, _ = make_inputs(case)
    scale = 1.0 / math.sqrt(case.d)
    means = decode_chunk_means(k, case.c)
    out, lse = moba_decode_triton(q, k, v, case.c, case.k, scale, means=means)
    sel = decode_select_chunks_triton(q, k, case.c, case.k, means=means).long()
    own = (case.lk - 1) // case.c
    k2, v2 = k.clone(), v.clone()
    for b in range(case.b):
        for h in range(case.hkv):
            group = sel[b, h * (case.hq // case.hkv) : (h + 1) * (case.hq // case.hkv)]
            keep = set(group[group >= 0].tolist()) | {own}
            for c in range((case.lk + case.c - 1) // case.c):
                if c not in keep:
                    k2[b, h, c * case.c : (c + 1) * case.c] = float("nan")
                    v2[b, h, c * case.c : (c + 1) * case.c] = float("nan")
    out2, lse2 = moba_decode_triton(q, k2, v2, case.c, case.k, scale, means=means)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_exact_ties_go_to_the_later_chunk() -> None:
    # Chunks 1 and 3 are identical and aligned with every query head: their means and scores tie exactly and beat
    # every other chunk. With K = 2 (one slot) the later one, chunk 3, must win, in the gate and in the attention.
    torch.manual_seed(3)
    c, d = 16, 64
    key = torch.randn(1, 2, 6 * c + 5, d) * 0.1
    bump = torch.randn(1, 2, c, d) + 2.0
    key[:, :, c : 2 * c] = bump
    key[:, :, 3 * c : 4 * c] = bump
    query = torch.ones(1, 4, 1, d)
    for dtype in (torch.float16, torch.bfloat16):
        q, k = query.to(dtype), key.to(dtype)
        v = torch.randn(1, 2, k.shape[2], d).to(dtype)
        for means in (None, decode_chunk_means(k, c), reference.chunk_means(k, c)):
            sel = decode_select_chunks_triton(q, k, c, 2, means=means)
            assert sel.flatten().tolist() == [3] * 4
            sel3 = decode_select_chunks_triton(q, k, c, 3, means=means)  # both tied chunks, later one first
            assert sel3.flatten().tolist() == [3, 1] * 4
        ref = reference.select_chunks(q, k, chunk_size=c, topk=2)[:, :, 0]
        assert ref.flatten().tolist() == [3] * 4
        check_decode(q, k, v, c, 2)
        check_decode(q, k, v, c, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_equals_last_row_of_prefill(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    b, hq, hkv, lk, d, c, k = 2, 4, 2, 90, 64, 16, 3
    q = torch.randn(b, hq, lk, d, generator=g).to(dtype)
    key = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    val = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    scale = 1.0 / math.sqrt(d)
    full_out, full_lse = reference.moba_attention_forward(q, key, val, chunk_size=c, topk=k)
    last_out, last_lse = full_out[:, :, -1:], full_lse[:, :, -1:]
    q_last = q[:, :, -1:]
    prefill_sel = reference.select_chunks(q, key, chunk_size=c, topk=k)[:, :, -1]
    sel = decode_select_chunks_triton(q_last, key, c, k)
    assert torch.equal(sel.long().sort(-1).values, prefill_sel.sort(-1).values), "decode gate != prefill's last row"
    out, lse, _ = check_decode(q_last, key, val, c, k)  # |out - oracle| <= tol (the budget of the module docstring)
    # Triangle inequality: |out - prefill row| <= tol + |prefill row - oracle|, both measured against one oracle.
    out64 = oracle(q_last, key, val, prefill_sel, c, scale, None)
    prefill_err = (last_out.double() - out64).abs().max().item()
    tol = 2 * prefill_err + torch.finfo(dtype).eps * out64.abs().max().item()
    assert (out.double() - last_out.double()).abs().max().item() <= tol + prefill_err
    # lse: fp32 log-sum-exps of the same scores in another order: a few fp32 ulps of |lse| (~4 here).
    torch.testing.assert_close(lse, last_lse, rtol=0, atol=16 * torch.finfo(torch.float32).eps * 8)


def test_sparse_path_differs_from_dense() -> None:
    # A small K on a long random cache must differ from dense attention: the sparse path really ran.
    case = decode_case(1, 300, 4, 2, 16, 2, torch.float16)
    q, k, v, _ = make_inputs(case)
    out, _ = moba_decode_triton(q, k, v, case.c, case.k, 1.0 / math.sqrt(case.d))
    dense = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    assert (out.float() - dense).abs().max().item() > 1e-2


def test_empty_batch() -> None:
    q, k = torch.randn(0, 4, 1, 64).half(), torch.randn(0, 2, 40, 64).half()
    out, lse = moba_decode_triton(q, k, k, 16, 3, 0.125)
    assert out.shape == (0, 4, 1, 64) and lse.shape == (0, 4, 1)


@settings(deadline=None, derandomize=True, database=None, max_examples=8)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3, 4]),
    chunk=st.sampled_from([16, 32, 48]),
    chunks=st.integers(0, 7),
    extra=st.integers(1, 48),
    topk=st.integers(1, 6),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(b=1, hkv=1, group=1, chunk=16, chunks=0, extra=1, topk=1, dtype=torch.float16, masked=False, seed=0)
@example(b=2, hkv=2, group=3, chunk=48, chunks=5, extra=48, topk=6, dtype=torch.bfloat16, masked=True, seed=1)
def test_hypothesis_shapes(b, hkv, group, chunk, chunks, extra, topk, dtype, masked, seed) -> None:
    lk = chunks * chunk + min(extra, chunk)  # own chunk 'chunks', holding 1..C keys
    case = decode_case(b, lk, hkv * group, hkv, chunk, topk, dtype, mask="left_pad_spread" if masked else None)
    q, k, v, mask = make_inputs(case, seed=seed)
    check_decode(q, k, v, chunk, topk, mask)


# --------------------------------------------------------------------------------------------------------------------
# decode_unsupported_reason: one case per reason
# --------------------------------------------------------------------------------------------------------------------
def _qkv(
    b: int = 1, hq: int = 4, hkv: int = 2, lk: int = 40, d: int = 64, dv: int = 64, dtype=torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.zeros(b, hq, 1, d, dtype=dtype),
        torch.zeros(b, hkv, lk, d, dtype=dtype),
        torch.zeros(b, hkv, lk, dv, dtype=dtype),
    )


def _big(lk: int) -> torch.Tensor:
    return torch.zeros(1, 1, 1, 64, dtype=torch.float16).expand(1, 2, lk, 64)  # no memory behind it


_REASONS = {
    "ok": (lambda: (*_qkv(), 16, 3, None, None), None),
    "not-4d": (lambda: (torch.zeros(4, 1, 64), *_qkv()[1:], 16, 3, None, None), "query must be a 4-D tensor"),
    "mixed-dtypes": (lambda: (_qkv()[0].bfloat16(), *_qkv()[1:], 16, 3, None, None), "mixed dtypes"),
    "float64": (lambda: (*_qkv(dtype=torch.float64), 16, 3, None, None), "dtype float64 routed to the reference"),
    "devices": (lambda: (_qkv()[0].to("meta"), *_qkv()[1:], 16, 3, None, None), "on different devices"),
    "meta": (lambda: (*(t.to("meta") for t in _qkv()), 16, 3, None, None), "device type 'meta'"),
    "lq": (lambda: (torch.zeros(1, 4, 2, 64).half(), *_qkv()[1:], 16, 3, None, None), "decode needs Lq == 1, got Lq=2"),
    "shapes": (lambda: (*_qkv()[:2], torch.zeros(1, 2, 41, 64).half(), 16, 3, None, None), "shapes do not match"),
    "empty": (lambda: (*_qkv(lk=0), 16, 3, None, None), "empty key cache"),
    "heads": (lambda: (*_qkv(hq=3), 16, 3, None, None), "query heads (3) are not a multiple of key heads (2)"),
    "head-dim": (lambda: (*_qkv(d=96, dv=96), 16, 3, None, None), "head dim 96 not in (64, 128)"),
    "value-dim": (lambda: (*_qkv(dv=32), 16, 3, None, None), "value head dim 32 not in (64, 128)"),
    "chunk-type": (lambda: (*_qkv(), 16.0, 3, None, None), "chunk_size 16.0 is not an int >= 1"),
    "chunk-16": (lambda: (*_qkv(), 24, 3, None, None), "chunk_size 24 is not a multiple of 16"),
    # Limits apply to the clamped parameters: a chunk size or topk that Lk keys cannot use is clamped first.
    "chunk-range": (lambda: (_qkv()[0], _big(9000), _big(9000), 8208, 3, None, None), "chunk_size 8208 not in"),
    "chunk-clamped": (lambda: (*_qkv(), 8208, 3, None, None), None),
    "topk-type": (lambda: (*_qkv(), 16, 0, None, None), "topk 0 is not an int >= 1"),
    "topk-max": (lambda: (_qkv()[0], _big(65 * 16), _big(65 * 16), 16, 65, None, None), "topk 65 > 64"),
    "topk-clamped": (lambda: (*_qkv(), 16, 65, None, None), None),
    "lk-int32": (lambda: (_qkv()[0], _big(2**31), _big(2**31), 16, 3, None, None), "overflows the kernels' int32"),
    "mask-dtype": (lambda: (*_qkv(), 16, 3, torch.ones(1, 1, 1, 40), None), "attn_mask is not a boolean tensor"),
    "mask-device": (
        lambda: (*_qkv(), 16, 3, torch.ones(1, 1, 1, 40, dtype=torch.bool, device="meta"), None),
        "attn_mask is on meta",
    ),
    "mask-shape": (lambda: (*_qkv(), 16, 3, torch.ones(1, 1, 2, 40, dtype=torch.bool), None), "does not broadcast"),
    "mask-int32": (
        lambda: (
            _qkv()[0],
            _big(2**29),
            _big(2**29),
            16,
            3,
            torch.ones(1, 1, 1, 1, dtype=torch.bool).expand(1, 4, 1, 2**29),
            None,
        ),
        "per-head attn_mask",
    ),
    "means-4d": (lambda: (*_qkv(), 16, 3, None, torch.zeros(2, 2, 64)), "means must be a 4-D tensor"),
    "means-dtype": (lambda: (*_qkv(), 16, 3, None, torch.zeros(1, 2, 2, 64).half()), "means must be float32"),
    "means-device": (lambda: (*_qkv(), 16, 3, None, torch.zeros(1, 2, 2, 64, device="meta")), "means is on meta"),
    "means-shape": (lambda: (*_qkv(), 16, 3, None, torch.zeros(1, 1, 2, 64)), "does not match [B=1, Hkv=2"),
    "means-short": (lambda: (*_qkv(), 16, 3, None, torch.zeros(1, 2, 1, 64)), "means has 1 chunks, need >= 2"),
}


@pytest.mark.parametrize("name", list(_REASONS))
def test_unsupported_reasons(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make, expected = _REASONS[name]
    args = make()
    monkeypatch.setattr(ksupport, "interpreting", lambda: True)  # as under the CPU run, also with MOBA_TEST_DEVICE=cuda
    reason = cpu_decode_unsupported_reason(*args)
    monkeypatch.undo()
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason, reason
    if expected is not None and name not in (
        "lk-int32",
        "mask-int32",
        "meta",
        "devices",
        "mask-device",
        "means-device",
    ):
        with pytest.raises(ValueError, match="MoBA decode cannot run"):
            q, k, v, c, topk, mask, means = args
            moba_decode_triton(q, k, v, c, topk, 0.125, attn_mask=mask, means=means)


def test_unsupported_without_triton_or_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _qkv()
    # The shared checks live in kernels/support.py.
    monkeypatch.setattr(ksupport, "interpreting", lambda: False)
    assert cpu_decode_unsupported_reason(q, k, v, 16, 3, None) == "CPU tensors need TRITON_INTERPRET=1"
    monkeypatch.setattr(ksupport, "triton_available", lambda: False)
    assert cpu_decode_unsupported_reason(q, k, v, 16, 3, None) == "triton is not installed"


def test_every_kernel_leaves_lengths_unspecialised() -> None:
    """Each kernel entry point takes its length arguments as runtime ints (no recompile per decode step).

    Triton specialises int arguments on ``== 1`` and ``% 16``; a decode step's ``Lk`` or the own chunk's fill crossing
    those classes compiled a new binary (about a second on an H100). ``tests/gpu`` counts the binaries; this checks
    the declaration, which is what the interpreter can see.
    """
    import importlib
    import inspect

    from moba_compile.kernels.jit import LENGTH_ARGS

    checked = 0
    for module_name in ("forward", "gating", "decode", "backward"):
        module = importlib.import_module(f"moba_compile.kernels.{module_name}")
        for name in dir(module):
            if not name.endswith("_kernel"):
                continue
            kernel = getattr(module, name)
            unspecialised = getattr(kernel, "do_not_specialize", None)
            if unspecialised is None:  # the interpreter's wrapper keeps triton.jit's keyword arguments
                unspecialised = kernel.kwargs.get("do_not_specialize") or ()
            params = inspect.signature(kernel.fn).parameters
            missing = [p for p in params if p in LENGTH_ARGS and p not in unspecialised]
            assert not missing, f"{module_name}.{name} specialises on length arguments {missing}"
            checked += "Lk" in params or "Lq" in params or "own_len" in params or "N" in params
    assert checked >= 10


def test_kv_cache_means_kept_chunk_by_chunk_equal_the_kernels_means_bitwise():
    """A KV cache's means (moba_compile.hf's tracking, one chunk as each completes) on the Triton path are bitwise the
    means the gate kernel computes over the whole keys: a decode step ranks chunks with its prefill's numbers."""
    from moba_compile.hf.cache import _MeanTrack  # the tracking itself needs no transformers

    torch.manual_seed(3)
    keys = torch.randn(1, 2, 83, 16).to(TEST_DEVICE)  # chunks of 16 keys, the kernels' multiple
    track = _MeanTrack(16, "triton")
    track.extend(keys[:, :, :20])  # a prefill of 20 keys: one complete chunk
    for t in range(21, 84):  # then one key per decode step, the cache growing as transformers' DynamicLayer does
        track.extend(keys[:, :, :t])
    assert track.complete.shape == (1, 2, 5, 16) and track.length == 83
    assert torch.equal(track.complete, ops.chunk_means(keys, 16, impl="triton"))
