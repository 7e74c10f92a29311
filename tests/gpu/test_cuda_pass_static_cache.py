"""GPU-only: the compile backend on a static KV cache (issue 16): ``torch.compile(model, backend="moba",
mode="reduce-overhead")`` decode steps over ``transformers.StaticCache`` run ``moba::static_decode`` (Triton) inside
CUDA graphs, replayed while the cache fills, and give the greedy tokens of the same compiled model over a dynamic
cache (``moba::attention`` over the real keys). The policy's dense layer runs ``moba::dense_decode`` on the split-K
kernels by default (``dense_decode = "split_k"``), with the tokens of its SDPA call (``"sdpa"``).

Collected only where CUDA is available (``tests/conftest.py``); run with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import os

import pytest
import torch

from moba_compile import ops

assert os.environ.get("TRITON_INTERPRET", "0") in ("0", ""), "run the GPU tests with TRITON_INTERPRET=0"
transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")

# The dense layer on SDPA here: this test compares the MoBA layers' static op with the dynamic-cache path in bf16, where
# the dense layer's kernels should not differ; the split-K default is compared in fp32 below.
POLICY = {"chunk_size": 64, "topk": 3, "dense_last": 1, "dense_decode": "sdpa"}


def _greedy(prefill, step, cache, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy tokens: the eager ``prefill`` model fills ``cache`` (the same keys for every cache type), then ``step``
    decodes."""
    tokens = []
    with torch.no_grad():
        logits = prefill(prompt, past_key_values=cache, use_cache=True).logits
        nxt = logits[:, -1:].argmax(-1)
        for i in range(new_tokens):
            tokens.append(int(nxt))
            pos = torch.tensor([prompt.shape[1] + i], device=prompt.device)
            logits = step(nxt, past_key_values=cache, use_cache=True, cache_position=pos).logits
            nxt = logits[:, -1:].argmax(-1)
    return tokens


def test_reduce_overhead_static_cache_decode_equals_dynamic_cache_tokens() -> None:
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = model.to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, 256, (1, 700), device="cuda")
    before = ops.CALLS.copy()
    # mode="reduce-overhead" through the backend's options (torch.compile takes mode or options, not both).
    static_step = torch.compile(model, backend="moba", options={"policy": POLICY, "mode": "reduce-overhead"})
    static_cache = transformers.StaticCache(config=cfg, max_cache_len=1024)
    got = _greedy(model, static_step, static_cache, prompt, 40)  # eager dense prefill; the decode steps compared
    assert ops.CALLS["static_decode:triton"] > before["static_decode:triton"], "the static op's kernel ran"
    torch._dynamo.reset()
    dynamic_step = torch.compile(model, backend="moba", options={"policy": POLICY})
    expected = _greedy(model, dynamic_step, transformers.DynamicCache(config=cfg), prompt, 40)
    assert got == expected


def test_reduce_overhead_static_cache_dense_layer_runs_split_k_by_default() -> None:
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = model.to("cuda").eval()  # fp32: the two dense paths differ by summation order only
    prompt = torch.randint(0, 256, (1, 700), device="cuda")
    tokens = {}
    for mode in ("split_k", "sdpa"):
        torch._dynamo.reset()
        before = ops.CALLS["dense_decode:triton"]
        policy = {"chunk_size": 64, "topk": 3, "dense_last": 1}
        if mode == "sdpa":
            policy["dense_decode"] = "sdpa"  # the opt-out; "split_k" is the default
        step = torch.compile(model, backend="moba", options={"policy": policy, "mode": "reduce-overhead"})
        cache = transformers.StaticCache(config=cfg, max_cache_len=1024)
        tokens[mode] = _greedy(model, step, cache, prompt, 30)
        ran = ops.CALLS["dense_decode:triton"] - before
        # The warm-up runs count calls; captured replays do not.
        assert (ran > 0) == (mode == "split_k"), (mode, ran)
    assert tokens["split_k"] == tokens["sdpa"]
