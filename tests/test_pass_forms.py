"""Every way of calling SDPA that the pass recognises converts (one graph per call form), and a converted call may feed
another one. Each compiled result is compared with ``moba_compile.reference`` and the MoBA op is counted."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from moba_compile import ops, reference
from moba_compile.backend import collect_reports

torch._dynamo.config.fail_on_recompile_limit_hit = True

C, K = 4, 2  # 24 keys in 6 chunks, top-2: sparse enough that dense attention gives another answer
POLICY = {"chunk_size": C, "topk": K, "dense_last": 0}
ATOL = 1e-6  # float32 op vs the float32 reference: same computation, summation order may differ


def _qkv(seed: int = 0, heads_kv: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 4, 24, 8, generator=g),
        torch.randn(1, heads_kv, 24, 8, generator=g),
        torch.randn(1, heads_kv, 24, 8, generator=g),
    )


_CAUSAL = torch.ones(24, 24, dtype=torch.bool).tril()
sdpa = F.scaled_dot_product_attention
aten_sdpa = torch.ops.aten.scaled_dot_product_attention

FORMS: dict[str, Callable] = {
    "positional": lambda q, k, v: sdpa(q, k, v, None, 0.0, True),
    "keywords": lambda q, k, v: sdpa(query=q, key=k, value=v, is_causal=True),
    "query-positional-key-value-keywords": lambda q, k, v: sdpa(q, key=k, value=v, is_causal=True),
    "query-key-positional-value-keyword": lambda q, k, v: sdpa(q, k, value=v, is_causal=True),
    "mask-positional": lambda q, k, v: sdpa(q, k, v, _CAUSAL),
    "mask-keyword": lambda q, k, v: sdpa(q, k, v, attn_mask=_CAUSAL),
    "everything-keywords-with-scale": lambda q, k, v: sdpa(
        query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=0.3
    ),
    "aten-packet": lambda q, k, v: aten_sdpa(q, k, v, is_causal=True),
    "aten-default": lambda q, k, v: aten_sdpa.default(q, k, v, None, 0.0, True),
    "aten-keywords": lambda q, k, v: aten_sdpa.default(query=q, key=k, value=v, is_causal=True, scale=0.3),
}
SCALE = {"everything-keywords-with-scale": 0.3, "aten-keywords": 0.3}


@pytest.mark.parametrize("form", list(FORMS))
def test_sdpa_call_form_converts_and_equals_reference(form):
    fn = FORMS[form]
    q, k, v = _qkv()
    torch._dynamo.reset()
    before = ops.CALLS["attention:reference"]
    with collect_reports() as reports:
        out = torch.compile(fn, backend="moba", options={"policy": POLICY, "compiler": "eager"})(q, k, v)
    assert ops.CALLS["attention:reference"] - before == 1
    [site] = reports[0].sites
    assert site.decision == "moba", str(reports[0])
    expected = reference.moba_attention(q, k, v, chunk_size=C, topk=K, scale=SCALE.get(form))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE.get(form))
    assert (dense - expected).abs().max() > 1e-3  # the sparse path is what was compared


def test_gqa_keywords_with_enable_gqa_converts():
    q, k, v = _qkv(heads_kv=2)
    torch._dynamo.reset()
    fn = torch.compile(
        lambda q, k, v: sdpa(value=v, key=k, query=q, enable_gqa=True, is_causal=True),
        backend="moba",
        options={"policy": POLICY, "compiler": "eager"},
    )
    before = ops.CALLS["attention:reference"]
    out = fn(q, k, v)
    assert ops.CALLS["attention:reference"] - before == 1
    torch.testing.assert_close(out, reference.moba_attention(q, k, v, chunk_size=C, topk=K), atol=ATOL, rtol=0)


def nested(x: torch.Tensor) -> torch.Tensor:
    """The issue's case: a converted call's output is the next call's query, key and value."""
    inner = F.scaled_dot_product_attention(x, x, x, is_causal=True)
    return F.scaled_dot_product_attention(inner, inner, inner, is_causal=True)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_converted_call_feeding_another_equals_moba_applied_twice(compiler):
    x = torch.randn(1, 1, 4, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    torch._dynamo.reset()
    before = ops.CALLS["attention:reference"]
    policy = {"chunk_size": 2, "topk": 1, "dense_last": 0}
    with collect_reports() as reports:
        out = torch.compile(nested, backend="moba", options={"policy": policy, "compiler": compiler})(x)
    assert ops.CALLS["attention:reference"] - before == 2
    assert [s.decision for s in reports[0].sites] == ["moba", "moba"]
    y = x.detach().clone().requires_grad_()
    once = reference.moba_attention(y, y, y, chunk_size=2, topk=1)
    expected = reference.moba_attention(once, once, once, chunk_size=2, topk=1)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert (nested(x.detach()) - expected).abs().max() > 1e-3  # own-chunk-only attention differs from dense
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), y)
    # gradients reach ~10 here: float32 rounding relative to that (observed 2e-6 relative)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
