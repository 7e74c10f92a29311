"""The ``moba::`` torch.library ops and the public ``moba_compile.moba_attention`` (spec section 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import F64, Case, bottom_right_causal, make_mask, masked_attention, own_chunk_causal, rand_qkv
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing import assert_close

import moba_compile
from moba_compile import masks, ops, reference
from moba_compile.ops import MASK_APPLY, MASK_CAUSAL, MASK_NOT_CAUSAL, MASK_PER_ROW

ATTENTION = torch.ops.moba.attention.default
ANALYSE = torch.ops.moba.analyse_mask.default
BACKWARD = torch.ops.moba.attention_backward.default


def kind_tensor(kind: int) -> torch.Tensor:
    return torch.tensor(kind, dtype=torch.int64)  # what moba::analyse_mask returns: an int64 scalar on the CPU


def sliding_window(lq: int, lk: int, window: int) -> torch.Tensor:
    """Bottom-right causal mask that also hides keys more than ``window - 1`` positions back (a per-row mask)."""
    rows = torch.arange(lq)[:, None] + (lk - lq)
    return bottom_right_causal(lq, lk) & (torch.arange(lk)[None, :] > rows - window)


def qkv(
    *,
    b=2,
    hq=4,
    hkv=2,
    lq=12,
    lk=12,
    d=8,
    dv=6,
    dtype=torch.float64,
    contiguous=True,
    requires_grad=True,
    seed=0,
):
    """Seeded inputs; ``contiguous=False`` builds ``[B, L, H, D]`` tensors and transposes them to the SDPA layout."""
    q, k, v = rand_qkv(seed, b, hq, hkv, lq, lk, d, dv, dtype=dtype)
    if not contiguous:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        assert not (k.is_contiguous() or v.is_contiguous()) and (lq == 1 or not q.is_contiguous())
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


# --------------------------------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("hkv", [4, 2], ids=["MHA", "GQA"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "noncontig"])
def test_opcheck_attention(contiguous: bool, hkv: int, masked: bool, dtype: torch.dtype) -> None:
    q, k, v = qkv(hkv=hkv, dtype=dtype, contiguous=contiguous)
    mask = make_mask("causal_pad", 2, 4, 12, 12) if masked else None
    torch.library.opcheck(ATTENTION, (q, k, v, mask, None, 4, 2, 0.3, 0, "reference"))


@pytest.mark.parametrize(
    "variant",
    ["kind-causal", "kind-apply", "chunked-prefill", "decode", "min_seq_len-dense", "auto"],
)
def test_opcheck_attention_variants(variant: str) -> None:
    lq = {"chunked-prefill": 5, "decode": 1}.get(variant, 12)
    q, k, v = qkv(lq=lq, contiguous=False)
    mask, kind, min_seq_len, impl = None, None, 0, "reference"
    if variant.startswith("kind-"):
        mask = make_mask("causal_pad", 2, 4, lq, 12)
        kind = kind_tensor(MASK_CAUSAL if variant == "kind-causal" else MASK_APPLY)
    if variant == "decode":
        mask = make_mask("left_pad", 2, 4, 1, 12)
    if variant == "min_seq_len-dense":
        min_seq_len = 100
    if variant == "auto":
        impl = "auto"
    torch.library.opcheck(ATTENTION, (q, k, v, mask, kind, 4, 2, 0.5, min_seq_len, impl))


@pytest.mark.parametrize("kind", [MASK_NOT_CAUSAL, MASK_PER_ROW], ids=["not-causal", "per-row"])
@pytest.mark.parametrize("hkv", [4, 2], ids=["MHA", "GQA"])
def test_opcheck_attention_dense_kinds(hkv: int, kind: int) -> None:
    q, k, v = qkv(hkv=hkv, contiguous=False)
    mask = make_mask("random", 2, 4, 12, 12) if kind == MASK_NOT_CAUSAL else sliding_window(12, 12, 3)
    torch.library.opcheck(ATTENTION, (q, k, v, mask, kind_tensor(kind), 4, 2, 0.5, 0, "reference"))


@pytest.mark.parametrize(
    "mask_shape", [(12, 12), (2, 1, 12, 12), (2, 4, 12, 12), (1, 1, 1, 12)], ids=lambda s: "x".join(map(str, s))
)
def test_opcheck_analyse_mask(mask_shape: tuple[int, ...]) -> None:
    q, k, _ = qkv(requires_grad=False)
    mask = torch.ones(mask_shape, dtype=torch.bool)
    if mask_shape[-2] == 12:
        mask = mask & bottom_right_causal(12, 12)
    torch.library.opcheck(ANALYSE, (mask, q, k, ""))


# --------------------------------------------------------------------------------------------------------------------
# The public API against the reference
# --------------------------------------------------------------------------------------------------------------------

API_CASES = [
    Case(2, 21, 21, 4, 2, 4, 2),
    Case(2, 21, 21, 4, 4, 5, 3, scale=0.4, d=8, dv=3),
    Case(2, 6, 21, 4, 1, 4, 3, mask="random"),
    Case(3, 1, 21, 4, 2, 4, 2, mask="left_pad"),
    Case(2, 20, 20, 2, 1, 4, 2, mask="empty_rows"),
    Case(2, 20, 20, 2, 1, 4, 1),
]


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_moba_attention_equals_reference(case: Case, impl: str) -> None:
    q, k, v, mask = case.inputs()
    calls = ops.CALLS["attention:reference"]
    out = moba_compile.moba_attention(q, k, v, attn_mask=mask, impl=impl, **case.params())
    assert ops.CALLS["attention:reference"] == calls + 1  # the op really ran, on the reference ("auto" on the CPU)
    expected = reference.moba_attention(q, k, v, attn_mask=mask, **case.params())
    # The CPU op runs the reference itself: bit-for-bit.
    assert torch.equal(out, expected)
    assert out.dtype == q.dtype and out.is_contiguous()
    # The op's log-sum-exp is the reference's too.
    scale = case.scale if case.scale is not None else case.d**-0.5
    _, lse = ATTENTION(q, k, v, mask, None, case.c, case.k, scale, 0, impl)
    assert_close(lse, reference.moba_attention_forward(q, k, v, attn_mask=mask, **case.params())[1], **F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_moba_attention_keeps_dtype(dtype: torch.dtype) -> None:
    q, k, v = qkv(dtype=dtype, requires_grad=False)
    out = moba_compile.moba_attention(q, k, v, chunk_size=4, topk=2)
    assert out.dtype == dtype and out.shape == (2, 4, 12, 6)
    assert torch.equal(out, reference.moba_attention(q, k, v, chunk_size=4, topk=2))


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_backward_through_op_equals_reference_autograd(case: Case) -> None:
    q, k, v, mask = case.inputs(requires_grad=True)
    out = moba_compile.moba_attention(q, k, v, attn_mask=mask, **case.params())
    ref = reference.moba_attention(q, k, v, attn_mask=mask, **case.params())
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    got = torch.autograd.grad(out, (q, k, v), go)
    want = torch.autograd.grad(ref, (q, k, v), go)
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()
        assert_close(g, w, **F64)


def test_backward_through_op_noncontiguous_grad_out() -> None:
    q, k, v = qkv(contiguous=False)
    out = moba_compile.moba_attention(q, k, v, chunk_size=4, topk=2)
    go = torch.randn(2, 12, 4, 6, dtype=torch.float64).transpose(1, 2)  # a non-contiguous incoming gradient
    got = torch.autograd.grad(out, (q, k, v), go)
    want = torch.autograd.grad(reference.moba_attention(q, k, v, chunk_size=4, topk=2), (q, k, v), go)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, **F64)


def test_gradcheck_through_op() -> None:
    # Fixed seed: the gate's score margins (~0.1) dwarf gradcheck's 1e-6 perturbations, so no chunk flips.
    q, k, v = qkv(b=1, hq=2, hkv=1, lq=5, lk=9, d=4, dv=3, seed=3)
    mask = make_mask("random", 1, 2, 5, 9, seed=3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: moba_compile.moba_attention(q, k, v, chunk_size=3, topk=2, attn_mask=mask), (q, k, v)
    )
    assert torch.autograd.gradcheck(
        lambda q, k, v: moba_compile.moba_attention(q, k, v, chunk_size=2, topk=3, scale=0.7, impl="reference"),
        (q, k, v),
    )


def test_impl_triton_on_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv(requires_grad=False)
    with pytest.raises(RuntimeError, match=r"impl='triton' cannot run this call: \S"):
        moba_compile.moba_attention(q, k, v, chunk_size=4, topk=2, impl="triton")
    with pytest.raises(RuntimeError, match=r"impl='triton' cannot run this call: \S"):
        ATTENTION(q, k, v, None, None, 4, 2, 0.5, 0, "triton")
    # "auto" never raises on the CPU: it picks the reference.
    assert ops.resolve_impl("auto", q, k, v, 4, 2) == ("reference", "CPU tensors")


@pytest.mark.parametrize("impl", ["cuda", "Reference", "", "flash"])
def test_bad_impl_lists_choices(impl: str) -> None:
    q, k, v = qkv(requires_grad=False)
    with pytest.raises(ValueError, match=r"impl must be one of 'auto', 'triton', 'reference'; got " + repr(impl)):
        moba_compile.moba_attention(q, k, v, chunk_size=4, topk=2, impl=impl)


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        ({"chunk_size": 0}, ValueError, r"chunk_size must be >= 1"),
        ({"topk": True}, TypeError, r"topk must be an int"),
        ({"scale": float("nan")}, ValueError, r"scale must be finite"),
        ({"attn_mask": torch.zeros(12, 12)}, ValueError, r"only boolean masks"),
    ],
    ids=["chunk_size=0", "topk=True", "scale=nan", "float-mask"],
)
def test_public_api_validates(kwargs: dict, exc: type, pattern: str) -> None:
    q, k, v = qkv(requires_grad=False)
    call = {"chunk_size": 4, "topk": 2, **kwargs}
    with pytest.raises(exc, match=pattern):
        moba_compile.moba_attention(q, k, v, **call)


# --------------------------------------------------------------------------------------------------------------------
# analyse_mask
# --------------------------------------------------------------------------------------------------------------------


def test_analyse_mask_classification() -> None:
    causal = bottom_right_causal(8, 8)
    assert ops.analyse_mask(causal, 8, 8) == MASK_CAUSAL
    assert ops.analyse_mask(causal.expand(2, 3, 8, 8), 8, 8) == MASK_CAUSAL
    assert ops.analyse_mask(bottom_right_causal(3, 8), 3, 8) == MASK_CAUSAL  # chunked prefill, bottom-right
    assert ops.analyse_mask(torch.ones(1, 8, dtype=torch.bool), 1, 8) == MASK_CAUSAL  # decode, nothing masked
    # Causal AND padding: the same keys hidden from every row.
    padded = causal & make_mask("left_pad", 3, 1, 8, 8)
    assert ops.analyse_mask(padded, 8, 8) == MASK_APPLY
    assert ops.analyse_mask(make_mask("causal_pad", 3, 1, 3, 8), 3, 8) == MASK_APPLY  # chunked prefill, padded
    assert ops.analyse_mask(make_mask("left_pad", 3, 1, 1, 8), 1, 8) == MASK_APPLY  # padded decode [B, 1, 1, Lk]
    # Causal, but rows lose past keys that later rows see: dense with the mask.
    assert ops.analyse_mask(sliding_window(8, 8, 3), 8, 8) == MASK_PER_ROW
    # Two packed documents: the block-diagonal causal mask is MoBA per document (issue 17); with a padded key, dense.
    assert ops.analyse_mask(causal & own_chunk_causal(8, 8, 4), 8, 8) == ops.MASK_DOCUMENTS
    padded_docs = causal & own_chunk_causal(8, 8, 4)
    padded_docs[:, 5] = False
    assert ops.analyse_mask(padded_docs, 8, 8) == MASK_PER_ROW
    # Top-left causality (SDPA's is_causal) is not MoBA's when Lq < Lk: it hides keys a bottom-right row may see.
    assert ops.analyse_mask(torch.ones(3, 8, dtype=torch.bool).tril(), 3, 8) == MASK_PER_ROW
    # Anything seeing a later key.
    assert ops.analyse_mask(torch.ones(8, 8, dtype=torch.bool), 8, 8) == MASK_NOT_CAUSAL
    assert ops.analyse_mask(make_mask("left_pad", 3, 1, 8, 8), 8, 8) == MASK_NOT_CAUSAL  # padding-only prefill mask
    one_hole = causal.clone()
    one_hole[5, 2] = False  # one past key hidden from one middle row only
    assert ops.analyse_mask(one_hole, 8, 8) == MASK_PER_ROW
    one_leak = causal.clone()
    one_leak[2, 3] = True
    assert ops.analyse_mask(one_leak, 8, 8) == MASK_NOT_CAUSAL
    with pytest.raises(ValueError, match=r"attn_mask must be boolean"):
        ops.analyse_mask(causal.float(), 8, 8)


@pytest.mark.parametrize(
    "mask,lq,expected",
    [
        (bottom_right_causal(8, 8)[None, None], 8, MASK_CAUSAL),
        (bottom_right_causal(3, 8)[None, None].expand(2, 1, 3, 8), 3, MASK_CAUSAL),
        (torch.ones(2, 1, 1, 8, dtype=torch.bool), 1, MASK_CAUSAL),
        (make_mask("left_pad", 2, 1, 1, 8), 1, MASK_APPLY),
        (make_mask("causal_pad", 2, 1, 8, 8), 8, MASK_APPLY),
        (torch.ones(2, 1, 8, 8, dtype=torch.bool), 8, MASK_NOT_CAUSAL),
        (sliding_window(8, 8, 2)[None, None], 8, MASK_PER_ROW),
    ],
    ids=["causal", "causal-Lq<Lk", "decode-all", "decode-pad", "causal-pad", "all-true", "window"],
)
def test_analyse_mask_op(mask: torch.Tensor, lq: int, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(masks, "MASK_OBSERVATIONS", {})  # its home; ops re-exports it
    q, k, _ = qkv(lq=lq, lk=8, requires_grad=False)
    kind = ANALYSE(mask, q, k, "layers.mask")
    assert kind.dtype == torch.int64 and kind.shape == () and kind.device.type == "cpu"
    assert int(kind) == expected
    assert masks.MASK_OBSERVATIONS == {"layers.mask": expected}
    # The record keeps the highest kind seen under one tag; an empty tag records nothing.
    other, other_kind = (
        (torch.ones(lq, 8, dtype=torch.bool), MASK_NOT_CAUSAL)
        if lq > 1
        else (torch.zeros(1, 8, dtype=torch.bool), MASK_APPLY)
    )
    assert int(ANALYSE(other, q, k, "layers.mask")) == other_kind
    ANALYSE(sliding_window(lq, 8, 1), q, k, "")
    assert masks.MASK_OBSERVATIONS == {"layers.mask": max(expected, other_kind)}


# --------------------------------------------------------------------------------------------------------------------
# The op with a mask kind
# --------------------------------------------------------------------------------------------------------------------


def run_op(q, k, v, mask, kind, *, chunk_size=4, topk=2, scale=0.5, min_seq_len=0):
    out, _ = ATTENTION(
        q, k, v, mask, None if kind is None else kind_tensor(kind), chunk_size, topk, scale, min_seq_len, "reference"
    )
    return out


@pytest.mark.parametrize("lq", [12, 5, 1], ids=["prefill", "chunked", "decode"])
def test_mask_kind_causal_ignores_the_mask(lq: int) -> None:
    q, k, v = qkv(lq=lq, requires_grad=False)
    # A mask that would change the result if it were applied: MASK_CAUSAL promises it is the plain causal mask.
    mask = make_mask("random", 2, 4, lq, 12)
    got = run_op(q, k, v, mask, MASK_CAUSAL)
    assert torch.equal(got, run_op(q, k, v, None, None))
    assert not torch.allclose(got, run_op(q, k, v, mask, MASK_APPLY))


@pytest.mark.parametrize("lq", [12, 5, 1], ids=["prefill", "chunked", "decode"])
def test_mask_kind_apply_applies_the_mask(lq: int) -> None:
    q, k, v = qkv(lq=lq)
    mask = make_mask("causal_pad", 2, 4, lq, 12)
    got = run_op(q, k, v, mask, MASK_APPLY)
    ref = reference.moba_attention(q, k, v, chunk_size=4, topk=2, scale=0.5, attn_mask=mask)
    assert torch.equal(got, ref)
    assert torch.equal(run_op(q, k, v, mask, None), ref)  # no kind: the mask is applied
    go = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(2))
    for g, w in zip(torch.autograd.grad(got, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go), strict=True):
        assert_close(g, w, **F64)


@pytest.mark.parametrize("kind", [MASK_NOT_CAUSAL, MASK_PER_ROW], ids=["not-causal", "per-row"])
@pytest.mark.parametrize("hkv", [4, 2], ids=["MHA", "GQA"])
@pytest.mark.parametrize("lq", [12, 5], ids=["prefill", "chunked"])
def test_dense_mask_kinds_are_dense_sdpa(lq: int, hkv: int, kind: int) -> None:
    q, k, v = qkv(lq=lq, hkv=hkv)
    mask = make_mask("random", 2, 4, lq, 12) if kind == MASK_NOT_CAUSAL else sliding_window(lq, 12, 3)
    got, lse = ATTENTION(q, k, v, mask, kind_tensor(kind), 4, 2, 0.45, 0, "reference")
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.45, enable_gqa=hkv != 4)
    # Same function, same arguments: bit for bit.
    assert torch.equal(got, dense)
    go = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(3))
    for g, w in zip(torch.autograd.grad(got, (q, k, v), go), torch.autograd.grad(dense, (q, k, v), go), strict=True):
        # The registered backward computes these from the softmax formulas (a custom op's body runs below autograd, so
        # it cannot ask SDPA's own backward): same math, other summation order, float64 rounding apart.
        assert_close(g, w, **F64)
    # And it is not MoBA: with the same mask applied to the MoBA selection the result differs.
    assert not torch.allclose(got, run_op(q, k, v, mask, MASK_APPLY, scale=0.45))
    # The log-sum-exp is that of the dense masked scores (real numbers, not a placeholder).
    scores = (q @ k.repeat_interleave(4 // hkv, 1).transpose(-1, -2)) * 0.45
    assert_close(lse, torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1), **F64)


# --------------------------------------------------------------------------------------------------------------------
# min_seq_len
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lq", [32, 7, 1], ids=["prefill", "chunked", "decode"])
def test_min_seq_len(lq: int) -> None:
    q, k, v = qkv(lq=lq, lk=32, d=8, dv=8, seed=4)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right_causal(lq, 32), scale=0.5, enable_gqa=True)
    moba = reference.moba_attention(q, k, v, chunk_size=4, topk=2, scale=0.5)
    # The check below needs MoBA and dense to differ visibly on these rows (they do by O(0.1) on N(0, 1) data).
    assert (moba - dense).abs().max() > 0.05
    for min_seq_len in (33, 1000):  # Lk < min_seq_len: dense causal attention
        assert_close(run_op(q, k, v, None, None, min_seq_len=min_seq_len), dense, **F64)
    for min_seq_len in (0, 1, 32):  # Lk >= min_seq_len: MoBA
        assert torch.equal(run_op(q, k, v, None, None, min_seq_len=min_seq_len), moba)
    # Below min_seq_len a mask still applies (dense causal AND the mask), with gradients of that dense attention.
    mask = make_mask("left_pad", 2, 4, lq, 32)
    out = run_op(q, k, v, mask, MASK_APPLY, min_seq_len=33)
    want = masked_attention(q, k, v, bottom_right_causal(lq, 32) & mask, 0.5)
    assert_close(out, want, **F64)
    go = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
    for g, w in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(want, (q, k, v), go), strict=True):
        assert_close(g, w, **F64)


# --------------------------------------------------------------------------------------------------------------------
# Fake kernels
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize(
    "variant", ["contig", "noncontig", "gqa-mask", "decode", "not-causal", "min_seq_len"], ids=lambda s: s
)
def test_fake_kernel_matches_real(variant: str, dtype: torch.dtype) -> None:
    lq = 1 if variant == "decode" else 12
    q, k, v = qkv(lq=lq, hkv=2 if variant == "gqa-mask" else 4, dtype=dtype, contiguous=variant != "contig")
    mask = make_mask("causal_pad" if variant != "not-causal" else "random", 2, 4, lq, 12)
    if variant in ("contig", "noncontig"):
        mask = None
    kind = kind_tensor(MASK_NOT_CAUSAL) if variant == "not-causal" else None
    params = (4, 2, 0.5, 100 if variant == "min_seq_len" else 0, "reference")
    real = ATTENTION(q, k, v, mask, kind, *params)
    go = torch.ones_like(real[0]).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous incoming gradient
    bwd_tensors = (go, q, k, v, mask, kind, *real)
    real_bwd = BACKWARD(*bwd_tensors, *params)
    with FakeTensorMode() as mode:
        fake_of = {id(t): mode.from_tensor(t) for t in bwd_tensors if t is not None}
        fake = ATTENTION(*(None if t is None else fake_of[id(t)] for t in (q, k, v, mask, kind)), *params)
        fake_bwd = BACKWARD(*(None if t is None else fake_of[id(t)] for t in bwd_tensors), *params)
    for r, f in zip((*real, *real_bwd), (*fake, *fake_bwd), strict=True):
        assert (f.shape, f.stride(), f.dtype, f.device) == (r.shape, r.stride(), r.dtype, r.device)


def test_fake_analyse_mask_matches_real() -> None:
    q, k, _ = qkv(requires_grad=False)
    mask = bottom_right_causal(12, 12)
    real = ANALYSE(mask, q, k, "")
    with FakeTensorMode() as mode:
        fake = ANALYSE(mode.from_tensor(mask), mode.from_tensor(q), mode.from_tensor(k), "")
    assert (fake.shape, fake.stride(), fake.dtype, fake.device) == (real.shape, real.stride(), real.dtype, real.device)


def test_mask_kind_without_mask_means_no_mask():
    """A dense-kind mask_kind with attn_mask=None must not run unmasked (non-causal) attention: it is plain MoBA."""
    q = torch.randn(1, 2, 12, 8)
    for kind in (ops.MASK_NOT_CAUSAL, ops.MASK_PER_ROW):
        out, _ = torch.ops.moba.attention(q, q, q, None, torch.tensor(kind), 4, 2, 0.3, 0, "reference")
        torch.testing.assert_close(out, reference.moba_attention(q, q, q, chunk_size=4, topk=2, scale=0.3))


def test_mask_analysis_lives_in_masks_and_ops_reexports_it() -> None:
    # One home per job (issue 14): moba_compile.masks owns mask analysis; the names other modules import from ops are
    # the very same objects, so a counter or report read through either name is one thing.
    for name in (
        "CALLS",
        "DENSE_MASK_KINDS",
        "MASK_APPLY",
        "MASK_CAUSAL",
        "MASK_KIND_REASONS",
        "MASK_NOT_CAUSAL",
        "MASK_OBSERVATIONS",
        "MASK_PER_ROW",
        "analyse_mask",
    ):
        assert getattr(ops, name) is getattr(masks, name), name
    assert torch.ops.moba.analyse_mask.default._schema.name == "moba::analyse_mask"


def test_chunk_means_entry_for_kv_caches() -> None:
    # ops.chunk_means is what a KV cache calls for newly completed chunks: on the reference path (CPU "auto") the very
    # numbers the op computes when no means are given, so a decode step with cached means is bitwise the one without.
    q, k, v = rand_qkv(3, 2, 4, 2, 1, 45, 16, dtype=torch.float32)
    before = ops.CALLS["chunk_means:reference"]
    means = ops.chunk_means(k, 8)
    assert ops.CALLS["chunk_means:reference"] == before + 1
    assert means.shape == (2, 2, 45 // 8, 16) and means.dtype == torch.float32 and means.is_contiguous()
    assert torch.equal(means, reference.chunk_means(k, 8)[:, :, : 45 // 8])  # the partial last chunk is excluded
    assert ops.chunk_means(k, 64).shape == (2, 2, 0, 16)  # no complete chunk yet
    assert ops.chunk_means(k[:, :, :0], 8).shape == (2, 2, 0, 16)  # an empty cache
    without = ops.attention(q, k, v, chunk_size=8, topk=3)
    assert torch.equal(ops.attention(q, k, v, chunk_size=8, topk=3, chunk_means=means), without)
    with pytest.raises(ValueError, match="4-D"):
        ops.chunk_means(k[0], 8)
    with pytest.raises(ValueError, match="impl"):
        ops.chunk_means(k, 8, impl="fast")


def test_docstring_examples_of_the_moved_modules_run() -> None:
    import doctest

    from moba_compile import packed_ops, static_decode_ops
    from moba_compile.kernels import launch

    for module in (masks, launch, ops, static_decode_ops, packed_ops):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
