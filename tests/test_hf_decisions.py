"""One decision path: the compile pass (``explain``) and the Hugging Face attention function (``MobaAttention.report``)
decide and word the same call alike (moba_compile.decisions), and report ``form`` from one set of values."""

from __future__ import annotations

import pytest
import torch
from models import TINY_LLAMA

import moba_compile
import moba_compile.hf
from moba_compile.decisions import REASONS, decide_site, reason
from moba_compile.report import FORMS, SiteRecord

transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")

# Layer 0 dense by a rule, layer 1 MoBA, layer 2 dense by dense_last.
POLICY = {"chunk_size": 8, "topk": 2, "dense_last": 1, "rules": [{"layers": [0], "mode": "dense"}]}
LLAMA = TINY_LLAMA


def _tiny_llama(attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**LLAMA)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def _by_layer(records: list[SiteRecord]) -> dict[int | None, tuple]:
    return {r.layer: (r.module, r.decision, r.chunk_size, r.topk, r.form, r.reason) for r in records}


def test_explain_and_attention_report_decide_and_word_alike():
    """The same model, policy and inputs: the same decision, parameters, form and reason per layer, both paths.

    A padding mask, so that both paths get a boolean mask on every supported torch (inside torch.compile, torch 2.11
    always gets one; eager transformers leaves an all-true mask out). The pass sees key/value repeated by repeat_kv,
    which it notes ("repeat_kv seen through"): a note only the pass can make, after the shared reason."""
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    padding = torch.ones_like(ids)
    padding[1, :5] = 0
    kwargs = {"attention_mask": padding, "use_cache": False}
    model = _tiny_llama("sdpa")
    compiled = _by_layer(moba_compile.explain(model, ids, policy=POLICY, **kwargs).sites)
    attention = moba_compile.hf.register(POLICY, name="moba_decisions")
    model.set_attn_implementation("moba_decisions")
    with torch.no_grad():
        model(ids, **kwargs)
    served = _by_layer(attention.report().sites)
    assert sorted(compiled) == sorted(served) == [0, 1, 2]
    for layer in (0, 1, 2):
        c, s = compiled[layer], served[layer]
        assert c[:5] == s[:5], (c, s)
        assert c[5].replace("; repeat_kv seen through (key/value not repeated)", "") == s[5], (c, s)
    assert compiled[0][1] == "dense" and compiled[0][5] == "rule 0 (layers=[0])"
    assert compiled[2][1] == "dense" and compiled[2][5].startswith("dense_last=1")
    assert compiled[1][1:4] == ("moba", 8, 2)
    assert compiled[1][4] == served[1][4] == "mask"


def test_decide_site_words_the_shared_cases_once():
    """The reasons of the shared cases come from REASONS, and every record's form is one of FORMS."""
    policy = moba_compile.load_policy({"chunk_size": 8, "topk": 2, "dense_last": 0, "min_seq_len": 32})
    common = dict(module="layers.0.attn", layer=0, attention_layers=[0])
    blocked = decide_site(policy, form="mask", blocker=reason("float_mask", dtype=torch.float32), **common)
    assert (blocked.mode, blocked.form) == ("dense", "-") and "float (additive) mask" in blocked.reason
    short = decide_site(policy, form="is_causal", len_k=16, **common)
    assert short.mode == "dense" and short.reason == REASONS["min_seq_len"].format(len_k=16, min_seq_len=32)
    wide = moba_compile.load_policy({"chunk_size": 8, "topk": 4, "dense_last": 0, "min_seq_len": 32})
    covering = decide_site(wide, form="is_causal", len_k=32, **common)  # top-4 of chunk 8: all 32 keys
    assert covering.mode == "moba" and covering.effectively_dense and "covers all 32 keys" in covering.reason
    unknown = decide_site(policy, form="kv-cache", decode=True, **common)
    assert "dense below min_seq_len 32 at run time" in unknown.reason and not unknown.effectively_dense
    dense_decode = moba_compile.load_policy({"dense_last": 0, "decode": "dense"})
    decoded = decide_site(dense_decode, form="kv-cache", decode=True, **common)
    assert decoded.mode == "dense" and decoded.form == "kv-cache" and decoded.reason == reason("decode_dense")
    assert {decided.form for decided in (blocked, short, covering, unknown, decoded)} <= set(FORMS)
    with pytest.raises(ValueError, match="form"):
        SiteRecord("a", 0, "dense", None, None, "x", form="prefill")


def test_attention_function_and_pass_word_a_blocker_alike():
    """A float mask: the attention function and the pass both report the float_mask reason, with form '-'."""
    attention = moba_compile.hf.MobaAttention(policy=moba_compile.load_policy({"dense_last": 0}))

    class Causal(torch.nn.Module):
        layer_idx, is_causal = 0, True

    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    float_mask = torch.zeros(1, 1, 16, 16)
    attention(Causal(), q, k, v, float_mask)
    [record] = attention.report().sites
    assert record.form == "-" and record.reason == reason("float_mask", dtype=torch.float32)

    def functional(q, k, v, m):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)

    [site] = moba_compile.explain(functional, q, k, v, float_mask, policy={"dense_last": 0}).sites
    assert site.form == "-" and site.reason == record.reason
