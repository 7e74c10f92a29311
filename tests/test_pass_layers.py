"""Layer identity and layer counting: hybrid models count attention layers only, graphs split by graph breaks count
the layers they do not show, and a graph that serves several layers (per-block compilation, a graph break in the layer
loop) refuses a policy that treats them differently, with ``moba_compile.compile_blocks`` as the supported way.

Every compiled result is compared with the same model run eagerly with ``moba_compile.reference`` in the layers that
should run MoBA, and ``moba_compile.ops.CALLS`` shows how many MoBA calls really ran.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from models import Block, CausalSelfAttention, TinyLM
from torch import nn

import moba_compile
from moba_compile import ops, reference
from moba_compile.backend import collect_reports

torch._dynamo.config.fail_on_recompile_limit_hit = True

C, K = 8, 2
ATOL = 2e-5  # float32 compiled model vs the float32 eager twin: rounding through a few layers


def reference_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, *, chunk_size, topk):
    """MoBA from ``moba_compile.reference``, callable like SDPA (the twin's attention in MoBA layers)."""
    return reference.moba_attention(q, k, v, chunk_size=chunk_size, topk=topk, attn_mask=attn_mask)


def twin(model: nn.Module, moba_layers: dict[int, tuple[int, int]]) -> nn.Module:
    """A copy of ``model`` whose attention in layer i runs the reference MoBA with ``moba_layers[i]``, dense else."""
    copied = copy.deepcopy(model)
    for index, layer in enumerate(copied.layers):
        attn = getattr(layer, "attn", None)
        if attn is not None and index in moba_layers:
            chunk, topk = moba_layers[index]
            attn.sdpa = functools.partial(reference_sdpa, chunk_size=chunk, topk=topk)
    return copied


def moba_calls() -> int:
    return ops.CALLS["attention:reference"]


class HybridBlock(nn.Module):
    """A decoder layer with or without attention (a hybrid model's other layers mix tokens otherwise)."""

    def __init__(self, dim: int, attention: bool) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(dim, 4, 2) if attention else None
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.attn(x)
        return x + self.mlp(x)


class HybridLM(nn.Module):
    """Eight layers, attention only in layers 1 and 5."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.layers = nn.ModuleList(HybridBlock(32, i in (1, 5)) for i in range(8))
        self.head = nn.Linear(32, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.mark.parametrize(
    "policy,moba",
    [
        ({"chunk_size": C, "topk": K, "dense_last": 1}, [1]),
        ({"chunk_size": C, "topk": K, "dense_last": 0, "rules": [{"layers": [-1], "mode": "dense"}]}, [1]),
        ({"chunk_size": C, "topk": K, "dense_last": 0, "rules": [{"layers": [-2], "mode": "dense"}]}, [5]),
    ],
    ids=["dense_last=1", "layers=[-1]", "layers=[-2]"],
)
def test_hybrid_model_counts_attention_layers_only(policy, moba):
    torch.manual_seed(0)
    model = HybridLM()
    ids = torch.randint(0, 50, (2, 40))
    torch._dynamo.reset()
    before = moba_calls()
    with collect_reports() as reports:
        out = torch.compile(model, backend="moba", options={"policy": policy, "compiler": "aot_eager"})(ids)
    assert moba_calls() - before == len(moba)
    [report] = reports
    assert [(s.layer, s.decision) for s in report.sites] == [(i, "moba" if i in moba else "dense") for i in (1, 5)]
    expected = twin(model, {i: (C, K) for i in moba})(ids)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert (model(ids) - expected).abs().max() > 1e-3  # dense attention gives another answer: MoBA really ran


class SplitLM(TinyLM):
    """Four layers in two graphs: a graph break between layers 1 and 2 (a print, a data-dependent branch, ...)."""

    def forward(self, ids: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        x = self.layers[1](self.layers[0](x))
        torch._dynamo.graph_break()
        x = self.layers[3](self.layers[2](x))
        return self.head(x)


def test_graph_split_by_a_graph_break_counts_the_layers_it_does_not_show():
    """The first graph shows layers 0 and 1 only; dense_last=1 means layer 3 of 4, not layer 1 of the 2 it shows."""
    torch.manual_seed(0)
    model = SplitLM(n_layers=4)
    ids = torch.randint(0, 50, (2, 40))
    policy = {"chunk_size": C, "topk": K, "dense_last": 1}
    torch._dynamo.reset()
    before = moba_calls()
    with collect_reports() as reports:
        out = torch.compile(model, backend="moba", options={"policy": policy, "compiler": "aot_eager"})(ids)
    assert moba_calls() - before == 3
    assert [[(s.layer, s.decision) for s in r.sites] for r in reports] == [
        [(0, "moba"), (1, "moba")],
        [(2, "moba"), (3, "dense")],
    ]
    torch.testing.assert_close(out, twin(model, {0: (C, K), 1: (C, K), 2: (C, K)})(ids), atol=ATOL, rtol=0)


class LoopBreakLM(TinyLM):
    """A graph break inside the layer loop: Dynamo compiles the block's code alone and reuses it for every layer."""

    def forward(self, ids: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
            torch._dynamo.graph_break()
        return self.head(x)


def _per_block(model: TinyLM, options: dict | None) -> None:
    torch._dynamo.reset()
    for block in model.layers:
        block.compile(backend="moba", options=options)


LAYER_DEPENDENT = {"chunk_size": C, "topk": K, "dense_last": 1, "compiler": "aot_eager"}


@pytest.mark.parametrize("how", ["block.compile", "graph-break-in-loop"])
def test_graph_serving_several_layers_refuses_a_layer_dependent_explicit_policy(how):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (1, 24))
    if how == "block.compile":
        model = TinyLM(n_layers=4)
        _per_block(model, {"policy": {k: v for k, v in LAYER_DEPENDENT.items() if k != "compiler"}})
        run = model
    else:
        model = LoopBreakLM(n_layers=4)
        torch._dynamo.reset()
        policy = {k: v for k, v in LAYER_DEPENDENT.items() if k != "compiler"}
        run = torch.compile(model, backend="moba", options={"policy": policy, "compiler": "aot_eager"})
    with pytest.raises(Exception, match=r"starts inside a layer.*moba_compile\.compile_blocks") as caught:
        run(ids)
    cause = caught.value
    while cause is not None and not isinstance(cause, moba_compile.PolicyError):
        cause = cause.__cause__ or getattr(cause, "inner_exception", None)
    assert isinstance(cause, moba_compile.PolicyError)
    assert "layers.0.attn: moba" in str(cause) and "layers.3.attn: dense" in str(cause)


@pytest.mark.parametrize("how", ["block.compile", "graph-break-in-loop"])
def test_graph_serving_several_layers_stays_dense_under_the_automatic_policy(how):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (1, 24))
    model = TinyLM(n_layers=4) if how == "block.compile" else LoopBreakLM(n_layers=4)
    with collect_reports() as reports:
        if how == "block.compile":
            _per_block(model, None)
            out = model(ids)
        else:
            torch._dynamo.reset()
            out = torch.compile(model, backend="moba")(ids)
    [report] = reports  # one graph for all four layers
    [site] = report.sites
    assert site.decision == "dense" and "starts inside a layer" in site.reason and "default policy" in site.reason
    assert (site.module, site.layer) == ("layers.0.attn", 0)
    torch.testing.assert_close(out, twin(model, {})(ids), atol=ATOL, rtol=0)


def test_graph_serving_several_layers_applies_a_layer_independent_policy():
    torch.manual_seed(0)
    model = TinyLM(n_layers=4)
    ids = torch.randint(0, 50, (2, 40))
    _per_block(model, {"policy": {"chunk_size": C, "topk": K, "dense_last": 0}, "compiler": "aot_eager"})
    before = moba_calls()
    with collect_reports() as reports:
        out = model(ids)
    assert moba_calls() - before == 4
    [site] = reports[0].sites
    assert site.decision == "moba" and "serves layers 0..3" in site.reason
    torch.testing.assert_close(out, twin(model, {i: (C, K) for i in range(4)})(ids), atol=ATOL, rtol=0)


def test_compile_blocks_gives_each_block_its_own_decision():
    torch.manual_seed(0)
    model = TinyLM(n_layers=4)
    oracle = twin(model, {0: (C, K), 1: (C, K), 2: (C, K)})
    ids = torch.randint(0, 50, (2, 40))
    torch._dynamo.reset()
    plan = moba_compile.compile_blocks(model, {"chunk_size": C, "topk": K, "dense_last": 1}, compiler="aot_eager")
    assert [(b.path, b.layer, b.group) for b in plan] == [
        ("layers.0", 0, 0),
        ("layers.1", 1, 0),
        ("layers.2", 2, 0),
        ("layers.3", 3, 1),
    ]
    before = moba_calls()
    with collect_reports() as reports:
        out = model(ids)
    assert moba_calls() - before == 3
    sites = [s for r in reports for s in r.sites]
    assert [(s.module, s.decision) for s in sites] == [("layers.0.attn", "moba"), ("layers.3.attn", "dense")]
    expected = oracle(ids)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    out.square().mean().backward()
    expected.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=1e-4, msg=name)


def test_compile_blocks_follows_module_rules_and_counts_given_attention_layers():
    torch.manual_seed(0)
    model = HybridLM()
    ids = torch.randint(0, 50, (2, 40))
    policy = {"chunk_size": C, "topk": K, "dense_last": 1, "rules": [{"module": "re:layers\\.1\\.attn", "topk": 3}]}
    torch._dynamo.reset()
    plan = moba_compile.compile_blocks(model, policy, attention_layers=[1, 5], compiler="aot_eager")
    assert plan[1].group != plan[5].group
    before = moba_calls()
    with collect_reports() as reports:
        out = model(ids)
    assert moba_calls() - before == 1
    sites = [(s.module, s.layer, s.decision, s.topk) for r in reports for s in r.sites]
    assert sites == [("layers.1.attn", 1, "moba", 3), ("layers.5.attn", 5, "dense", None)]
    torch.testing.assert_close(out, twin(model, {1: (C, 3)})(ids), atol=ATOL, rtol=0)


def test_compile_blocks_validates_options_at_once():
    with pytest.raises(moba_compile.PolicyError, match="topk"):
        moba_compile.compile_blocks(TinyLM(), {"topk": 0})
    with pytest.raises(ValueError, match="option 'compiler'"):
        moba_compile.compile_blocks(TinyLM(), None, compiler="tvm")
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        moba_compile.compile_blocks(Block(8, 2, 2, "is_causal"), None)


def test_compile_blocks_warns_only_when_the_policy_keeps_every_block_dense():
    import warnings

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moba_compile.compile_blocks(TinyLM(n_layers=4), {"chunk_size": C, "topk": K, "dense_last": 1})
        model = TinyLM(n_layers=4)
        moba_compile.compile_blocks(model, {"chunk_size": C, "topk": K, "dense_last": 1}, compiler="aot_eager")
        model(torch.randint(0, 50, (2, 40)))  # the dense group's graph: dense on purpose, no "converts none" warning
    assert not [w for w in caught if issubclass(w.category, moba_compile.MobaCompileWarning)]
    with pytest.warns(moba_compile.MobaCompileWarning, match="keeps all 4 blocks dense"):
        moba_compile.compile_blocks(TinyLM(n_layers=4), {"rules": [{"layers": [0, 1, 2, 3], "mode": "dense"}]})
