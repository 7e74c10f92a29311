"""GPU-only: ``moba::dense_attention`` on CUDA, the op behind the policy's ``dense_sdpa = "flash_when_causal"``.

The flash branch calls ``aten._scaled_dot_product_flash_attention`` (and its backward) on unrepeated GQA key/value;
these tests check it against SDPA with the mask on repeated key/value (what a transformers dense layer ran) within
bf16 tolerance, forward and gradients, prefill and decode; the masked branch against the same SDPA call; and a tiny
Llama compiled with Inductor, trained one step with the option on and off.

Collected only where CUDA is available (``tests/conftest.py``); run with ``TRITON_INTERPRET=0``:

    TRITON_INTERPRET=0 python -m pytest -q tests/gpu/test_cuda_dense_flash.py
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import moba_compile
from moba_compile import dense_ops, ops
from moba_compile.masks import MASK_APPLY, MASK_CAUSAL, analyse_mask

assert os.environ.get("TRITON_INTERPRET", "0") in ("0", ""), "run the GPU tests with TRITON_INTERPRET=0"
CUDA = torch.device("cuda")
transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")

# bf16 against a bf16 SDPA run of another kernel: each rounds its output once (eps/2 relative), and the gradients sum
# over up to L keys in fp32 before rounding; 2e-2 absolute on O(1) values is a few bf16 ulps.
BF16 = {"rtol": 2e-2, "atol": 2e-2}
FLASH = "flash_when_causal"


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n, length, d).reshape(b, h * n, length, d)


def _inputs(lq: int, lk: int, hq: int = 8, hkv: int = 2, d: int = 128, dtype: torch.dtype = torch.bfloat16):
    torch.manual_seed(0)
    q = torch.randn(2, lq, hq, d, device=CUDA, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, hkv, lk, d, device=CUDA, dtype=dtype, requires_grad=True)
    v = torch.randn(2, hkv, lk, d, device=CUDA, dtype=dtype, requires_grad=True)
    pos = torch.arange(lq, device=CUDA)[:, None] + (lk - lq)
    mask = (torch.arange(lk, device=CUDA)[None, :] <= pos).expand(2, 1, lq, lk).clone()
    return q, k, v, mask


def _calls(before: dict[str, int]) -> dict[str, int]:
    return {
        k: n - before.get(k, 0)
        for k, n in ops.CALLS.items()
        if k.startswith("dense_attention") and n != before.get(k, 0)
    }


@pytest.mark.parametrize("length", [256, 1000])
def test_flash_branch_gqa_unrepeated_equals_masked_sdpa_forward_and_backward(length):
    q, k, v, mask = _inputs(length, length)
    assert analyse_mask(mask, length, length) == MASK_CAUSAL
    n_rep = q.shape[1] // k.shape[1]
    before = dict(ops.CALLS)
    out = dense_ops.dense_attention(q, k, v, mask, torch.tensor(MASK_CAUSAL), scale=128**-0.5, n_rep=n_rep)
    expected = F.scaled_dot_product_attention(q, _repeat(k, n_rep), _repeat(v, n_rep), attn_mask=mask)
    grad = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    assert _calls(before) == {"dense_attention:flash": 1, "dense_attention_backward:flash": 1}
    torch.testing.assert_close(out, expected, **BF16)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, **BF16)
    # Also against float64 math: flash is not merely close to the masked kernel but right.
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    exact = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out.double(), exact, **BF16)
    assert out.transpose(1, 2).is_contiguous()  # the layout flash writes; a model's transpose back is free


def test_flash_branch_decode_step_needs_no_mask():
    q, k, v, mask = _inputs(1, 3000)
    assert analyse_mask(mask, 1, 3000) == MASK_CAUSAL
    before = dict(ops.CALLS)
    with torch.no_grad():
        out = dense_ops.dense_attention(q, k, v, mask, torch.tensor(MASK_CAUSAL), scale=128**-0.5, n_rep=4)
        expected = F.scaled_dot_product_attention(q, _repeat(k, 4), _repeat(v, 4), attn_mask=mask)
    assert _calls(before) == {"dense_attention:flash": 1}
    torch.testing.assert_close(out, expected, **BF16)


def test_masked_branch_is_the_sdpa_call_it_replaces():
    q, k, v, mask = _inputs(512, 512)
    mask[0, ..., :17] = False  # left padding
    assert analyse_mask(mask, 512, 512) == MASK_APPLY
    before = dict(ops.CALLS)
    out = dense_ops.dense_attention(q, k, v, mask, torch.tensor(MASK_APPLY), scale=128**-0.5, n_rep=4)
    expected = F.scaled_dot_product_attention(q, _repeat(k, 4), _repeat(v, 4), attn_mask=mask, scale=128**-0.5)
    grad = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    assert _calls(before) == {"dense_attention:masked": 1, "dense_attention_backward:masked": 1}
    assert torch.equal(out, expected)  # the same kernel on the same inputs
    for g, e in zip(grads, expected_grads):  # SDPA's backward recomputed: its kernels may reduce in another order
        torch.testing.assert_close(g, e, **BF16)


def test_float32_on_cuda_keeps_the_masked_call():
    q, k, v, mask = _inputs(128, 128, dtype=torch.float32)
    assert "does not take torch.float32 on cuda" in dense_ops.flash_unsupported_reason(q, k, v)
    before = dict(ops.CALLS)
    with torch.no_grad():
        out = dense_ops.dense_attention(q, k, v, mask, torch.tensor(MASK_CAUSAL), scale=128**-0.5, n_rep=4)
        expected = F.scaled_dot_product_attention(q, _repeat(k, 4), _repeat(v, 4), attn_mask=mask, scale=128**-0.5)
    assert _calls(before) == {"dense_attention:masked": 1}
    assert torch.equal(out, expected)


def _llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(CUDA, torch.bfloat16)


def _train_step(model, policy, ids, mask):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moba", options={"policy": policy})
    before = dict(ops.CALLS)
    out = compiled(ids, attention_mask=mask, labels=ids, use_cache=False)
    out.loss.backward()
    torch.cuda.synchronize()
    return out.logits.detach(), [p.grad for p in model.parameters()], _calls(before)


def test_compiled_llama_training_step_runs_flash_in_its_dense_layer():
    length = 512
    ids = torch.randint(3, 256, (2, length), device=CUDA, generator=torch.Generator(CUDA).manual_seed(1))
    # The 4-D causal mask a torch 2.11 run gets from transformers (torch 2.13 would run is_causal without a mask).
    mask = torch.ones(length, length, dtype=torch.bool, device=CUDA).tril().expand(2, 1, length, length)
    policy = {"chunk_size": 128, "topk": 2, "dense_last": 1, "dense_sdpa": FLASH}
    model = _llama().train()
    reference = copy.deepcopy(model)
    logits, grads, calls = _train_step(model, policy, ids, mask)
    expected_logits, expected_grads, reference_calls = _train_step(
        reference, {**policy, "dense_sdpa": "as_is"}, ids, mask
    )
    assert calls == {"dense_attention:flash": 1, "dense_attention_backward:flash": 1}
    assert reference_calls == {}
    torch.testing.assert_close(logits, expected_logits, **BF16)
    for g, e in zip(grads, expected_grads):
        scale = float(e.abs().max()) or 1.0  # parameter gradients of a bf16 model: compare relative to their size
        torch.testing.assert_close(g / scale, e / scale, **BF16)
    report = moba_compile.explain(model, ids, attention_mask=mask, use_cache=False, policy=policy)
    assert report.dense_sites[0].reason.endswith("ran: flash (mask exactly causal)")
