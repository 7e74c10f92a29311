"""GPU-only: a dense layer's decode step on MoBA's split-K kernels (``moba::dense_decode``, ``dense_decode="split_k"``).

- The Triton kernels at realistic shapes (GQA 16/4 and 32/8, bf16/fp16, 8K-200K keys, rows of a static buffer at
  different lengths with data in the slots past them, a padding mask) against dense SDPA over each row's real keys.
- The step captured once in a CUDA graph and replayed while the device length grows in place (across the internal
  chunk's boundaries): each replay equals the same step run eagerly (bitwise) and SDPA over the real keys.
- A tiny Llama's greedy tokens over a StaticCache with the decode step compiled ``mode="reduce-overhead"`` are the same
  with ``dense_decode = "split_k"`` (the default) as with ``"sdpa"`` (the opt-out), the split-K op ran on the Triton
  kernels, and the report says which path each dense decode step took.
- The best-dense baseline of ``benchmarks.end_to_end`` (every layer dense, decode on the split-K kernels) gives the
  tokens of dense SDPA in a captured step.

Collected only where CUDA is available (``tests/conftest.py``); run with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import moba_compile.hf
from moba_compile import ops

assert os.environ.get("TRITON_INTERPRET", "0") in ("0", ""), "run the GPU tests with TRITON_INTERPRET=0"
CUDA = torch.device("cuda")
transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")


def _sdpa_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], mask: torch.Tensor | None):
    """Dense SDPA (fp32 math) of each row's one query over its first ``lengths[b]`` keys (and the mask)."""
    outs = []
    group = q.shape[1] // k.shape[1]
    for b, n in enumerate(lengths):
        kb = k[b : b + 1, :, :n].float().repeat_interleave(group, dim=1)
        vb = v[b : b + 1, :, :n].float().repeat_interleave(group, dim=1)
        mb = None if mask is None else mask[b : b + 1, :, :, :n]
        outs.append(F.scaled_dot_product_attention(q[b : b + 1].float(), kb, vb, attn_mask=mb))
    return torch.cat(outs)


@pytest.mark.parametrize(
    "hq, hkv, lengths, slots, dtype, padded",
    [
        (16, 4, [8192, 5000], 8192 + 64, torch.bfloat16, False),
        (16, 4, [131072, 70001], 131072 + 40, torch.bfloat16, True),
        (32, 8, [200_000, 1], 200_000 + 8, torch.float16, False),
        (16, 16, [4096 * 3, 4096 * 3 - 1], 4096 * 3 + 16, torch.bfloat16, True),
    ],
)
def test_split_k_dense_decode_equals_sdpa(hq, hkv, lengths, slots, dtype, padded) -> None:
    b, d = len(lengths), 128
    gen = torch.Generator(device=CUDA).manual_seed(0)
    q = torch.randn(b, hq, 1, d, device=CUDA, dtype=dtype, generator=gen)
    # Every slot holds data: slots at or past a row's length must never be read.
    k = torch.randn(b, hkv, slots, d, device=CUDA, dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, slots, d, device=CUDA, dtype=dtype, generator=gen)
    length = torch.tensor(lengths, device=CUDA)
    slot = torch.arange(slots, device=CUDA)
    mask = (slot < length[:, None])[:, None, None, :]  # what transformers' static-cache mask allows
    if padded:
        mask = mask & (slot >= 37)[None, None, None, :]  # left padding of 37 slots in every row
    before = ops.CALLS["dense_decode:triton"]
    out = ops.dense_decode(q, k, v, length=ops.static_length_from_mask(mask, b), attn_mask=mask, impl="triton")
    assert ops.CALLS["dense_decode:triton"] == before + 1
    _assert_rows_close(out, _sdpa_rows(q, k, v, lengths, mask if padded else None))


def _assert_rows_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Per batch row, within 1% of that row's largest value: a row over 100K keys has outputs of about 1e-2, where an
    absolute tolerance would also pass a wrong set of keys; 16-bit outputs round by 2**-8 relative."""
    for b in range(want.shape[0]):
        err = (got[b].float() - want[b]).abs().max().item()
        tol = 1e-2 * want[b].abs().max().item() + 1e-5
        assert err <= tol, (b, err, tol)


def test_captured_split_k_dense_decode_replays_with_growing_lengths() -> None:
    b, hq, hkv, d, slots = 2, 16, 4, 128, 3 * 4096 + 200
    gen = torch.Generator(device=CUDA).manual_seed(1)
    key = torch.randn(b, hkv, slots, d, device=CUDA, dtype=torch.bfloat16, generator=gen)
    value = torch.randn(b, hkv, slots, d, device=CUDA, dtype=torch.bfloat16, generator=gen)
    queries = torch.randn(300, b, hq, 1, d, device=CUDA, dtype=torch.bfloat16, generator=gen)
    start = torch.tensor([4096 - 150, 2 * 4096 - 100], device=CUDA)  # both rows cross a chunk boundary
    length = start.clone()
    q = torch.empty_like(queries[0])

    def step() -> torch.Tensor:
        return ops.dense_decode(q, key, value, length=length, impl="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        q.copy_(queries[0])
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for i in range(1, queries.shape[0]):
        q.copy_(queries[i])
        length.add_(1)
        graph.replay()
        eager = step()
        assert torch.equal(captured, eager), i
        if i % 50 == 0 or i == queries.shape[0] - 1:
            _assert_rows_close(captured, _sdpa_rows(q, key, value, length.tolist(), None))


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
    )  # fmt: skip
    # fp32: the two paths differ by summation order only, so greedy tokens cannot flip on a near tie as in bf16.
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(CUDA).eval()


@pytest.mark.parametrize("padded", [False, True])
def test_llama_graph_decode_split_k_equals_sdpa_tokens(padded) -> None:
    policy = {"chunk_size": 64, "topk": 3, "dense_last": 1}
    moba_compile.hf.register({**policy, "dense_decode": "sdpa"}, name="moba_dd_sdpa_cuda")
    split_k = moba_compile.hf.register(policy, name="moba_dd_splitk_cuda")  # the default: dense_decode = "split_k"
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 700), generator=torch.Generator().manual_seed(0)).to(CUDA)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :45] = 0
    config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
    tokens = {}
    for impl in ("moba_dd_sdpa_cuda", "moba_dd_splitk_cuda"):
        model.set_attn_implementation(impl)
        torch._dynamo.reset()
        before = ops.CALLS["dense_decode:triton"]
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=24, do_sample=False, cache_implementation="static",
                compile_config=config,
            )  # fmt: skip
        tokens[impl] = out[:, ids.shape[1] :]
        ran = ops.CALLS["dense_decode:triton"] - before
        # Eager steps count calls; captured replays do not, so only "some" for split_k and "none" for sdpa.
        assert (ran > 0) == (impl == "moba_dd_splitk_cuda"), (impl, ran)
    assert torch.equal(tokens["moba_dd_sdpa_cuda"], tokens["moba_dd_splitk_cuda"])
    dense_steps = [s for s in split_k.report().sites if s.layer == 2 and s.form == "kv-cache"]
    assert dense_steps and all("dense_decode = 'split_k': one-query decode step" in s.reason for s in dense_steps)


def test_best_dense_baseline_equals_dense_sdpa_tokens() -> None:
    """benchmarks.end_to_end's best-dense row: an all-dense policy (dense_decode = "split_k") in a captured step gives
    the greedy tokens of the same model on transformers' SDPA, and every decode step ran the split-K kernels."""
    from benchmarks.end_to_end import dense_decode_path

    attention = moba_compile.hf.register({"dense_last": 3}, name="all_dense_splitk_cuda")
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 500), generator=torch.Generator().manual_seed(3)).to(CUDA)
    mask = torch.ones_like(ids)
    mask[0, :31] = 0
    config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
    tokens = {}
    for impl in ("sdpa", "all_dense_splitk_cuda"):
        model.set_attn_implementation(impl)
        torch._dynamo.reset()
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=16, do_sample=False, cache_implementation="static",
                compile_config=config,
            )  # fmt: skip
        tokens[impl] = out[:, ids.shape[1] :]
    assert torch.equal(tokens["sdpa"], tokens["all_dense_splitk_cuda"])
    assert dense_decode_path(attention) == "split_k"
