"""The policy's ``dense_decode`` on the Hugging Face path: with ``"split_k"`` (the default) the dense layers of a
one-query decode step run ``moba::dense_decode`` (MoBA's split-K decode kernels with every earlier chunk) where the
kernels take the step, and keep their SDPA call elsewhere; ``"sdpa"`` opts out. Same greedy tokens either way, eager
and in a compiled static-cache step; the report says which path each dense decode step ran.

On CPU (impl "auto") the split-K kernels never take a step, so these tests check the fallback as it is, and the wiring
of the op with the kernel check told to pass (``served``): the op then runs its graph-safe reference (head dim 8).
The kernels through this path, interpreted, are tested in tests/test_kernels_dense_decode.py (the interpreter of the
oldest supported Triton, which CI runs the test_hf* modules on, cannot run the decode kernels).
"""

from __future__ import annotations

import pytest
import torch
from models import TINY_LLAMA, TOKEN_IDS

import moba_compile.hf
from moba_compile import ops

transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")

# Layers 0-1 MoBA, layer 2 dense by dense_last.
BASE = {"chunk_size": 8, "topk": 2, "dense_last": 1}
SPLIT = moba_compile.hf.register({**BASE, "dense_decode": "split_k"}, name="moba_dd_split")
SDPA = moba_compile.hf.register({**BASE, "dense_decode": "sdpa"}, name="moba_dd_sdpa")
DEFAULT = moba_compile.hf.register(BASE, name="moba_dd_default")
LLAMA = {**TINY_LLAMA, **TOKEN_IDS}
SPLIT_NOTE = "dense_decode = 'split_k': one-query decode step"
FALLBACK_NOTE = "dense_decode = 'split_k' cannot run this step (CPU tensors): SDPA as is"
SDPA_NOTE = "dense_decode = 'sdpa': this decode step's SDPA call as is"


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split-K kernel check passes whatever the inputs: the op runs (its reference, on CPU tensors)."""
    monkeypatch.setattr(ops, "split_k_unsupported_reason", lambda *args, **kwargs: None)


def build(attn: str, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**{**LLAMA, **config}), attn_implementation=attn
    ).eval()


def prompt(padding: bool, batch: int = 2, length: int = 30, seed: int = 3) -> tuple[torch.Tensor, dict]:
    ids = torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))
    kw: dict = {}
    if padding:
        kw["attention_mask"] = torch.ones_like(ids)
        kw["attention_mask"][0, :7] = 0
        ids[0, :7] = 0
    return ids, kw


def _decode_records(attention: moba_compile.hf.MobaAttention) -> dict[int | None, object]:
    return {s.layer: s for s in attention.report().sites if s.form == "kv-cache"}


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "left-padding"])
def test_split_k_generates_the_tokens_of_sdpa(cache, padding, served):
    """Greedy tokens and scores of "split_k" equal "sdpa"'s; every decode step of the dense layer ran the op (CALLS),
    the MoBA layers' steps did not, and the report says which layer ran it."""
    ids, kw = prompt(padding)
    kw.update(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        ops.CALLS.clear()
        want = build("moba_dd_sdpa").generate(ids, **kw)
        assert ops.CALLS["dense_decode:reference"] == 0  # the opt-out never runs it
        SPLIT.reset_report()
        got = build("moba_dd_split").generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # 7 decode steps after the prefill, one dense layer each; the prefill (several queries) kept SDPA.
    assert ops.CALLS["dense_decode:reference"] == 7
    decode = _decode_records(SPLIT)
    assert decode[2].decision == "dense" and SPLIT_NOTE in decode[2].reason
    assert all(decode[i].decision == "moba" and SPLIT_NOTE not in decode[i].reason for i in (0, 1))
    how = "length read from the mask" if cache == "static" or padding else "all keys"
    assert how in decode[2].reason


def _compile_config() -> transformers.CompileConfig:
    # As tests/test_hf_static_cache.py: aot_eager traces the graph (fullgraph: a graph break fails) without Inductor.
    config = transformers.CompileConfig(backend="aot_eager", mode=None, fullgraph=True)
    config._compile_all_devices = True
    return config


def test_compiled_static_step_split_k_equals_sdpa(served):
    """generate(cache_implementation="static", compile_config=...) compiles the decode step (fullgraph) with the
    dense layer's moba::dense_decode inside (each row's length read from the mask on the device; one row left-padded):
    the tokens of "sdpa"."""
    ids, kw = prompt(True, length=36, seed=8)
    kw.update(max_new_tokens=10, do_sample=False)
    torch._dynamo.reset()
    with torch.no_grad():
        want = build("moba_dd_sdpa").generate(ids, **kw)
        ops.CALLS.clear()
        SPLIT.reset_report()
        got = build("moba_dd_split").generate(
            ids, cache_implementation="static", compile_config=_compile_config(), **kw
        )
    assert torch.equal(got, want)
    assert ops.CALLS["dense_decode:reference"] == 9  # every compiled decode step ran it in layer 2
    assert ops.CALLS["static_decode:reference"] == 2 * 9  # the MoBA layers' graph-safe op, unchanged
    decode = _decode_records(SPLIT)
    assert decode[2].decision == "dense" and SPLIT_NOTE in decode[2].reason


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_default_keeps_sdpa_where_the_kernels_do_not_take_the_step_and_says_why(cache):
    """The default ("split_k") on CPU tensors: the split-K kernels do not take the step, so the dense layer keeps its
    SDPA call (the tokens and scores of the "sdpa" opt-out, bitwise) and every decode record says why; the opt-out's
    records say it ran SDPA by the policy. Prefill records carry neither note."""
    ids, kw = prompt(True)
    kw.update(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        SDPA.reset_report()
        want = build("moba_dd_sdpa").generate(ids, **kw)
        ops.CALLS.clear()
        DEFAULT.reset_report()
        got = build("moba_dd_default").generate(ids, **kw)
    assert ops.CALLS["dense_decode:reference"] == 0 and ops.CALLS["dense_decode:triton"] == 0
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, want.scores))
    for attention, note in ((DEFAULT, FALLBACK_NOTE), (SDPA, SDPA_NOTE)):
        sites = attention.report().sites
        dense_steps = [s for s in sites if s.layer == 2 and s.form == "kv-cache"]
        assert dense_steps and all(s.reason.endswith(note) for s in dense_steps), dense_steps
        assert not any(note in s.reason for s in sites if s.form != "kv-cache")
        assert not any("dense_decode" in s.reason for s in sites if s.layer != 2)


def test_default_split_k_fallback_under_torch_compile_keeps_sdpa():
    """The same decision inside a compiled static-cache step (fullgraph: the kernel check traces as constants): the
    dense layer keeps SDPA on CPU tensors, the tokens are the opt-out's, and the record says why."""
    ids, kw = prompt(True, length=36, seed=8)
    kw.update(max_new_tokens=6, do_sample=False)
    torch._dynamo.reset()
    with torch.no_grad():
        want = build("moba_dd_sdpa").generate(ids, **kw)
        ops.CALLS.clear()
        DEFAULT.reset_report()
        got = build("moba_dd_default").generate(
            ids, cache_implementation="static", compile_config=_compile_config(), **kw
        )
    assert torch.equal(got, want)
    assert ops.CALLS["dense_decode:reference"] == 0
    assert ops.CALLS["static_decode:reference"] == 2 * 5  # the MoBA layers' graph-safe op, unchanged
    decode = _decode_records(DEFAULT)
    assert decode[2].decision == "dense" and decode[2].reason.endswith(FALLBACK_NOTE)
