"""The compile pass on a static KV cache and on sites whose top-k covers every chunk.

A static cache hands SDPA its whole ``max_cache_len`` buffer; reading it as the key sequence would put a decode step's
query at the buffer's last slot and average empty slots into the gate. Until static-cache MoBA decode exists, such
sites must stay dense SDPA (exact, with the mask) and say why.
"""

from __future__ import annotations

import pytest
import torch

from moba_compile import explain, ops

transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")


def _tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return cfg, transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def test_static_cache_decode_step_stays_dense_with_the_reason_and_equals_sdpa():
    cfg, model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 9))
    step = torch.randint(0, 64, (1, 1))
    policy = {"chunk_size": 8, "topk": 2, "dense_last": 0}

    def prefilled():  # a new 24-slot static cache holding the 9 prompt keys (it keeps state, so one per call)
        cache = transformers.StaticCache(config=cfg, max_cache_len=24)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        return {"past_key_values": cache, "use_cache": True, "cache_position": torch.tensor([9])}

    with torch.no_grad():
        expected = model(step, **prefilled()).logits
    before = ops.CALLS.copy()
    report = explain(model, step, **prefilled(), policy=policy)
    assert [s.decision for s in report.sites] == ["dense", "dense"]
    assert all("static KV cache buffer" in s.reason for s in report.sites)
    assert ops.CALLS == before  # no MoBA op ran: the buffer was never read as a sequence
    compiled = torch.compile(model, backend="moba", options={"policy": policy})
    with torch.no_grad():
        got = compiled(step, **prefilled()).logits
    torch.testing.assert_close(got, expected)


def test_sites_whose_topk_covers_every_chunk_are_flagged_effectively_dense():
    _, model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 16))
    covering = explain(model, ids, policy={"chunk_size": 8, "topk": 2, "dense_last": 0})
    assert [s.effectively_dense for s in covering.sites] == [True, True]
    assert "covers all 16 keys" in covering.sites[0].reason
    sparse = explain(model, ids, policy={"chunk_size": 4, "topk": 2, "dense_last": 1})
    assert [(s.decision, s.effectively_dense) for s in sparse.sites] == [("moba", False), ("dense", False)]
