"""Model coverage: tiny configs of six transformers architectures, through the compile backend (where the model uses
SDPA) and through ``attn_implementation="moba"`` (``moba_compile.hf.register``), against an independent MoBA oracle,
including greedy generation of left-padded batches."""

from __future__ import annotations

import copy

import pytest
import torch
from models import TINY_LLAMA, TOKEN_IDS
from naive import naive_moba

import moba_compile.hf
from moba_compile.backend import collect_reports

transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

torch._dynamo.config.fail_on_recompile_limit_hit = True

CHUNK, TOPK, LAYERS = 8, 2, 3
POLICY = {"chunk_size": CHUNK, "topk": TOPK, "dense_last": 1}
ATOL = 3e-5  # float32 model vs the float64 oracle cast to float32


def oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Oracle MoBA by layer, dense (all chunks) on the last layer and on sliding-window layers (mask applied)."""
    dense = module.layer_idx >= module.config.num_hidden_layers - 1 or kwargs.get("sliding_window") is not None
    out = naive_moba(query, key, value, CHUNK, 10**6 if dense else TOPK, scale=scaling, attn_mask=attention_mask)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("moba_oracle", oracle_attention)
AttentionMaskInterface.register("moba_oracle", sdpa_mask)
MOBA = moba_compile.hf.register(POLICY, name="moba_test")


def build(arch: str, attn: str = "sdpa", **overrides) -> torch.nn.Module:
    llama_like = {**TINY_LLAMA, **TOKEN_IDS, "num_hidden_layers": LAYERS}
    configs = {
        "llama": lambda: transformers.LlamaConfig(**llama_like),
        "qwen2": lambda: transformers.Qwen2Config(**llama_like, use_sliding_window=False),
        "mistral": lambda: transformers.MistralConfig(**llama_like, sliding_window=None),
        "phi3": lambda: transformers.Phi3Config(**llama_like),
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=64,
            n_embd=32,
            n_layer=LAYERS,
            n_head=4,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        "gemma2": lambda: transformers.Gemma2Config(
            **{**llama_like, "num_hidden_layers": 4}, head_dim=8, sliding_window=12, attn_logit_softcapping=None
        ),
    }
    cfg = configs[arch]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def twin(model: torch.nn.Module, attn: str) -> torch.nn.Module:
    other = copy.deepcopy(model)
    other.set_attn_implementation(attn)
    return other


def left_padded_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 64, (2, 37), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 0
    return ids, mask


GEN = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gpt2"])
def test_compile_path_prefill_matches_oracle(arch):
    model = build(arch)
    oracle = twin(model, "moba_oracle")
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moba", options={"policy": POLICY, "compiler": "aot_eager"})
    with collect_reports() as reports, torch.no_grad():
        logits = compiled(ids).logits
        expected = oracle(ids).logits
    assert [s.decision for s in reports[0].sites] == ["moba", "moba", "dense"]
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gpt2", "gemma2"])
def test_moba_attention_implementation_generates_like_oracle(arch):
    MOBA.reset_report()  # records are per module path: other architectures' paths would stay listed
    model = build(arch, attn="moba_test")
    oracle = twin(model, "moba_oracle")
    ids, mask = left_padded_batch(6)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **GEN)
        ref = oracle.generate(ids, attention_mask=mask, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    if arch == "gemma2":  # alternating sliding-window layers (0, 2) stay dense with the reason
        # A call MoBA does not serve has form "-"; prefill is "is_causal" or "mask", decode "kv-cache".
        report = {(s.layer, s.form == "kv-cache"): s for s in MOBA.report().sites}
        assert report[(0, False)].form == "-"
        assert report[(0, False)].decision == "dense" and "sliding-window" in report[(0, False)].reason
        assert report[(1, False)].form == "mask" and report[(1, False)].decision == "moba"
        assert report[(1, True)].decision == "moba"


def test_gemma2_soft_capping_stays_dense_and_exact():
    MOBA.reset_report()
    model = build("gemma2", attn="eager", attn_logit_softcapping=50.0)
    moba = twin(model, "moba_test")
    ids, mask = left_padded_batch(7)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        got = moba(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert all("soft-capped" in s.reason and s.form == "-" for s in MOBA.report().sites)


def test_training_through_attention_implementation_matches_oracle():
    model = build("llama", attn="moba_test").train()
    oracle = twin(model, "moba_oracle")
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(8))
    for m in (model, oracle):
        m(ids, labels=ids).loss.backward()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=1e-4, msg=name)


def test_compiled_sliding_window_mask_runs_dense_with_reason():
    """Through the compile backend a sliding window is only a boolean mask: the run-time check must route it dense."""
    model = build("mistral", sliding_window=12)
    ids = torch.randint(3, 64, (1, 40), generator=torch.Generator().manual_seed(9))
    report = moba_compile.explain(
        model, ids, policy={**POLICY, "dense_last": 0}, use_cache=False, attention_mask=torch.ones_like(ids)
    )
    assert all(s.decision == "dense" and "sliding window" in s.reason for s in report.sites), str(report)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moba", options={"policy": POLICY, "compiler": "aot_eager"})
    with torch.no_grad():
        got = compiled(ids, use_cache=False, attention_mask=torch.ones_like(ids)).logits
        expected = model(ids, use_cache=False, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_moba_cache_keeps_chunk_means_and_generates_like_dynamic_cache():
    MOBA.reset_report()
    model = build("llama", attn="moba_test")
    oracle = twin(model, "moba_oracle")
    ids, mask = left_padded_batch(10)
    cache = moba_compile.hf.MobaCache()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **{moba_compile.hf.cache_keyword(): cache}, **GEN)
        ref = oracle.generate(ids, attention_mask=mask, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    decode = [s for s in MOBA.report().sites if s.form == "kv-cache" and s.decision == "moba"]
    assert decode and all("chunk means from MobaCache" in s.reason for s in decode)
    # The means kept chunk by chunk during generation are bitwise those of the one means computation
    # (ops.chunk_means, which the gate and decode kernels use) over the whole cache: complete chunks only.
    layer = cache.layers[0]
    keys = layer.keys
    means = layer.chunk_means(CHUNK, keys)
    assert means.shape[2] == keys.shape[2] // CHUNK >= 2
    assert torch.equal(means, moba_compile.ops.chunk_means(keys, CHUNK))
    n_complete = keys.shape[2] // CHUNK
    expected = moba_compile.reference.chunk_means(keys, CHUNK)[:, :, :n_complete]
    torch.testing.assert_close(means, expected, atol=1e-6, rtol=1e-6)


def test_autocast_mixed_dtypes_convert_in_both_paths():
    """Under bf16 autocast, transformers hands SDPA fp32 q/k and a bf16 v; SDPA would cast all to bf16, so do we."""
    model = build("llama")
    ids = torch.randint(3, 64, (1, 40), generator=torch.Generator().manual_seed(11))
    kw = dict(use_cache=False, attention_mask=torch.ones_like(ids))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = moba_compile.explain(model, ids, policy=POLICY, **kw)
        assert [s.decision for s in report.sites] == ["moba", "moba", "dense"], str(report)
        assert all("cast to bfloat16" in s.reason for s in report.moba_sites)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="moba", options={"policy": POLICY, "compiler": "aot_eager"})
        with torch.no_grad():
            got = compiled(ids, **kw).logits
            expected = twin(model, "moba_test")(ids, **kw).logits  # the attn_implementation path, eager
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)  # both bf16; op order differs between the paths


def _compile_layers(model, policy) -> None:
    torch._dynamo.reset()
    backend = moba_compile.make_backend({"policy": policy, "compiler": "eager"})
    for layer in model.model.layers:
        layer.compile(backend=backend)


def test_graphs_broken_at_layer_boundaries_apply_only_layer_independent_policies():
    """Compiling each decoder layer on its own (as FSDP2's graph breaks do) gives graphs rooted inside a layer, which
    Dynamo reuses for every layer: a policy that treats layers alike applies (the report names the layer the graph was
    traced for, by its path in the model, and the layers it serves), a per-layer one is refused instead of being
    applied to the wrong layers."""
    model = build("llama")
    ids = torch.randint(3, 64, (1, 40), generator=torch.Generator().manual_seed(12))
    _compile_layers(model, {**POLICY, "dense_last": 0, "num_layers": LAYERS})
    with collect_reports() as reports, torch.no_grad():
        model(ids, use_cache=False)
    [site] = [s for r in reports for s in r.sites]  # one graph, reused by all three layers
    assert (site.module, site.layer, site.decision) == ("model.layers.0.self_attn", 0, "moba")
    assert "serves layers 0..2, decided alike" in site.reason
    _compile_layers(model, {**POLICY, "num_layers": LAYERS})  # dense_last=1: layer-dependent
    with pytest.raises(Exception, match="starts inside a layer.*Compile the whole model"), torch.no_grad():
        model(ids, use_cache=False)
    _compile_layers(model, None)  # the default policy (dense_last=3 of 3 layers here: all dense, layer-independent)
    with collect_reports() as reports, torch.no_grad():
        model(ids, use_cache=False)
    assert [s.decision for r in reports for s in r.sites] == ["dense"]


def test_dynamic_true_traced_float_scale_converts():
    """With dynamic=True, Dynamo traces the attention's float ``scaling`` attribute as a graph input (a SymFloat
    node): the pass must pass it to the op at run time, not crash or bake a value in."""
    model = build("llama")
    oracle = twin(model, "moba_oracle")
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(12))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moba", options={"policy": POLICY, "compiler": "aot_eager"}, dynamic=True)
    with collect_reports() as reports, torch.no_grad():
        logits = compiled(ids).logits
        expected = oracle(ids).logits
    assert [s.decision for s in reports[0].sites] == ["moba", "moba", "dense"], str(reports[0])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_dynamic_true_training_matches_oracle():
    model = build("llama").train()
    oracle = twin(model, "moba_oracle")
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(13))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moba", options={"policy": POLICY, "compiler": "aot_eager"}, dynamic=True)
    compiled(ids, labels=ids).loss.backward()
    oracle(ids, labels=ids).loss.backward()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=1e-4, msg=name)


def test_dense_decode_sdpa_context_leaves_only_cudnn_out():
    # The dense layers of a decode step run SDPA without cuDNN (a graph build per key length on CUDA), keeping the
    # user's choice of the other backends, and restore everything afterwards.
    before = {
        name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
        for name in ("flash", "mem_efficient", "math", "cudnn")
    }
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        with moba_compile.hf.attention._without_cudnn_sdpa():
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            assert not torch.backends.cuda.flash_sdp_enabled()  # the user's "off" stays off
            assert torch.backends.cuda.math_sdp_enabled() == before["math"]
            assert torch.backends.cuda.mem_efficient_sdp_enabled() == before["mem_efficient"]
            q = torch.randn(1, 2, 1, 16)
            k = torch.randn(1, 2, 5, 16)
            torch.testing.assert_close(
                torch.nn.functional.scaled_dot_product_attention(q, k, k),
                torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ k,
            )
        assert torch.backends.cuda.cudnn_sdp_enabled() == before["cudnn"]
    finally:
        torch.backends.cuda.enable_flash_sdp(before["flash"])
    assert moba_compile.hf.MobaAttention(policy=moba_compile.load_policy(None)).skip_cudnn_in_decode
