"""``attn_implementation="moba"`` with transformers' static caches: MoBA over the real keys, or dense with the reason.

A static cache hands the attention its whole ``[B, H, max_cache_len, D]`` buffer with the empty slots masked out.
Read as the key sequence, that puts a decode step's query at the buffer's last slot and averages empty slots into the
gate: generation silently produced other tokens. The oracle is an independent MoBA (tests/naive.py) on a dynamic cache.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import TINY_LLAMA, TOKEN_IDS
from naive import naive_moba

import moba_compile.hf
from moba_compile import ops

transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

CHUNK, TOPK = 8, 2
POLICY = {"chunk_size": CHUNK, "topk": TOPK, "dense_last": 1}
ATOL = 3e-5  # float32 model vs the float64 oracle cast to float32
MOBA = moba_compile.hf.register(POLICY, name="moba_static")
GEN = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)


def oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Oracle MoBA by layer: dense (all chunks) on the last layer and on sliding-window layers (mask applied)."""
    dense = module.layer_idx >= module.config.num_hidden_layers - 1 or kwargs.get("sliding_window") is not None
    out = naive_moba(query, key, value, CHUNK, 10**6 if dense else TOPK, scale=scaling, attn_mask=attention_mask)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("moba_static_oracle", oracle_attention)
AttentionMaskInterface.register("moba_static_oracle", sdpa_mask)

LLAMA = {**TINY_LLAMA, **TOKEN_IDS}
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA),
    # hybrid: sliding-window layers 0 and 2 (a rolling static buffer of 12 slots), full layers 1 and 3
    "gemma2": lambda: transformers.Gemma2Config(
        **{**LLAMA, "num_hidden_layers": 4},
        head_dim=8,
        sliding_window=12,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
    ),
    # every layer sliding (window 12 < the 37-token prompt): all dense, over a rolling static buffer
    "mistral": lambda: transformers.MistralConfig(**LLAMA, sliding_window=12),
}


def build(arch: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation=attn).eval()


class CausalAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer_idx = 0
        self.is_causal = True
        self.num_key_value_groups = 2  # read by transformers' SDPA function, the dense path


@pytest.mark.parametrize("real", [9, 30])
def test_static_buffer_decode_step_is_moba_over_the_real_keys(real):
    """The issue's case (9 real keys in 24 slots, chunk 8, top-k 2: off by 0.15 before), and 30 in 48 slots, where
    MoBA differs from dense: with the mask build_mask made, MoBA over the real keys; with a 4D mask from elsewhere,
    whose real length is unknown, dense SDPA with the mask and the reason recorded."""
    attention = moba_compile.hf.MobaAttention(policy=moba_compile.load_policy({**POLICY, "dense_last": 0}))
    slots = 24 if real == 9 else 48
    gen = torch.Generator().manual_seed(real)
    q = torch.randn(1, 4, 1, 16, generator=gen)
    k, v = (torch.randn(1, 2, slots, 16, generator=gen) for _ in range(2))
    k[:, :, real:] = 0  # the empty slots of a static cache
    v[:, :, real:] = 0
    expected = naive_moba(q, k[:, :, :real], v[:, :, :real], CHUNK, TOPK).float().transpose(1, 2)
    built = attention.build_mask(
        batch_size=1,
        q_length=1,
        kv_length=slots,
        q_offset=torch.tensor(real - 1),  # a static cache's length counter is a tensor
        attention_mask=torch.ones(1, real, dtype=torch.bool),
    )
    assert built.shape == (1, 1, 1, slots) and int(built.sum()) == real
    out, _ = attention(CausalAttention(), q, k, v, built)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    [record] = attention.report().sites
    assert record.decision == "moba" and f"the first {real} of {slots} key slots" in record.reason
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=built, enable_gqa=True).transpose(1, 2)
    if real == 30:
        assert (out - dense).abs().max() > 1e-2  # the sparse path ran

    foreign = built.clone()  # same content, not built by build_mask: the real length is not known
    out, _ = attention(CausalAttention(), q, k, v, foreign)
    torch.testing.assert_close(out, dense)
    [record] = attention.report().sites
    assert record.decision == "dense" and "static cache's buffer" in record.reason


@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "left-padding"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "mistral"])
def test_generate_with_static_cache_equals_oracle_on_dynamic_cache(arch, padding):
    """Prefill into the static buffer (no mask: SDPA's top-left causal; with padding: a [B, 1, Lq, max_cache_len]
    mask) and decode steps over it, including hybrid sliding-window layers, give the oracle's tokens and scores."""
    model = build(arch, "moba_static")
    oracle = build(arch, "moba_static_oracle")
    ids = torch.randint(3, 64, (2, 37), generator=torch.Generator().manual_seed(6))
    kw = {}
    if padding:
        mask = torch.ones_like(ids)
        mask[1, :7] = 0
        ids[1, :7] = 0
        kw["attention_mask"] = mask
    MOBA.reset_report()
    with torch.no_grad():
        out = model.generate(ids, cache_implementation="static", **kw, **GEN)
        ref = oracle.generate(ids, **kw, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    # Prefill records have form "is_causal" or "mask" (with or without a mask), decode records "kv-cache".
    sites = {(s.layer, s.form == "kv-cache"): s for s in MOBA.report().sites}
    if arch == "mistral":
        assert all(s.decision == "dense" and "sliding-window" in s.reason for s in sites.values())
    else:
        prefill, decode = sites[(1, False)], sites[(1, True)]
        assert prefill.form in ("is_causal", "mask")
        assert prefill.decision == "moba" and "of 42 key slots" in prefill.reason
        assert decode.decision == "moba" and "the first 42 of 42" not in decode.reason


def test_chunked_prefill_into_static_cache_equals_dynamic_cache():
    """A second prefill chunk onto a filled static cache: 1 < Lq < max_cache_len, queries in the middle."""
    model = build("llama", "moba_static")
    ids = torch.randint(3, 64, (1, 45), generator=torch.Generator().manual_seed(7))
    logits = {}
    MOBA.reset_report()
    for name in ("static", "dynamic"):
        if name == "static":
            cache = transformers.StaticCache(config=model.config, max_cache_len=64)
        else:
            cache = transformers.DynamicCache()
        with torch.no_grad():
            model(ids[:, :20], **{moba_compile.hf.cache_keyword(): cache})
            logits[name] = model(ids[:, 20:], **{moba_compile.hf.cache_keyword(): cache}).logits
    torch.testing.assert_close(logits["static"], logits["dynamic"], atol=1e-6, rtol=0)
    record = {(s.layer, s.form): s for s in MOBA.report().sites}[(0, "kv-cache")]
    assert record.decision == "moba"


def _compile_config() -> transformers.CompileConfig:
    # generate compiles its decode steps only on accelerators unless told otherwise; aot_eager traces the same graph
    # (fullgraph: a graph break would fail) without Inductor's CPU compile time.
    config = transformers.CompileConfig(backend="aot_eager", mode=None, fullgraph=True)
    config._compile_all_devices = True
    return config


@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "left-padding"])
def test_generate_compile_config_static_cache_equals_dynamic_cache(padding):
    """The issue's fast path: generate(cache_implementation="static", compile_config=...) compiles the decode step
    (fullgraph) with the graph-safe MoBA op inside, and gives the tokens of the dynamic-cache MoBA generate, for a
    batch of 2 (left-padded or not); 40 + 12 tokens over chunks of 8 cross several chunk boundaries."""
    model = build("llama", "moba_static")
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(8))
    kw = dict(max_new_tokens=12, do_sample=False)
    if padding:
        kw["attention_mask"] = torch.ones_like(ids)
        kw["attention_mask"][0, :9] = 0
        ids[0, :9] = 0
    torch._dynamo.reset()
    with torch.no_grad():
        dynamic = model.generate(ids, **kw)
        ops.CALLS.clear()
        MOBA.reset_report()
        compiled = model.generate(ids, cache_implementation="static", compile_config=_compile_config(), **kw)
    assert torch.equal(compiled, dynamic)
    # Every decode step of the 2 MoBA layers ran the static op (inside the compiled step: 11 steps after prefill).
    assert ops.CALLS["static_decode:reference"] == 2 * 11
    decode = {s.layer: s for s in MOBA.report().sites if s.form == "kv-cache"}
    assert decode[0].decision == "moba" and "graph-safe step" in decode[0].reason
    assert decode[2].decision == "dense"


def test_static_cache_sampling_and_several_sequences():
    """Sampling with several sequences per prompt (num_return_sequences), and beam search, on a static cache: the
    tokens of the dynamic cache (under the same seed)."""
    model = build("llama", "moba_static")
    ids = torch.randint(3, 64, (1, 30), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=10, do_sample=True, top_k=5, num_return_sequences=3)
    with torch.no_grad():
        torch.manual_seed(0)
        dynamic = model.generate(ids, **kw)
        torch.manual_seed(0)
        static = model.generate(ids, cache_implementation="static", **kw)
        assert torch.equal(static, dynamic)
        # Beam search reorders the cache (new key buffers): the chunk means are rebuilt for them.
        beams = dict(max_new_tokens=8, num_beams=3, do_sample=False)
        assert torch.equal(model.generate(ids, cache_implementation="static", **beams), model.generate(ids, **beams))


def test_max_cache_len_not_a_multiple_of_the_chunk_and_too_short():
    """max_cache_len 45 with chunk 8 serves exactly; a prompt longer than max_cache_len, or a step past its end, is
    refused with an error naming the sizes (before the cache's update would fail on an index), never a wrong token."""
    model = build("llama", "moba_static")
    ids = torch.randint(3, 64, (1, 33), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dynamic = model.generate(ids, max_new_tokens=12, do_sample=False)
        cache = transformers.StaticCache(config=model.config, max_cache_len=45)
        static = model.generate(ids, max_new_tokens=12, do_sample=False, **{moba_compile.hf.cache_keyword(): cache})
        assert torch.equal(static, dynamic)
        short = transformers.StaticCache(config=model.config, max_cache_len=20)
        with pytest.raises(ValueError, match="33 tokens at position 0 end at 33, past the static cache's 20 slots"):
            model.generate(ids, max_new_tokens=2, do_sample=False, **{moba_compile.hf.cache_keyword(): short})
        # The prompt fits, the generated tokens do not: the step past the end is refused the same way.
        short = transformers.StaticCache(config=model.config, max_cache_len=36)
        with pytest.raises(ValueError, match="1 tokens at position 36 end at 37, past the static cache's 36 slots"):
            model.generate(ids, max_new_tokens=8, do_sample=False, **{moba_compile.hf.cache_keyword(): short})


def test_compiled_step_without_an_eager_prefill_is_dense_with_the_reason():
    """A static cache whose first call is compiled (no eager step set up the chunk means): dense, the reason given."""
    model = moba_compile.hf.annotate(build("llama", "moba_static"))  # first called under tracing: paths given here
    ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    kw = {moba_compile.hf.cache_keyword(): cache}
    cache.early_initialization(1, model.config.num_key_value_heads, 8, torch.float32, torch.device("cpu"))
    mask = torch.ones(1, 12, dtype=torch.long)
    MOBA.reset_report()
    torch._dynamo.reset()
    forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        forward(ids, attention_mask=mask, **kw)
    sites = [s for s in MOBA.report().sites if s.layer == 0]
    assert sites and all(s.decision == "dense" for s in sites)
    assert "no eager step" in sites[0].reason


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "left-padding"])
def test_chunked_prefill_through_generate_equals_one_prefill(cache, padding):
    """A prompt prefilled in pieces (generate's ``prefill_chunk_size``, for prompts longer than one forward's memory)
    gives the tokens and scores of one prefill: each piece's queries reach the earlier pieces' keys through the cache,
    with the gate's means of the chunks they completed, as the same rows of one whole-prompt MoBA would."""
    model = build("llama", "moba_static")
    ids = torch.randint(3, 64, (2, 45), generator=torch.Generator().manual_seed(11))
    kw = dict(GEN, max_new_tokens=10)
    if padding:
        kw["attention_mask"] = torch.ones_like(ids)
        kw["attention_mask"][1, :13] = 0
        ids[1, :13] = 0
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        whole = model.generate(ids, **kw)
        MOBA.reset_report()
        ops.CALLS.clear()
        pieces = model.generate(ids, prefill_chunk_size=12, **kw)  # pieces of 12 cut chunks of 8 mid-chunk
    assert torch.equal(pieces.sequences, whole.sequences)
    for got, want in zip(pieces.scores, whole.scores, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # The later pieces are MoBA over the cache (several queries after cached keys), not a dense fallback.
    assert any(s.layer == 0 and s.decision == "moba" and s.form == "kv-cache" for s in MOBA.report().sites)
    assert sum(n for name, n in ops.CALLS.items() if name.startswith("attention:")) > 0
