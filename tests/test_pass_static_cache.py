"""The compile pass on a static KV cache and on sites whose top-k covers every chunk.

A static cache hands SDPA its whole ``max_cache_len`` buffer; reading it as the key sequence would put a decode step's
query at the buffer's last slot and average empty slots into the gate. A one-query step with the cache's boolean mask
runs ``moba::static_decode`` (the length read from the mask on the device); every other call over the buffer stays
dense SDPA (exact, with the mask) and says why.
"""

from __future__ import annotations

import pytest
import torch
from models import TINY_LLAMA

from moba_compile import explain, ops

transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")


def _tiny_llama():
    cfg = transformers.LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 2})
    torch.manual_seed(0)
    return cfg, transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def _prefilled(cfg, model, ids: torch.Tensor, cache) -> dict:
    """A cache holding the prompt's keys from an eager dense prefill (the same keys for every cache type)."""
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return {"past_key_values": cache, "use_cache": True, "cache_position": torch.tensor([ids.shape[1]])}


def test_static_cache_decode_step_runs_moba_over_the_filled_slots():
    # A 48-slot static cache holding 37 prompt keys: the compiled decode step runs moba::static_decode with the length
    # read from the mask, and equals the same step over a dynamic cache holding the same 37 keys (moba::attention).
    cfg, model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 37))
    step = torch.randint(0, 64, (1, 1))
    policy = {"chunk_size": 8, "topk": 2, "dense_last": 0}

    def static():  # a new static cache per call (it keeps state)
        return _prefilled(cfg, model, ids, transformers.StaticCache(config=cfg, max_cache_len=48))

    report = explain(model, step, **static(), policy=policy)
    assert [(s.decision, s.form) for s in report.sites] == [("moba", "kv-cache"), ("moba", "kv-cache")]
    assert all("static cache: the length read from the mask" in s.reason for s in report.sites)
    before = ops.CALLS.copy()
    compiled = torch.compile(model, backend="moba", options={"policy": policy})
    with torch.no_grad():
        got = compiled(step, **static()).logits
    assert ops.CALLS["static_decode:reference"] - before["static_decode:reference"] == 2
    torch._dynamo.reset()
    # The reference step under aot_eager: the static step above is the one whose Inductor compile this test needs.
    dynamic = torch.compile(model, backend="moba", options={"policy": policy, "compiler": "aot_eager"})
    with torch.no_grad():
        expected = dynamic(step, **_prefilled(cfg, model, ids, transformers.DynamicCache(config=cfg))).logits
    torch.testing.assert_close(got, expected)
    with torch.no_grad():  # and MoBA really ran: dense attention over the 38 keys differs
        dense = model(step, **static()).logits
    assert not torch.allclose(got, dense, atol=1e-4)


def test_static_cache_calls_moba_cannot_serve_stay_dense_with_the_reason():
    cfg, model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 37))
    policy = {"chunk_size": 8, "topk": 2, "dense_last": 0}
    # A chunked prefill of 5 more tokens into the buffer: the graph-safe path would be O(Lq * slots); dense, exact,
    # with the reason.
    more = torch.randint(0, 64, (1, 5))
    kwargs = _prefilled(cfg, model, ids, transformers.StaticCache(config=cfg, max_cache_len=48))
    kwargs["cache_position"] = torch.arange(37, 42)
    report = explain(model, more, **kwargs, policy=policy)
    assert [s.decision for s in report.sites] == ["dense", "dense"]
    assert all("static KV cache buffer" in s.reason and "5 queries" in s.reason for s in report.sites)
    # min_seq_len cannot be applied to a length known only on the device.
    step = torch.randint(0, 64, (1, 1))
    kwargs = _prefilled(cfg, model, ids, transformers.StaticCache(config=cfg, max_cache_len=48))
    report = explain(model, step, **kwargs, policy={**policy, "min_seq_len": 16})
    assert [s.decision for s in report.sites] == ["dense", "dense"]
    assert all("min_seq_len 16" in s.reason for s in report.sites)


def test_sites_whose_topk_covers_every_chunk_are_flagged_effectively_dense():
    _, model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 16))
    covering = explain(model, ids, policy={"chunk_size": 8, "topk": 2, "dense_last": 0})
    assert [s.effectively_dense for s in covering.sites] == [True, True]
    assert "covers all 16 keys" in covering.sites[0].reason
    sparse = explain(model, ids, policy={"chunk_size": 4, "topk": 2, "dense_last": 1})
    assert [(s.decision, s.effectively_dense) for s in sparse.sites] == [("moba", False), ("dense", False)]


def _static_step(cfg, model, ids):
    def static():  # a new static cache per call (it keeps state)
        return _prefilled(cfg, model, ids, transformers.StaticCache(config=cfg, max_cache_len=48))

    return static


def test_dense_decode_split_k_runs_the_dense_layer_of_a_static_step_on_moba_dense_decode(monkeypatch):
    # dense_decode = "split_k" (the default) on the compile backend, as on the Hugging Face path: the policy's dense
    # layer of a static-cache decode step runs moba::dense_decode (length from the mask on the device), equal to the
    # same step with its SDPA call; the report says so. The MoBA layer still runs moba::static_decode. On the CPU the
    # split-K kernels do not take the step (impl "auto"), so the pass is told they do: the op then runs its graph-safe
    # reference, which is what this checks the wiring with.
    monkeypatch.setattr(ops, "split_k_unsupported_reason", lambda *args, **kwargs: None)
    cfg, model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 37))
    step = torch.randint(0, 64, (1, 1))
    policy = {"chunk_size": 8, "topk": 2, "dense_last": 1}
    static = _static_step(cfg, model, ids)
    results = {}
    for mode in ("sdpa", "split_k", None):  # None: the default
        torch._dynamo.reset()
        before = ops.CALLS.copy()
        chosen = policy if mode is None else {**policy, "dense_decode": mode}
        # Inductor for the split_k step (moba::dense_decode and moba::static_decode through Inductor, as users run
        # it); the other two under aot_eager: they check the pass's wiring, which runs before the compiler, and two
        # more Inductor compiles of the step would cost ~15 s on two cores.
        compiler = "inductor" if mode == "split_k" else "aot_eager"
        compiled = torch.compile(model, backend="moba", options={"policy": chosen, "compiler": compiler})
        with torch.no_grad():
            results[mode] = compiled(step, **static()).logits
        ran = ops.CALLS["dense_decode:reference"] - before["dense_decode:reference"]
        assert ran == (0 if mode == "sdpa" else 1), (mode, ran)
        assert ops.CALLS["static_decode:reference"] - before["static_decode:reference"] == 1
        # One length read per step, shared by the MoBA layer and the dense one (one mask node for both).
        assert ops.CALLS["static_length:reference"] - before["static_length:reference"] == 1
    torch.testing.assert_close(results["split_k"], results["sdpa"])
    torch.testing.assert_close(results[None], results["sdpa"])
    report = explain(model, step, **static(), policy=policy)
    dense = [s for s in report.sites if s.decision == "dense"]
    assert len(dense) == 1 and "dense_decode = 'split_k': one-query decode step" in dense[0].reason, report.sites
    report = explain(model, step, **static(), policy={**policy, "dense_decode": "sdpa"})
    dense = [s for s in report.sites if s.decision == "dense"]
    assert len(dense) == 1 and dense[0].reason.endswith("dense_decode = 'sdpa': this decode step's SDPA call as is")


def test_dense_decode_split_k_keeps_sdpa_where_the_kernels_do_not_take_the_step():
    # The default dense_decode = "split_k" on CPU tensors (impl "auto": the kernels run on CUDA only): the dense layer
    # keeps its SDPA call, bit for bit, and the report says why.
    cfg, model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 37))
    step = torch.randint(0, 64, (1, 1))
    policy = {"chunk_size": 8, "topk": 2, "dense_last": 1}
    static = _static_step(cfg, model, ids)
    results = {}
    for mode in ("sdpa", "split_k"):
        torch._dynamo.reset()
        before = ops.CALLS.copy()
        compiled = torch.compile(model, backend="moba", options={"policy": {**policy, "dense_decode": mode}})
        with torch.no_grad():
            results[mode] = compiled(step, **static()).logits
        assert ops.CALLS["dense_decode:reference"] == before["dense_decode:reference"], mode
    assert torch.equal(results["split_k"], results["sdpa"])
    report = explain(model, step, **static(), policy=policy)
    dense = [s for s in report.sites if s.decision == "dense"]
    assert len(dense) == 1, report.sites
    assert dense[0].reason.endswith("dense_decode = 'split_k' cannot run this step (CPU tensors): SDPA as is")
