"""GPU-only: a tiny Llama exported (``torch.export``), rewritten by ``moba_compile.export.apply``, compiled by
AOTInductor into a package, loaded and run on CUDA: the MoBA calls run the Triton kernels, and greedy tokens equal those
of the same model running MoBA eagerly (``attn_implementation="moba"``).

Collected only where CUDA is available (``tests/conftest.py``); run with ``TRITON_INTERPRET=0`` (see ``test_cuda.py``).
Float32 models: the Triton kernels' fp32 path uses IEEE dots, so logits match to fp32 rounding (AOTInductor fuses the
rest of the model differently) and greedy tokens match exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

import moba_compile
import moba_compile.export
import moba_compile.hf
from moba_compile import ops

assert os.environ.get("TRITON_INTERPRET", "0") in ("0", ""), "run the GPU tests with TRITON_INTERPRET=0"
CUDA = torch.device("cuda")
transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")

CHUNK, TOPK, LAYERS = 64, 3, 3
POLICY = {"chunk_size": CHUNK, "topk": TOPK, "dense_last": 1}
HF = moba_compile.hf.register(POLICY, name="moba_cuda_export")


def tiny_llama(attn: str) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(CUDA).eval()


@torch.no_grad()
def greedy(forward, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens from whole-sequence forwards (no KV cache), and the first step's logits."""
    tokens, first = [], None
    for _ in range(new_tokens):
        logits = forward(ids, mask)
        first = logits if first is None else first
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return torch.cat(tokens, dim=1), first


def test_aoti_package_runs_moba_triton_with_the_eager_tokens(tmp_path) -> None:
    model = tiny_llama("sdpa")
    ids = torch.randint(3, 256, (2, 700), device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :90] = 0  # left padding: the boolean mask form, with a mask MoBA applies (MASK_APPLY)
    ids[1, :90] = 0
    seq = torch.export.Dim.DYNAMIC  # a named Dim trips a torch 2.11 guard on this model (docs/export.md)
    program, report = moba_compile.export.export(
        model,
        (ids,),
        {"attention_mask": mask, "use_cache": False},
        dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}, "use_cache": None},
        policy=POLICY,
    )
    assert [(s.layer, s.decision, s.impl) for s in report.sites] == [
        (0, "moba", "triton"),
        (1, "moba", "triton"),
        (2, "dense", "-"),
    ]
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "moba.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    before = ops.CALLS["attention:triton"]
    packaged, packaged_first = greedy(
        lambda x, m: runner(x, attention_mask=m, use_cache=False).logits, ids, mask, new_tokens=12
    )
    assert ops.CALLS["attention:triton"] - before == 2 * 12, "each forward of the package runs 2 MoBA layers on Triton"
    rewritten = program.module()
    _, program_first = greedy(lambda x, m: rewritten(x, attention_mask=m, use_cache=False).logits, ids, mask, 1)
    eager_model = tiny_llama("moba_cuda_export")
    eager, eager_first = greedy(
        lambda x, m: eager_model(x, attention_mask=m, use_cache=False).logits, ids, mask, new_tokens=12
    )
    real = mask.bool()  # padded query rows attend to nothing: their logits are not compared
    torch.testing.assert_close(packaged_first[real], program_first[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packaged_first[real], eager_first[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(packaged, eager)
    dense = tiny_llama("sdpa")
    with torch.no_grad():
        dense_logits = dense(ids, attention_mask=mask, use_cache=False).logits
    assert not torch.allclose(packaged_first[real], dense_logits[real], atol=1e-3), "MoBA must differ from dense here"
