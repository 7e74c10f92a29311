"""Module paths and layers come from the module objects, not from how Dynamo spells the compiled frame's root.

transformers 5.24 calls ``forward`` through a wrapper, so Dynamo's ``nn_module_stack`` root became ``L['args'][0]``
and a path parsed from that string read ``0.model.layers.0.self_attn``: every module rule matched nothing and the layer
silently ran MoBA, while ``explain`` (root ``G['model']``) showed the rule applied. These tests pin the fix: any
spelling of the root gives one path, and ``explain`` and ``torch.compile`` decide identically.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import TINY_LLAMA
from torch import fx

import moba_compile
from moba_compile import ops, reference
from moba_compile.backend import collect_reports
from moba_compile.passes.identity import place_nodes, source_components

transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

torch._dynamo.config.fail_on_recompile_limit_hit = True

ATOL = 3e-5  # float32 compiled model vs the same model run eagerly on the float32 reference, through 3 layers
CHUNK, LAYERS = 8, 3


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``moba_compile.reference`` with the layer's ``(chunk, topk)`` from
    ``module.moba_setting``, dense causal attention (every chunk selected) where it is None."""
    chunk, topk = module.moba_setting or (CHUNK, 10**6)
    mask = attention_mask if attention_mask is not None and attention_mask.dtype == torch.bool else None
    out = reference.moba_attention(query, key, value, chunk_size=chunk, topk=topk, scale=scaling, attn_mask=mask)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("pass_identity_reference", reference_attention)
AttentionMaskInterface.register("pass_identity_reference", sdpa_mask)


def tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": LAYERS})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def reference_twin(model: torch.nn.Module, settings: list[tuple[int, int] | None]) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("pass_identity_reference")
    for layer, setting in zip(twin.model.layers, settings):
        layer.self_attn.moba_setting = setting
    return twin


# Layer 1 dense by an exact path, layer 2 top-k 3 by a regex: both kinds of module rule must apply.
RULES_POLICY = {
    "chunk_size": CHUNK,
    "topk": 2,
    "dense_last": 0,
    "rules": [
        {"module": "model.layers.1.self_attn", "mode": "dense"},
        {"module": "re:model\\.layers\\.2\\.self_attn", "topk": 3},
    ],
}
EXPECTED = [(0, "moba", 2), (1, "dense", None), (2, "moba", 3)]


def test_module_rules_apply_identically_through_explain_and_torch_compile():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    explained = moba_compile.explain(model, ids, policy=RULES_POLICY)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moba", options={"policy": RULES_POLICY, "compiler": "aot_eager"})
    before = ops.CALLS["attention:reference"]
    with collect_reports() as reports:
        logits = compiled(ids).logits
    assert ops.CALLS["attention:reference"] - before == 2  # layers 0 and 2 ran MoBA, layer 1 did not
    [report] = reports
    rows = [(s.module, s.layer, s.decision, s.chunk_size, s.topk) for s in report.sites]
    assert rows == [(s.module, s.layer, s.decision, s.chunk_size, s.topk) for s in explained.sites]
    assert [s.module for s in report.sites] == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    assert [(s.layer, s.decision, s.topk) for s in report.sites] == EXPECTED
    assert "rule 0" in report.sites[1].reason and "rule 1" in report.sites[2].reason
    assert report.unmatched_rules == [] and explained.unmatched_rules == []
    expected = reference_twin(model, [(CHUNK, 2), None, (CHUNK, 3)])(ids).logits
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert (model(ids).logits - expected).abs().max() > 1e-4  # dense attention differs: MoBA really ran


def _node_with_stack(entries: list[tuple[str, torch.nn.Module]]) -> fx.Node:
    graph = fx.Graph()
    node = graph.placeholder("x")
    node.meta["nn_module_stack"] = {str(id(module)): (source, type(module)) for source, module in entries}
    return node


class Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attention()


class Inner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer() for _ in range(3))


class Outer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Inner()


@pytest.mark.parametrize(
    "root",
    ["L['self']", "L['args'][0]", "G['model']", "L['kwargs']['m']", 'L["self"]', "___stack0", "L['a'][0]['b'][2]"],
)
@pytest.mark.parametrize("style", ["dotted", "indexed", "_modules"])
def test_any_root_spelling_gives_the_same_path_and_layer(root, style):
    outer = Outer()
    layer = outer.model.layers[2]
    spell = {
        "dotted": ("{r}.model", "{r}.model.layers.2", "{r}.model.layers.2.self_attn"),
        "indexed": ("{r}.model", "{r}.model.layers[2]", "{r}.model.layers[2].self_attn"),
        "_modules": (
            "{r}._modules['model']",
            "{r}._modules['model']._modules['layers']['2']",
            "{r}._modules['model']._modules['layers']['2']._modules['self_attn']",
        ),
    }[style]
    modules = [outer.model, layer, layer.self_attn]
    node = _node_with_stack([(s.format(r=root), m) for s, m in zip(spell, modules)])
    [placed] = place_nodes([node], set())
    assert (placed.module, placed.layer) == ("model.layers.2.self_attn", 2)
    # the same site at every layer of its container, for rule checks
    assert placed.variants == tuple((f"model.layers.{i}.self_attn", i) for i in range(3))
    assert not placed.shared


def test_unconfirmed_root_components_never_become_part_of_the_path():
    """A root spelled so that the parser cannot tell it apart (``L.args[0]``): the objects still cut it off."""
    outer = Outer()
    layer = outer.model.layers[1]
    node = _node_with_stack([("L.args[0].model", outer.model), ("L.args[0].model.layers.1.self_attn", layer.self_attn)])
    [placed] = place_nodes([node], set())
    assert placed.module == "model.layers.1.self_attn"


def test_source_components_drop_the_root_reference():
    assert source_components("L['args'][0].model.layers[0]") == ["model", "layers", "0"]
    assert source_components("G['model']") == []
    assert source_components("L['self']._modules['layers']['0'].attn") == ["layers", "0", "attn"]
