"""GPU-only: whole models on CUDA. A tiny Llama (GQA, head dim 64) compiled with backend="moba" (Inductor) against the
same model running the float64 reference as its attention function: a training step, and greedy generation through
the compile path and through ``attn_implementation="moba"``.

Collected only where CUDA is available (``tests/conftest.py``); run with ``TRITON_INTERPRET=0`` (see ``test_cuda.py``).
Float32 models: the Triton kernels' fp32 path uses IEEE dots, so logits match the reference to fp32 rounding and
greedy tokens match exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

import moba_compile
import moba_compile.hf
from moba_compile import ops, reference

assert os.environ.get("TRITON_INTERPRET", "0") in ("0", ""), "run the GPU tests with TRITON_INTERPRET=0"
CUDA = torch.device("cuda")
transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

CHUNK, TOPK, LAYERS = 64, 3, 3
POLICY = {"chunk_size": CHUNK, "topk": TOPK, "dense_last": 1}


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    dense = module.layer_idx >= module.config.num_hidden_layers - 1
    topk = -(-key.shape[2] // CHUNK) if dense else TOPK  # every chunk: dense causal attention
    leaves = [t.double() for t in (query, key, value)]
    out = reference.moba_attention(*leaves, chunk_size=CHUNK, topk=topk, scale=scaling, attn_mask=attention_mask)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("moba_reference_cuda", reference_attention)
AttentionMaskInterface.register("moba_reference_cuda", sdpa_mask)
HF = moba_compile.hf.register(POLICY, name="moba_cuda")


def tiny_llama(attn: str, dtype: torch.dtype) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(CUDA, dtype)


def test_compiled_llama_training_step_matches_reference_on_cuda() -> None:
    model = tiny_llama("sdpa", torch.float32).train()
    oracle = tiny_llama("moba_reference_cuda", torch.float32).train()
    ids = torch.randint(3, 256, (2, 700), device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(2))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moba", options={"policy": POLICY})
    before = ops.CALLS["attention_backward:triton"]
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    assert ops.CALLS["attention_backward:triton"] >= before + 2, "the two MoBA layers must use the Triton backward"
    expected = oracle(ids, labels=ids).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)
    for (name, p), r in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-4, rtol=1e-3, msg=name)
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()  # an optimizer step on the compiled model's parameters
    assert torch.isfinite(compiled(ids, labels=ids).loss)


def test_generate_through_both_paths_matches_reference_on_cuda() -> None:
    ids = torch.randint(3, 256, (2, 600), device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :150] = 0  # left padding
    gen = dict(max_new_tokens=40, do_sample=False, attention_mask=mask)
    oracle = tiny_llama("moba_reference_cuda", torch.float32).eval()
    hf = tiny_llama("moba_cuda", torch.float32).eval()
    with torch.no_grad():
        expected = oracle.generate(ids, **gen)
        got = hf.generate(ids, past_key_values=moba_compile.hf.MobaCache(), **gen)
    assert torch.equal(got, expected)
    assert any(s.form == "kv-cache" and s.decision == "moba" for s in HF.report().sites)
    model = tiny_llama("sdpa", torch.float32).eval()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="moba", options={"policy": POLICY}, dynamic=True)
    with torch.no_grad():
        compiled = model.generate(ids, **gen)
    assert torch.equal(compiled, expected)
