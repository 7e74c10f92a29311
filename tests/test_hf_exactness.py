"""``attn_implementation="moba"``: no policy or input is served with a silently wrong result.

Each test reproduces one way the transformers path used to return something other than MoBA (or dense attention where
MoBA does not apply) and checks the right value against an independent oracle (tests/naive.py) or dense SDPA.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import TINY_LLAMA, TOKEN_IDS
from naive import naive_moba

import moba_compile
import moba_compile.hf
from moba_compile import ops

transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")

CHUNK, TOPK = 8, 2
POLICY = {"chunk_size": CHUNK, "topk": TOPK, "dense_last": 1}
ATOL = 3e-5  # float32 model vs the float64 oracle cast to float32
MOBA = moba_compile.hf.register(POLICY, name="moba_exact")

LLAMA = {**TINY_LLAMA, **TOKEN_IDS}


def tiny_llama(attn: str = "moba_exact") -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**LLAMA), attn_implementation=attn
    ).eval()


def left_padded(seed: int, length: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 64, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 0
    return ids, mask


class CausalAttention(torch.nn.Module):
    """The attributes transformers' attention modules carry that the attention function reads."""

    def __init__(self, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_causal = True


def test_inference_mode_with_padding_mask_equals_no_grad():
    model = tiny_llama()
    ids, mask = left_padded(1)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    with torch.inference_mode():
        got = model(ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    assert any(s.decision == "moba" for s in MOBA.report().sites)


def test_mask_buffer_refilled_in_place_is_classified_again():
    """A boolean mask buffer rewritten through numpy keeps its storage, shape and version counter: the second call
    must still see the new (bidirectional) content and run dense SDPA with it, not reuse the first classification."""
    attention = moba_compile.hf.MobaAttention(policy=moba_compile.load_policy({**POLICY, "dense_last": 0}))
    module = CausalAttention()
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=gen) for _ in range(3))
    buffer = torch.ones(1, 1, 32, 32, dtype=torch.bool).tril()
    buffer[..., :4] = False  # causal with the first four keys padded
    first, _ = attention(module, q, k, v, buffer)
    expected = naive_moba(q, k, v, CHUNK, TOPK, attn_mask=buffer).float().transpose(1, 2)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
    version = buffer._version
    buffer.numpy()[:] = True  # bidirectional now: not MoBA
    assert buffer._version == version  # the write bypassed the version counter
    second, _ = attention(module, q, k, v, buffer)
    torch.testing.assert_close(second, F.scaled_dot_product_attention(q, k, v, attn_mask=buffer).transpose(1, 2))
    [record] = attention.report().sites
    assert record.decision == "dense" and "later keys" in record.reason


def test_moba_cache_means_follow_in_place_writes_and_older_key_tensors():
    """The cache's chunk means are keyed on the keys tensor object: an in-place write into the layer's keys (same
    object, same length) must rebuild them, and means asked for an older keys tensor must be that tensor's."""
    model = tiny_llama()
    ids, mask = left_padded(3)
    cache = moba_compile.hf.MobaCache()
    with_cache = {moba_compile.hf.cache_keyword(): cache}  # cache= on transformers 5.24, past_key_values= on 5.17
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache)
    layer = cache.layers[0]
    older = layer.keys
    with torch.no_grad():
        model(ids[:, :9], attention_mask=torch.cat([mask, mask[:, :9]], 1), **with_cache)
    assert layer.keys is not older and layer.keys.shape[2] == 37 + 9

    def expected(keys: torch.Tensor) -> torch.Tensor:
        return moba_compile.reference.chunk_means(keys, CHUNK)[:, :, : keys.shape[2] // CHUNK]

    torch.testing.assert_close(layer.chunk_means(CHUNK, layer.keys), expected(layer.keys), atol=1e-6, rtol=1e-6)
    layer.keys.mul_(-2.0)  # in place: the same object and length, other content
    torch.testing.assert_close(layer.chunk_means(CHUNK, layer.keys), expected(layer.keys), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.chunk_means(CHUNK, older), expected(older), atol=1e-6, rtol=1e-6)
    cache.crop(-5)  # replaces the tensor; an update after it must not extend means of the longer keys
    with torch.no_grad():
        model(ids[:, :3], attention_mask=torch.cat([mask, mask[:, :7]], 1), **with_cache)
    torch.testing.assert_close(layer.chunk_means(CHUNK, layer.keys), expected(layer.keys), atol=1e-6, rtol=1e-6)


def test_policy_object_built_in_code_behaves_like_the_same_policy_as_a_dict():
    spec = {**POLICY, "rules": [{"layers": [0], "topk": 3}]}
    as_dict = moba_compile.hf.register(spec, name="moba_exact_dict")
    as_object = moba_compile.hf.register(
        moba_compile.Policy(chunk_size=CHUNK, topk=TOPK, dense_last=1, rules=[moba_compile.Rule(layers=(0,), topk=3)]),
        name="moba_exact_object",
    )
    ids, mask = left_padded(4)
    with torch.no_grad():
        expected = tiny_llama("moba_exact_dict")(ids, attention_mask=mask).logits
        got = tiny_llama("moba_exact_object")(ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    decisions = [[(s.layer, s.decision, s.chunk_size, s.topk) for s in a.report().sites] for a in (as_dict, as_object)]
    assert decisions[0] == decisions[1] == [(0, "moba", CHUNK, 3), (1, "moba", CHUNK, TOPK), (2, "dense", None, None)]
    assert not as_object.policy.automatic and as_object.report().policy_source == "<Policy>"


def test_t5_relative_position_bias_keeps_decoder_self_attention_dense_and_exact():
    """T5 adds a learned relative position bias (keyword ``position_bias``) to the scores; MoBA does not implement it,
    so its causal decoder self-attention must stay dense, with the keyword named, and match the SDPA model."""
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0
    )
    models = {}
    for name in ("sdpa", "moba_exact"):
        torch.manual_seed(0)
        # from_config with the implementation: on transformers 5.17 set_attn_implementation does not reach the
        # encoder/decoder stacks' copies of the config.
        models[name] = transformers.AutoModelForSeq2SeqLM.from_config(
            copy.deepcopy(config), attn_implementation=name
        ).eval()
    sdpa, moba = models["sdpa"], models["moba_exact"]
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 64, (2, 30), generator=gen)
    decoder_ids = torch.randint(3, 64, (2, 40), generator=gen)  # longer than chunk * topk: MoBA would differ
    with torch.no_grad():
        expected = sdpa(input_ids=ids, decoder_input_ids=decoder_ids).logits
        before = sum(ops.CALLS.values())
        got = moba(input_ids=ids, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert sum(ops.CALLS.values()) == before  # no moba:: op ran
    sites = {s.module: s for s in MOBA.report().sites}
    for layer in range(2):
        reason = sites[f"decoder.block.{layer}.layer.0.SelfAttention"].reason
        assert "position_bias=<float32 tensor" in reason and "MoBA does not implement" in reason


def oracle_by_layer(dense_layers: set[int]):
    """An oracle attention function: naive MoBA, dense causal (every chunk) on ``dense_layers``."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        topk = 10**6 if module.layer_idx in dense_layers else TOPK
        out = naive_moba(query, key, value, CHUNK, topk, scale=scaling, attn_mask=attention_mask)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


@pytest.mark.parametrize("selector", ["model.layers.1.self_attn", "re:.*layers\\.1\\..*"])
def test_module_rules_apply_without_annotate_and_reports_name_module_paths(selector):
    name = f"moba_exact_module_{len(selector)}"
    attention = moba_compile.hf.register(
        {**POLICY, "dense_last": 0, "rules": [{"module": selector, "mode": "dense"}]}, name=name
    )
    oracle_name = "moba_exact_oracle_layer1_dense"
    transformers.AttentionInterface.register(oracle_name, oracle_by_layer({1}))
    transformers.masking_utils.AttentionMaskInterface.register(oracle_name, transformers.masking_utils.sdpa_mask)
    model = tiny_llama(name)
    assert not hasattr(model.model.layers[1].self_attn, "_moba_path")  # nobody called annotate()
    ids, mask = left_padded(8)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        expected = tiny_llama(oracle_name)(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    sites = [(s.module, s.decision) for s in attention.report().sites]
    assert sites == [
        ("model.layers.0.self_attn", "moba"),
        ("model.layers.1.self_attn", "dense"),
        ("model.layers.2.self_attn", "moba"),
    ]
    assert "rule 0" in attention.report().sites[1].reason


def test_module_rule_first_called_under_torch_compile_is_refused_with_the_way_out():
    attention = moba_compile.hf.register(
        {**POLICY, "rules": [{"module": "model.layers.1.self_attn", "mode": "dense"}]}, name="moba_exact_traced"
    )
    model = tiny_llama("moba_exact_traced")
    ids = torch.randint(3, 64, (1, 20), generator=torch.Generator().manual_seed(9))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"under torch.compile tracing.*annotate\(model\)"), torch.no_grad():
        compiled(ids)
    moba_compile.hf.annotate(model)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="eager")(ids).logits, model(ids).logits)
    assert [s.decision for s in attention.report().sites] == ["moba", "dense", "dense"]


def test_hybrid_jamba_dense_last_counts_attention_layers_not_decoder_layers():
    """Jamba with attention only in decoder layers 1 and 5 of 8 (mamba elsewhere, its slow path on CPU):
    dense_last=1 keeps attention layer 5 dense and runs layer 1 on MoBA."""
    config = transformers.JambaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=4,
        attn_layer_offset=1,
        num_experts=1,
        expert_layer_period=1,
        expert_layer_offset=0,
        mamba_d_state=4,
        mamba_expand=2,
        mamba_dt_rank=4,
        pad_token_id=0,
    )
    oracle_name = "moba_exact_oracle_layer5_dense"
    transformers.AttentionInterface.register(oracle_name, oracle_by_layer({5}))
    transformers.masking_utils.AttentionMaskInterface.register(oracle_name, transformers.masking_utils.sdpa_mask)
    models = {}
    for name in ("moba_exact", oracle_name):
        torch.manual_seed(0)
        # A config per model: from_config records the attention implementation on it, read at every call.
        models[name] = transformers.AutoModelForCausalLM.from_config(
            copy.deepcopy(config), attn_implementation=name
        ).eval()
    ids = torch.randint(3, 64, (1, 40), generator=torch.Generator().manual_seed(10))
    MOBA.reset_report()
    with torch.no_grad():
        got = models["moba_exact"](ids).logits
        expected = models[oracle_name](ids).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    sites = [(s.module, s.layer, s.decision) for s in MOBA.report().sites]
    assert sites == [("model.layers.1.self_attn", 1, "moba"), ("model.layers.5.self_attn", 5, "dense")]
    assert "last 1 of 2 attention layers" in MOBA.report().sites[1].reason


class ToyAttention(torch.nn.Module):
    """An attention module of a hybrid model whose config does not say which layers have attention."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_causal = True
        self.config = type("Config", (), {"num_hidden_layers": 8})()


class ToyMixer(torch.nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # as a mamba mixer has one


def test_hybrid_attention_layers_found_from_the_modules_when_the_config_says_nothing():
    blocks = [ToyAttention(i) if i in (1, 5) else ToyMixer(i) for i in range(8)]
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"mixer": b}) for b in blocks])
    attention = moba_compile.hf.MobaAttention(policy=moba_compile.load_policy(POLICY))
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen) for _ in range(3))
    for i in (1, 5):
        attention(blocks[i], q, k, v, None)
    sites = [(s.module, s.decision) for s in attention.report().sites]
    assert sites == [("layers.1.mixer", "moba"), ("layers.5.mixer", "dense")]
