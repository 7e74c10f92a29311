"""Packed sequences (issue 17): document-aware MoBA in the reference, the ops and the interpreted Triton kernels.

Every document of a packed row is MoBA on its own (docs/semantics.md, "Packed sequences"). Checked three ways:

- against a brute-force float64 oracle written here from the spec (one explicit mask over the whole packed row, chunk
  ids relative to each document's first token), which shares no code with the reference's per-document slicing;
- packed == unpacked: the same documents run one by one as separate sequences give the same outputs and gradients,
  for the reference, the op (reference and interpreted Triton) and the block-diagonal mask path;
- bad input raises a clear error naming the problem.

Runs under the Triton interpreter (``TRITON_INTERPRET=1``) on CPU; shapes are small.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (a missing triton must fail the tests, not skip them)
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moba_compile import moba_attention, ops, reference  # noqa: E402
from moba_compile.kernels import launch as kernel_launch  # noqa: E402

F64 = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every buffer a launcher allocates starts as NaN: a position no kernel wrote fails the comparison.
    monkeypatch.setattr(kernel_launch, "POISON_BUFFERS", True)


def cu_of(lengths: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


def packed_inputs(lengths, hq=2, hkv=1, d=16, dtype=torch.float64, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(batch, hq, total, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(batch, hkv, total, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(batch, hkv, total, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def oracle_mask(query, key, lengths, chunk_size, topk) -> torch.Tensor:
    """Brute-force ``[B, Hq, T, T]`` attended set of packed MoBA, read from the spec one row at a time."""
    b, hq, total, _ = query.shape
    group = hq // key.shape[1]
    allowed = torch.zeros(b, hq, total, total, dtype=torch.bool)
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for bi in range(b):
        for h in range(hq):
            kh = key[bi, h // group].double()
            for d in range(len(lengths)):
                s, e = starts[d], starts[d + 1]
                n = math.ceil((e - s) / chunk_size)
                first = [s + c * chunk_size for c in range(n)]  # chunk c of the document: [first[c], first[c] + C)
                means = [kh[f : min(e, f + chunk_size)].mean(0) for f in first]
                for i in range(s, e):
                    own = (i - s) // chunk_size
                    q = query[bi, h, i].double()
                    scored = sorted(((float(q @ means[c]), c) for c in range(own)), reverse=True)
                    for _, c in scored[: topk - 1]:
                        allowed[bi, h, i, first[c] : min(e, first[c] + chunk_size)] = True
                    allowed[bi, h, i, first[own] : i + 1] = True
    return allowed


def oracle(query, key, value, lengths, chunk_size, topk) -> torch.Tensor:
    allowed = oracle_mask(query, key, lengths, chunk_size, topk)
    group = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(group, dim=1)
    v = value.double().repeat_interleave(group, dim=1)
    s = (query.double() @ k.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    return torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1) @ v


def unpacked(fn, q, k, v, lengths):
    """``fn`` on every document as its own sequence, concatenated."""
    cu = cu_of(lengths).tolist()
    return torch.cat([fn(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]) for s, e in zip(cu[:-1], cu[1:])], dim=2)


def grads(fn, q, k, v, seed=1):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    out.backward(g)
    return out.detach(), q.grad, k.grad, v.grad


def block_diagonal_mask(lengths) -> torch.Tensor:
    """The ``[1, 1, T, T]`` block-diagonal causal mask transformers builds for packed documents."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(len(doc))
    return ((doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None]))[None, None]


lengths_st = st.lists(st.integers(1, 23), min_size=1, max_size=5)


# --------------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=lengths_st, chunk=st.integers(1, 6), topk=st.integers(1, 4), seed=st.integers(0, 2**16))
@example(lengths=[1, 1, 1], chunk=2, topk=2, seed=0)  # 1-token documents
@example(lengths=[3, 2, 12], chunk=4, topk=2, seed=1)  # documents shorter than a chunk; one starting mid-chunk
@example(lengths=[5, 17], chunk=4, topk=3, seed=2)  # the second document starts at 5, mid-chunk of the packed row
def test_reference_equals_the_brute_force_oracle(lengths, chunk, topk, seed):
    q, k, v = packed_inputs(lengths, hq=2, hkv=1, d=4, seed=seed)
    out = reference.moba_attention_packed(q, k, v, cu_of(lengths), chunk_size=chunk, topk=topk)
    torch.testing.assert_close(out, oracle(q, k, v, lengths, chunk, topk), **F64)


def test_reference_is_not_moba_over_the_packed_row():
    # The documents matter: MoBA over the whole packed row (chunks from position 0, gate across documents) differs.
    lengths = [5, 17]
    q, k, v = packed_inputs(lengths, d=8, seed=3)
    packed = reference.moba_attention_packed(q, k, v, cu_of(lengths), chunk_size=4, topk=2)
    row = reference.moba_attention(q, k, v, chunk_size=4, topk=2)
    assert (packed - row)[:, :, 5:].abs().max() > 1e-2
    torch.testing.assert_close(packed[:, :, :5], row[:, :, :5], **F64)  # the first document is a prefix of the row


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=lengths_st, chunk=st.integers(1, 6), topk=st.integers(1, 4), seed=st.integers(0, 2**16))
@example(lengths=[1, 7, 1, 9], chunk=3, topk=2, seed=0)
def test_reference_gradients_equal_unpacked(lengths, chunk, topk, seed):
    q, k, v = packed_inputs(lengths, hq=4, hkv=2, d=4, seed=seed)
    cu = cu_of(lengths, torch.int64)
    packed = grads(lambda q, k, v: reference.moba_attention_packed(q, k, v, cu, chunk_size=chunk, topk=topk), q, k, v)
    one_by_one = grads(
        lambda q, k, v: unpacked(
            lambda a, b, c: reference.moba_attention(a, b, c, chunk_size=chunk, topk=topk), q, k, v, lengths
        ),
        q,
        k,
        v,
    )
    for x, y in zip(packed, one_by_one):
        torch.testing.assert_close(x, y, **F64)
    # The hand-written backward gives the autograd gradients.
    out, lse = reference.moba_attention_packed_forward(q, k, v, cu, chunk_size=chunk, topk=topk)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hand = reference.moba_attention_packed_backward(g, q, k, v, out, lse, cu, chunk_size=chunk, topk=topk)
    for x, y in zip(hand, packed[1:]):
        torch.testing.assert_close(x, y, **F64)


# --------------------------------------------------------------------------------------------------------------------
# The op: reference and interpreted Triton
# --------------------------------------------------------------------------------------------------------------------
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=lengths_st, chunk=st.integers(1, 6), topk=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_op_reference_equals_unpacked_outputs_and_gradients(lengths, chunk, topk, seed):
    q, k, v = packed_inputs(lengths, hq=2, hkv=2, d=4, seed=seed)
    cu = cu_of(lengths)

    def packed(q, k, v):
        return moba_attention(q, k, v, chunk_size=chunk, topk=topk, cu_seqlens=cu, impl="reference")

    def one(q, k, v):
        return moba_attention(q, k, v, chunk_size=chunk, topk=topk, impl="reference")

    for x, y in zip(grads(packed, q, k, v), grads(lambda q, k, v: unpacked(one, q, k, v, lengths), q, k, v)):
        torch.testing.assert_close(x, y, **F64)


TRITON_CASES = [
    # (lengths, chunk, topk, hq, hkv, dtype)
    ([1, 40, 1, 9, 33], 16, 2, 2, 1, torch.float32),  # 1-token documents, one shorter than a chunk, mid-chunk starts
    ([70, 5, 50], 16, 3, 4, 2, torch.bfloat16),  # GQA, bf16, three documents, partial last chunks
    ([48], 16, 2, 2, 2, torch.float16),  # one document: plain MoBA
]


def assert_packed_equals_unpacked(got, want) -> None:
    """Packed against the documents run one by one: equal up to the order of fp32 sums.

    A document alone runs the same kernels on the same numbers as its own sequence; one right-padded into a shared
    launch attends exactly the same keys (padding adds exact zeros), but its key blocks' dK/dV sums may group the rows
    differently, which moved single entries by 1 ulp (hypothesis found lengths [45, 43], top-3, fp32). So the budget
    is a few roundings of the largest value: a wrongly chosen or crossed chunk moves results by orders of magnitude
    more.
    """
    for x, y in zip(got, want, strict=True):
        atol = 4 * torch.finfo(y.dtype).eps * float(y.abs().max())
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize("lengths,chunk,topk,hq,hkv,dtype", TRITON_CASES)
def test_triton_packed_equals_unpacked_and_the_oracle(lengths, chunk, topk, hq, hkv, dtype):
    q, k, v = packed_inputs(lengths, hq=hq, hkv=hkv, d=16, dtype=dtype, seed=7)
    cu = cu_of(lengths)
    before = ops.CALLS["packed_attention:triton"], ops.CALLS["packed_attention_backward:triton"]
    shared_before = ops.CALLS["packed_attention:triton-shared-launch"]

    def packed(q, k, v):
        return moba_attention(q, k, v, chunk_size=chunk, topk=topk, cu_seqlens=cu, impl="triton")

    def one(q, k, v):
        return moba_attention(q, k, v, chunk_size=chunk, topk=topk, impl="triton")

    got = grads(packed, q, k, v)
    want = grads(lambda q, k, v: unpacked(one, q, k, v, lengths), q, k, v)
    assert_packed_equals_unpacked(got, want)
    assert ops.CALLS["packed_attention:triton"] - before[0] == len(lengths)
    assert ops.CALLS["packed_attention_backward:triton"] - before[1] == len(lengths)
    # Short documents of one padded length and parameters share a launch (the first case: {1, 1, 9} padded to 16
    # tokens, {40, 33} to 64); documents alone in their group run on their slice.
    shared = ops.CALLS["packed_attention:triton-shared-launch"] - shared_before
    assert shared == {5: 2, 3: 0, 1: 0}[len(lengths)]
    # And the packed result is packed MoBA: within the low-precision budget of the float64 oracle.
    exact = oracle(q, k, v, lengths, chunk, topk)
    budget = 4 * torch.finfo(dtype).eps * float(exact.abs().max()) + 1e-6
    assert float((got[0].double() - exact).abs().max()) <= budget


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=6), topk=st.integers(1, 3), seed=st.integers(0, 99))
@example(lengths=[45, 43], topk=3, seed=2)  # a shared padded launch whose dK/dV sums differ by 1 ulp from alone
def test_triton_hypothesis_packed_equals_unpacked(lengths, topk, seed):
    q, k, v = packed_inputs(lengths, hq=2, hkv=1, d=16, dtype=torch.float32, seed=seed)
    cu = cu_of(lengths)

    def packed(q, k, v):
        return moba_attention(q, k, v, chunk_size=16, topk=topk, cu_seqlens=cu, impl="triton")

    def one(q, k, v):
        return moba_attention(q, k, v, chunk_size=16, topk=topk, impl="triton")

    assert_packed_equals_unpacked(
        grads(packed, q, k, v), grads(lambda q, k, v: unpacked(one, q, k, v, lengths), q, k, v)
    )


def test_triton_gradients_equal_the_reference():
    lengths = [20, 1, 27]
    q, k, v = packed_inputs(lengths, hq=2, hkv=1, d=16, dtype=torch.float32, seed=11)
    cu = cu_of(lengths)
    got = grads(lambda q, k, v: moba_attention(q, k, v, chunk_size=16, topk=2, cu_seqlens=cu, impl="triton"), q, k, v)
    q64, k64, v64 = (x.double() for x in (q, k, v))
    want = grads(lambda q, k, v: reference.moba_attention_packed(q, k, v, cu, chunk_size=16, topk=2), q64, k64, v64)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# The block-diagonal mask (what transformers builds for packed documents): recognised and run per document
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_block_diagonal_mask_runs_document_aware_moba(impl):
    lengths = [3, 18, 1, 10] if impl == "reference" else [3, 40, 1, 20]
    chunk = 4 if impl == "reference" else 16
    dtype = torch.float64 if impl == "reference" else torch.float32
    q, k, v = packed_inputs(lengths, hq=2, hkv=1, d=16, dtype=dtype, seed=5)
    mask = block_diagonal_mask(lengths)
    kind = torch.ops.moba.analyse_mask(mask, q, k, "")
    assert int(kind) == ops.MASK_DOCUMENTS
    assert ops.documents_from_mask(mask, q.shape[2]).tolist() == cu_of(lengths).tolist()
    before = ops.CALLS[f"attention:packed:{impl}"], ops.CALLS[f"attention_backward:packed:{impl}"]

    def masked(q, k, v):
        return ops.attention(q, k, v, chunk_size=chunk, topk=2, attn_mask=mask, mask_kind=kind, impl=impl)

    def packed(q, k, v):
        return moba_attention(q, k, v, chunk_size=chunk, topk=2, cu_seqlens=cu_of(lengths), impl=impl)

    for x, y in zip(grads(masked, q, k, v), grads(packed, q, k, v)):
        assert torch.equal(x, y)
    assert ops.CALLS[f"attention:packed:{impl}"] - before[0] == len(lengths)
    assert ops.CALLS[f"attention_backward:packed:{impl}"] - before[1] == len(lengths)
    # Forward mode through the mask path equals forward mode through cu_seqlens.
    t = torch.ones_like(q)
    _, jm = torch.func.jvp(lambda q: masked(q, k, v), (q,), (t,))
    _, jp = torch.func.jvp(lambda q: packed(q, k, v), (q,), (t,))
    torch.testing.assert_close(jm, jp, rtol=0, atol=0)


def test_masks_that_are_not_exactly_documents_stay_per_row():
    lengths = [4, 6]
    mask = block_diagonal_mask(lengths)
    q = torch.zeros(1, 1, 10, 16)
    padded = mask.clone()
    padded[..., 7] = False  # a padded token inside the second document
    assert ops.analyse_mask(padded, 10, 10) == ops.MASK_PER_ROW
    two_rows = torch.cat([mask, block_diagonal_mask([5, 5])])  # batch rows with different documents
    assert ops.analyse_mask(two_rows, 10, 10) == ops.MASK_PER_ROW
    window = torch.ones(10, 10, dtype=torch.bool).tril() & ~torch.ones(10, 10, dtype=torch.bool).tril(-3)
    assert ops.analyse_mask(window, 10, 10) == ops.MASK_PER_ROW  # a sliding window is not documents
    assert ops.analyse_mask(mask[..., 2:, :], 8, 10) == ops.MASK_PER_ROW  # Lq != Lk: a cache step, per sequence
    assert ops.analyse_mask(mask.expand(2, 3, 10, 10), 10, 10) == ops.MASK_DOCUMENTS  # same documents everywhere
    del q


def test_documents_check_in_row_blocks(monkeypatch: pytest.MonkeyPatch):
    # Blocks of 3 rows (the check never builds an [L, L] temporary): the verdict does not depend on the blocking.
    from moba_compile import masks

    monkeypatch.setattr(masks, "_ROWS_ELEMENTS", 60)
    mask = block_diagonal_mask([4, 6, 1, 9])
    assert ops.analyse_mask(mask, 20, 20) == ops.MASK_DOCUMENTS
    assert ops.analyse_mask(mask.expand(2, 3, 20, 20), 20, 20) == ops.MASK_DOCUMENTS
    for row, key in ((17, 12), (19, 19), (3, 0), (10, 10)):  # a hole in a late block, the diagonal, the first block
        hole = mask.clone()
        hole[..., row, key] = False
        assert ops.analyse_mask(hole, 20, 20) == ops.MASK_PER_ROW, (row, key)


def test_observations_keep_the_dense_kind_over_documents():
    tag = "test_packed:severity"
    mask = block_diagonal_mask([4, 6])
    q = torch.zeros(1, 1, 10, 16)
    try:
        torch.ops.moba.analyse_mask(mask, q, q, tag)
        assert ops.MASK_OBSERVATIONS[tag] == ops.MASK_DOCUMENTS
        window = torch.ones(10, 10, dtype=torch.bool).tril() & ~torch.ones(10, 10, dtype=torch.bool).tril(-3)
        torch.ops.moba.analyse_mask(window, q, q, tag)
        torch.ops.moba.analyse_mask(mask, q, q, tag)
        assert ops.MASK_OBSERVATIONS[tag] == ops.MASK_PER_ROW
    finally:
        ops.MASK_OBSERVATIONS.pop(tag, None)


# --------------------------------------------------------------------------------------------------------------------
# Transforms and compile
# --------------------------------------------------------------------------------------------------------------------
def test_vmap_jvp_grad_and_compile():
    lengths = [6, 1, 13]
    q, k, v = packed_inputs(lengths, hq=2, hkv=1, d=8, seed=9)
    cu = cu_of(lengths)

    def f(q):
        return moba_attention(q, k, v, chunk_size=4, topk=2, cu_seqlens=cu)

    qs = torch.randn(3, *q.shape, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(f)(qs), torch.stack([f(x) for x in qs]), **F64)
    # A vmapped cu_seqlens: different documents per entry.
    cus = torch.stack([cu, cu_of([10, 5, 5]), cu_of([1, 18, 1])])
    got = torch.func.vmap(lambda c: moba_attention(q, k, v, chunk_size=4, topk=2, cu_seqlens=c))(cus)
    for i, c in enumerate(cus):
        torch.testing.assert_close(got[i], moba_attention(q, k, v, chunk_size=4, topk=2, cu_seqlens=c), **F64)
    t = torch.randn_like(q)
    _, jvp = torch.func.jvp(f, (q,), (t,))
    _, vjp_fn = torch.func.vjp(f, q)
    jac = torch.func.jacrev(lambda x: f(x)[0, 0, 7, 0])(q)
    torch.testing.assert_close((jac * t).sum(), jvp[0, 0, 7, 0], **F64)
    assert vjp_fn(torch.ones_like(q))[0].shape == q.shape
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q), f(q), **F64)
    with pytest.raises(NotImplementedError, match="first-order"):
        torch.func.grad(lambda x: torch.func.grad(lambda y: f(y).sum())(x).sum())(q)


def test_batch_rows_share_the_documents():
    lengths = [5, 9]
    q, k, v = packed_inputs(lengths, hq=2, hkv=1, d=8, seed=4, batch=3)
    out = moba_attention(q, k, v, chunk_size=4, topk=2, cu_seqlens=cu_of(lengths))
    for b in range(3):
        one = moba_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], chunk_size=4, topk=2, cu_seqlens=cu_of(lengths))
        torch.testing.assert_close(out[b : b + 1], one, **F64)


def test_min_seq_len_applies_per_document():
    lengths = [9, 30]
    q, k, v = packed_inputs(lengths, d=8, seed=2)
    cu = cu_of(lengths)
    out = ops.packed_attention(q, k, v, cu, chunk_size=4, topk=2, min_seq_len=10)
    dense_first = moba_attention(q[:, :, :9], k[:, :, :9], v[:, :, :9], chunk_size=4, topk=3)  # every chunk
    moba_second = moba_attention(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], chunk_size=4, topk=2)
    torch.testing.assert_close(out, torch.cat([dense_first, moba_second], dim=2), **F64)


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------
BAD = [
    (torch.tensor([0, 5, 5, 12]), ValueError, "strictly increasing"),
    (torch.tensor([0, 7, 5, 12]), ValueError, "strictly increasing"),
    (torch.tensor([1, 5, 12]), ValueError, "must start at 0"),
    (torch.tensor([0, 5, 11]), ValueError, "must end at the packed sequence length 12"),
    (torch.tensor([0, 5, 13]), ValueError, "disagree with the tensor shapes"),
    (torch.tensor([0.0, 5.0, 12.0]), ValueError, "int32 or int64"),
    (torch.tensor([[0, 5, 12]]), ValueError, r"1-D \[n_docs \+ 1\]"),
    (torch.tensor([12]), ValueError, r"1-D \[n_docs \+ 1\]"),
    (torch.tensor([0, 5, 12], device="meta"), ValueError, "cu_seqlens is on meta"),
    ([0, 5, 12], TypeError, "must be an int32/int64 tensor"),
]


@pytest.mark.parametrize("cu,error,match", BAD)
def test_bad_boundaries_are_refused(cu, error, match):
    q = torch.randn(1, 2, 12, 8)
    with pytest.raises(error, match=match):
        moba_attention(q, q, q, chunk_size=4, topk=2, cu_seqlens=cu)
    if isinstance(cu, torch.Tensor) and cu.device.type == "cpu" and cu.dtype in (torch.int32, torch.int64):
        if cu.dim() == 1 and cu.numel() >= 2:  # the op called directly checks the values too
            with pytest.raises(error, match=match):
                torch.ops.moba.packed_attention(q, q, q, cu, 4, 2, 0.5, 0, "reference")
        with pytest.raises(error, match=match):
            reference.moba_attention_packed(q, q, q, cu, chunk_size=4, topk=2)


def test_padding_mask_with_packing_and_cache_steps_are_refused():
    q = torch.randn(1, 2, 12, 8)
    cu = torch.tensor([0, 5, 12])
    with pytest.raises(ValueError, match="attn_mask cannot be combined with cu_seqlens"):
        moba_attention(q, q, q, chunk_size=4, topk=2, cu_seqlens=cu, attn_mask=torch.ones(12, 12, dtype=torch.bool))
    kv = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="Lq == Lk"):
        moba_attention(q, kv, kv, chunk_size=4, topk=2, cu_seqlens=cu)
    with pytest.raises(ValueError, match="Lq == Lk"):
        reference.moba_attention_packed(q[:, :, :1], q, q, cu, chunk_size=4, topk=2)
    with pytest.raises(RuntimeError, match="impl='triton' cannot run"):
        moba_attention(q, q, q, chunk_size=6, topk=2, cu_seqlens=cu, impl="triton")  # chunk 6: not a kernel size
