"""SDPA inside higher-order-op subgraphs: activation checkpointing, nested compile regions and ``torch.cond`` branches
are rewritten with the same layers and decisions as without them; a subgraph form the pass does not rewrite keeps its
SDPA dense, says why and warns. Results are compared with ``moba_compile.reference`` (through an eager twin of the
model) and ``moba_compile.ops.CALLS`` shows where the MoBA op ran."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from models import TinyLM
from torch.utils.checkpoint import checkpoint

import moba_compile
from moba_compile import ops, reference
from moba_compile.backend import collect_reports

torch._dynamo.config.fail_on_recompile_limit_hit = True

C, K = 8, 2
POLICY = {"chunk_size": C, "topk": K, "dense_last": 1}  # 3 layers: 0 and 1 MoBA, 2 dense
DECISIONS = [("layers.0.attn", 0, "moba"), ("layers.1.attn", 1, "moba"), ("layers.2.attn", 2, "dense")]
ATOL = 2e-5  # float32 compiled model vs the float32 eager twin: rounding through three layers


def reference_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, *, chunk_size, topk):
    return reference.moba_attention(q, k, v, chunk_size=chunk_size, topk=topk, attn_mask=attn_mask)


def twin(model: TinyLM) -> TinyLM:
    """``model`` run eagerly, the reference MoBA in layers 0 and 1, dense SDPA in layer 2 (no checkpointing needed:
    it changes no value)."""
    copied = copy.deepcopy(model)
    for attn in copied.attention_modules()[:2]:
        attn.sdpa = functools.partial(reference_sdpa, chunk_size=C, topk=K)
    return copied


class Checkpointed(TinyLM):
    def forward(self, ids: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = checkpoint(layer, x, None, use_reentrant=False)
        return self.head(x)


@torch.compiler.nested_compile_region
def _run_layer(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x, None)


class Regions(TinyLM):
    """Every layer through one nested compile region: Dynamo traces it once and shares the subgraph."""

    def forward(self, ids: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = _run_layer(layer, x)
        return self.head(x)


def _compile_and_run(model: TinyLM, ids: torch.Tensor, compiler: str):
    torch._dynamo.reset()
    forward, backward = ops.CALLS["attention:reference"], ops.CALLS["attention_backward:reference"]
    compiled = torch.compile(model, backend="moba", options={"policy": POLICY, "compiler": compiler})
    with collect_reports() as reports:
        out = compiled(ids)
    ran_forward = ops.CALLS["attention:reference"] - forward
    out.square().mean().backward()
    ran_backward = ops.CALLS["attention_backward:reference"] - backward
    return out, [s for r in reports for s in r.sites], ran_forward, ran_backward


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("region", ["checkpoint", "nested_compile_region"])
def test_sdpa_in_a_region_converts_like_without_it_with_equal_grads(region, compiler):
    torch.manual_seed(0)
    model = Checkpointed() if region == "checkpoint" else Regions()
    plain = TinyLM()
    plain.load_state_dict(model.state_dict())
    oracle = twin(plain)
    ids = torch.randint(0, 50, (2, 40))
    out, sites, ran_forward, ran_backward = _compile_and_run(model, ids, compiler)
    assert [(s.module, s.layer, s.decision) for s in sites] == DECISIONS
    assert all("subgraph of" in s.reason for s in sites if s.decision == "moba")
    # Two MoBA layers ran; checkpointing runs their forward again in the backward.
    assert ran_forward >= 2 and ran_backward == 2
    plain_out, plain_sites, _, _ = _compile_and_run(plain, ids, compiler)
    assert [(s.module, s.layer, s.decision) for s in plain_sites] == DECISIONS
    expected = oracle(ids)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, plain_out, atol=ATOL, rtol=0)
    expected.square().mean().backward()
    for (name, p), q, r in zip(model.named_parameters(), plain.parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=1e-4, msg=name)  # = the uncheckpointed grads
        torch.testing.assert_close(p.grad, r.grad, atol=ATOL, rtol=1e-4, msg=name)
    assert (TinyLM.forward(model, ids) - expected).abs().max() > 1e-3  # dense attention differs: MoBA really ran


def branches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cond(
        q.sum() > 0,
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2,
        (q, k, v),
    )


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["true-branch", "false-branch"])
def test_sdpa_in_both_cond_branches_converts(sign):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 8, generator=g) for _ in range(3))
    q = sign * (q - q.mean()) + sign * 0.1  # the branch taken follows the sign of q.sum()
    torch._dynamo.reset()
    before = ops.CALLS["attention:reference"]
    policy = {"chunk_size": 4, "topk": 1, "dense_last": 0}
    with collect_reports() as reports:
        out = torch.compile(branches, backend="moba", options={"policy": policy, "compiler": "aot_eager"})(q, k, v)
    assert ops.CALLS["attention:reference"] - before >= 1
    assert [s.decision for s in reports[0].sites] == ["moba", "moba"]
    expected = reference.moba_attention(q, k, v, chunk_size=4, topk=1) * (1 if sign > 0 else 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


class _OwnBackward(torch.autograd.Function):
    """A user's autograd.Function: its backward is written for dense attention, so the forward must stay dense."""

    @staticmethod
    def forward(ctx, q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _own_backward(q: torch.Tensor) -> torch.Tensor:
    return _OwnBackward.apply(q)


def test_sdpa_in_a_region_the_pass_does_not_rewrite_stays_dense_with_a_warning():
    q = torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    torch._dynamo.reset()
    before = ops.CALLS["attention:reference"]
    policy = {"chunk_size": 4, "topk": 1, "dense_last": 0}
    with collect_reports() as reports, pytest.warns(moba_compile.MobaCompileWarning, match="stays dense"):
        out = torch.compile(_own_backward, backend="moba", options={"policy": policy, "compiler": "aot_eager"})(q)
    assert ops.CALLS["attention:reference"] == before
    [site] = reports[0].sites
    assert site.decision == "dense" and "autograd_function_apply" in site.reason
    assert torch.equal(out, F.scaled_dot_product_attention(q, q, q, is_causal=True))
