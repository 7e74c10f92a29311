"""Forward-mode AD and ``torch.func`` through ``moba_attention`` (issue "no policy or result is silently wrong",
item 15).

``torch.func.jvp`` used to return an all-zero tangent and ``torch.autograd.forward_ad`` dual tensors came back without
one, silently; ``torch.func.grad`` and ``vmap(grad(...))`` failed with an error about ``setup_context`` that named
nothing of ours. The oracle here is explicit softmax attention (``conftest.masked_attention``, plain differentiable
PyTorch) over the MoBA attended set (``naive.naive_moba_mask``): the selection has no derivative, so MoBA's derivatives
are those of attention over that fixed set. ``gradcheck`` adds finite differences for forward and reverse mode,
batched (vmap) too.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import F64, Case, bottom_right_causal, make_mask, masked_attention
from naive import naive_moba_mask

import moba_compile
from moba_compile import ops
from moba_compile.ops import MASK_NOT_CAUSAL

CASES = [
    Case(1, 8, 8, 1, 1, 8, 1),  # the report's case: one chunk, i.e. dense causal attention
    Case(2, 24, 24, 4, 2, 4, 2),  # GQA prefill, sparse: 6 chunks, top-2
    Case(1, 7, 19, 2, 1, 3, 3),  # chunked prefill (Lq < Lk), MQA, partial last chunk
    Case(2, 1, 21, 4, 2, 5, 2),  # decode
    Case(2, 16, 16, 2, 2, 4, 2, mask="causal_pad"),  # padding mask intersected with the selection
]


def _oracle(case: Case, q, k, v, mask):  # noqa: ANN001, ANN202
    """Differentiable attention over the MoBA attended set of (q, k) (fixed: no derivative through the gate)."""
    allowed = naive_moba_mask(q.detach(), k.detach(), case.c, case.k, mask)
    return lambda q_, k_, v_: masked_attention(q_, k_, v_, allowed)


def _moba(case: Case, mask, **kw):  # noqa: ANN001, ANN202
    return lambda q_, k_, v_: moba_compile.moba_attention(
        q_, k_, v_, chunk_size=case.c, topk=case.k, attn_mask=mask, **kw
    )


def _tangents(q, k, v):  # noqa: ANN001, ANN202
    gen = torch.Generator().manual_seed(123)
    return tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (q, k, v))


def test_jvp_of_the_reported_case_is_causal_attention_jvp() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v, t = (torch.randn(1, 1, 8, 4, generator=gen, dtype=torch.float64) for _ in range(4))
    _, tangent = torch.func.jvp(lambda q_: moba_compile.moba_attention(q_, k, v, chunk_size=8, topk=1), (q,), (t,))
    causal = bottom_right_causal(8, 8)
    _, want = torch.func.jvp(lambda q_: masked_attention(q_, k, v, causal), (q,), (t,))
    torch.testing.assert_close(tangent, want, **F64)
    assert float(want.abs().max()) > 0.5  # a real tangent (1.375 on these inputs), not the zero it used to be


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_func_jvp_equals_oracle(case: Case) -> None:
    q, k, v, mask = case.inputs()
    tangents = _tangents(q, k, v)
    out, t_out = torch.func.jvp(_moba(case, mask), (q, k, v), tangents)
    want_out, want_t = torch.func.jvp(_oracle(case, q, k, v, mask), (q, k, v), tangents)
    torch.testing.assert_close(out, want_out, **F64)
    torch.testing.assert_close(t_out, want_t, **F64)
    assert float(want_t.abs().max()) > 0.1


@pytest.mark.parametrize("which", ["query", "key", "value", "all"])
@pytest.mark.parametrize("grad_mode", ["grad", "no_grad"])
def test_forward_ad_dual_tensors_carry_the_tangent(which: str, grad_mode: str) -> None:
    case = CASES[1]
    q, k, v, mask = case.inputs()
    tangents = _tangents(q, k, v)
    keep = {"query": (0,), "key": (1,), "value": (2,), "all": (0, 1, 2)}[which]
    want = torch.func.jvp(
        _oracle(case, q, k, v, mask),
        (q, k, v),
        tuple(t if i in keep else torch.zeros_like(t) for i, t in enumerate(tangents)),
    )[1]
    with fwAD.dual_level(), torch.no_grad() if grad_mode == "no_grad" else torch.enable_grad():
        primals = [fwAD.make_dual(p, tangents[i]) if i in keep else p for i, p in enumerate((q, k, v))]
        tangent = fwAD.unpack_dual(_moba(case, mask)(*primals)).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, want, **F64)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_func_grad_equals_autograd(case: Case) -> None:
    q, k, v, mask = case.inputs()
    weight = torch.linspace(-1, 1, case.b * case.hq * case.lq * case.d, dtype=torch.float64)
    weight = weight.reshape(case.b, case.hq, case.lq, case.d)

    def loss(fn):  # noqa: ANN001, ANN202
        return lambda q_, k_, v_: (fn(q_, k_, v_) * weight).sum()

    grads = torch.func.grad(loss(_moba(case, mask)), argnums=(0, 1, 2))(q, k, v)
    want = torch.func.grad(loss(_oracle(case, q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, **F64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss(_moba(case, mask))(*leaves).backward()
    for g, leaf in zip(grads, leaves):
        torch.testing.assert_close(g, leaf.grad, **F64)


def test_vmap_of_grad_equals_a_loop() -> None:
    # Per-sample gradients: q vmapped, k/v shared (the vmap rule expands them), mask per sample.
    case = CASES[1]
    _, k, v, _ = case.inputs()
    gen = torch.Generator().manual_seed(5)
    qs = torch.randn(3, case.b, case.hq, case.lq, case.d, generator=gen, dtype=torch.float64)
    masks = torch.rand(3, case.b, 1, case.lq, case.lk, generator=gen) < 0.8

    def loss(q_, m_, k_=k, v_=v):  # noqa: ANN001, ANN202
        return (moba_compile.moba_attention(q_, k_, v_, chunk_size=case.c, topk=case.k, attn_mask=m_) ** 2).sum()

    batched = torch.vmap(torch.func.grad(loss, argnums=(0, 2, 3)), in_dims=(0, 0, None, None))(qs, masks, k, v)
    for i in range(3):
        single = torch.func.grad(loss, argnums=(0, 2, 3))(qs[i], masks[i], k, v)
        torch.testing.assert_close(batched[0][i], single[0], **F64)
        torch.testing.assert_close(batched[1][i], single[1], **F64)
        torch.testing.assert_close(batched[2][i], single[2], **F64)


def test_jacrev_equals_jacfwd() -> None:
    case = Case(1, 8, 8, 2, 1, 2, 2)
    q, k, v, _ = case.inputs()
    fn = _moba(case, None)
    rev = torch.func.jacrev(fn, argnums=(0, 1, 2))(q, k, v)
    fwd = torch.func.jacfwd(fn, argnums=(0, 1, 2))(q, k, v)
    for r, f in zip(rev, fwd):
        torch.testing.assert_close(r, f, **F64)


# gradcheck builds full Jacobians (cost ~ numel(inputs) * numel(outputs) calls per mode): tiny but still sparse shapes.
GRADCHECK_CASES = [
    Case(1, 10, 10, 2, 1, 2, 2, d=3),  # GQA prefill, 5 chunks, top-2
    Case(2, 1, 11, 2, 1, 3, 2, d=3),  # decode
    Case(2, 8, 8, 2, 2, 2, 2, d=3, mask="causal_pad"),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
def test_gradcheck_forward_and_reverse_mode(case: Case) -> None:
    # Finite differences (float64; random inputs have no gate ties, so the selection is locally constant), batched
    # forward/backward grads included: those run the ops' vmap rules.
    q, k, v, mask = case.inputs(requires_grad=True)
    assert torch.autograd.gradcheck(
        _moba(case, mask),
        (q, k, v),
        check_forward_ad=True,
        check_backward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=True,
    )


def test_dense_mask_kind_jvp() -> None:
    # A mask the compile pass found not causal runs dense SDPA: its tangents come from dense_fallback.masked_jvp.
    q, k, v, _ = Case(2, 12, 12, 4, 2, 4, 2).inputs()
    mask = make_mask("random", 2, 4, 12, 12)
    tangents = _tangents(q, k, v)
    kind = torch.tensor(MASK_NOT_CAUSAL)

    def fn(q_, k_, v_):  # noqa: ANN001, ANN202
        return ops.attention(q_, k_, v_, chunk_size=4, topk=2, attn_mask=mask, mask_kind=kind)

    before = ops.CALLS["attention_jvp:dense-sdpa"]
    _, t_out = torch.func.jvp(fn, (q, k, v), tangents)
    assert ops.CALLS["attention_jvp:dense-sdpa"] == before + 1
    _, want = torch.func.jvp(lambda q_, k_, v_: masked_attention(q_, k_, v_, mask), (q, k, v), tangents)
    torch.testing.assert_close(t_out, want, **F64)


@pytest.mark.parametrize("lq", [32, 1], ids=["prefill", "decode"])
def test_triton_jvp_uses_the_kernel_gate(lq: int) -> None:
    # Interpreted kernels, fp32: tangents follow the selection the Triton gate made (the one the forward used).
    case = Case(1, lq, 48, 2, 1, 16, 2, d=64)
    q, k, v, _ = case.inputs(dtype=torch.float32)
    tangents = _tangents(q, k, v)
    before = ops.CALLS["attention_jvp:reference-triton-gate"]
    out, t_out = torch.func.jvp(_moba(case, None, impl="triton"), (q, k, v), tangents)
    assert ops.CALLS["attention_jvp:reference-triton-gate"] == before + 1
    q64, k64, v64 = (t.double() for t in (q, k, v))
    _, want = torch.func.jvp(_oracle(case, q64, k64, v64, None), (q64, k64, v64), tuple(t.double() for t in tangents))
    # fp32 against float64: summation-order error ~1e-6 on O(1) values.
    torch.testing.assert_close(t_out.double(), want, rtol=1e-4, atol=1e-4)


def test_vmap_forward_with_batched_mask_kind_runs_per_entry() -> None:
    # Kinds differ per entry (one dense, one MoBA), so they cannot share one folded call: the rule loops.
    q, k, v, _ = Case(1, 12, 12, 2, 1, 4, 2).inputs()
    mask = make_mask("random", 1, 2, 12, 12)
    qs = torch.stack([q, q * 0.5])
    kinds = torch.tensor([MASK_NOT_CAUSAL, ops.MASK_APPLY])

    def fn(q_, kind_):  # noqa: ANN001, ANN202
        return torch.ops.moba.attention(q_, k, v, mask, kind_, 4, 2, 0.35, 0, "reference")[0]

    batched = torch.vmap(fn)(qs, kinds)
    for i in range(2):
        torch.testing.assert_close(batched[i], fn(qs[i], kinds[i]), **F64)


def test_opcheck_attention_jvp() -> None:
    q, k, v, _ = Case(2, 12, 12, 4, 2, 4, 2).inputs()
    tq, tk, tv = _tangents(q, k, v)
    torch.library.opcheck(
        torch.ops.moba.attention_jvp.default, (q, k, v, None, None, tq, None, tv, 4, 2, 0.3, 0, "reference")
    )


@pytest.mark.parametrize("how", ["grad-of-grad", "create_graph", "jacfwd-of-grad"])
def test_second_order_raises_naming_moba_attention(how: str) -> None:
    case = CASES[1]
    q, k, v, _ = case.inputs()

    def loss(q_):  # noqa: ANN001, ANN202
        return moba_compile.moba_attention(q_, k, v, chunk_size=case.c, topk=case.k).pow(2).sum()

    with pytest.raises(NotImplementedError, match="moba_attention has first-order derivatives only"):
        if how == "grad-of-grad":
            torch.func.grad(lambda q_: torch.func.grad(loss)(q_).sum())(q)
        elif how == "jacfwd-of-grad":
            torch.func.jacfwd(torch.func.grad(loss))(q)
        else:
            leaf = q.clone().requires_grad_()
            (g,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
            g.sum().backward()


def test_compiled_call_uses_the_op_and_its_registered_backward() -> None:
    # Under torch.compile the eager autograd.Function is bypassed (Dynamo would break the graph on its custom jvp):
    # fullgraph=True fails on any graph break, and the gradients must still equal eager's.
    case = CASES[1]
    q, k, v, _ = case.inputs()
    torch._dynamo.reset()
    compiled = torch.compile(_moba(case, None), backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    before = ops.CALLS["attention_backward:reference"]
    compiled(*leaves).pow(2).sum().backward()
    assert ops.CALLS["attention_backward:reference"] == before + 1
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    _moba(case, None)(*eager).pow(2).sum().backward()
    for c, e in zip(leaves, eager):
        torch.testing.assert_close(c.grad, e.grad, **F64)
