"""GPU-only: graph-safe MoBA decode on a static KV cache (issue 16) under CUDA-graph capture and replay.

- The decode step (``ops.update_static_chunk_means_`` + ``ops.static_decode``, Triton) captured once in a CUDA graph
  and replayed while the device length grows in place, across chunk boundaries, with every future slot of the buffers
  holding data that must never be read: each replay equals the same step run eagerly (bitwise) and MoBA over the
  row's real keys (the reference, to bf16 rounding).
- The means the captured update keeps are bitwise the prefill gate's (one summation for both kernels), and the step's
  length read from the mask (``moba::static_length``, the compiled kernel) equals the reference at 512K and 1M slots,
  captured and replayed over a mask rewritten in place.
- ``generate(cache_implementation="static", compile_config=CompileConfig(...))`` (Inductor, mode="reduce-overhead":
  CUDA graphs) on a tiny Llama with ``attn_implementation="moba"`` gives the tokens of the eager MoBA generate over a
  dynamic cache, also for a left-padded batch; the MoBA decode steps ran the static op's Triton kernel.

Collected only where CUDA is available (``tests/conftest.py``); run with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import os

import pytest
import torch

import moba_compile.hf
from moba_compile import ops, reference

assert os.environ.get("TRITON_INTERPRET", "0") in ("0", ""), "run the GPU tests with TRITON_INTERPRET=0"
CUDA = torch.device("cuda")
transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")

CHUNK, TOPK = 64, 3
HF = moba_compile.hf.register({"chunk_size": CHUNK, "topk": TOPK, "dense_last": 1}, name="moba_static_cuda")


def test_captured_decode_step_replays_with_growing_lengths() -> None:
    b, hq, hkv, d, slots, chunk, topk = 2, 32, 8, 128, 4096 + 100, 512, 4
    gen = torch.Generator(device=CUDA).manual_seed(0)
    # Every slot holds data from the start: slots at or past a row's length must never be read.
    key = torch.randn(b, hkv, slots, d, device=CUDA, dtype=torch.bfloat16, generator=gen)
    value = torch.randn(b, hkv, slots, d, device=CUDA, dtype=torch.bfloat16, generator=gen)
    queries = torch.randn(700, b, hq, 1, d, device=CUDA, dtype=torch.bfloat16, generator=gen)
    start = torch.tensor([1500, 1100], device=CUDA)  # rows at different lengths
    means = ops.static_chunk_means_buffer(key, chunk)
    length = start.clone()
    ops.update_static_chunk_means_(means, key, length, new_tokens=int(start.max()), chunk_size=chunk)
    q = torch.empty_like(queries[0])

    def step() -> torch.Tensor:
        ops.update_static_chunk_means_(means, key, length, new_tokens=1, chunk_size=chunk, impl="triton")
        return ops.static_decode(
            q, key, value, chunk_means=means, length=length, chunk_size=chunk, topk=topk, impl="triton"
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and autotune outside the capture
        q.copy_(queries[0])
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for i in range(1, queries.shape[0]):
        length.add_(1)  # in place: the graph reads the new length on the device
        q.copy_(queries[i])
        calls = ops.CALLS["static_decode:triton"]
        graph.replay()
        replayed = captured.clone()
        assert ops.CALLS["static_decode:triton"] == calls  # a replay runs no Python: the captured kernels ran
        eager = step()  # the same step again (its means update rewrites the same rows with the same values)
        assert torch.equal(replayed, eager), f"step {i}"
        if i % 50 == 0 or i in (1, 2, 3):
            for row in range(b):
                n = int(length[row])
                ref, _ = reference.moba_attention_forward(
                    q[row : row + 1].double(),
                    key[row : row + 1, :, :n].double(),
                    value[row : row + 1, :, :n].double(),
                    chunk_size=chunk,
                    topk=topk,
                )
                torch.testing.assert_close(replayed[row : row + 1].double(), ref, atol=2e-2, rtol=0)
    assert int(length.min()) > 1100 + 512  # the rows crossed chunk boundaries during the replays
    # The means the captured update kept (averaged in place, only on the steps that completed a chunk) are bitwise the
    # prefill gate's means of the same keys: the compiled step kernel and the prefill kernel share one summation.
    for row in range(b):
        n = int(length[row])
        want = ops.chunk_means(key[row : row + 1, :, :n], chunk, impl="triton")[0]
        assert torch.equal(means[row, :, : n // chunk], want), row


@pytest.mark.parametrize("slots", [524_288 + 100, 1 << 20])
def test_static_length_kernel_in_a_graph_at_long_buffers(slots: int) -> None:
    """moba::static_length on the compiled kernel (blocks of 4096 slots and a merge) at 512K and 1M slots, captured
    once and replayed while the mask is rewritten in place: each replay equals the reference (any/flip/argmax), for
    left-padded rows, a full row, a row allowing only its first slot and a row allowing nothing."""
    b = 4
    mask = torch.zeros(b, 1, 1, slots, dtype=torch.bool, device=CUDA)

    def fill(n: int) -> None:
        mask.zero_()
        mask[0, ..., min(17, n - 1) : n] = True  # left padding
        mask[1, ..., : min(n + 4095, slots)] = True
        mask[2, ..., 0] = True
        # row 3 allows nothing: its length is every slot

    fill(5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        ops.static_length_from_mask(mask, b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.static_length_from_mask(mask, b)
    for n in (5, 4096, 4097, 300_001, slots - 1, slots):
        fill(n)
        graph.replay()
        want = ops.static_length_from_mask(mask, b, impl="reference")
        assert torch.equal(captured, want), (n, captured.tolist(), want.tolist())
        assert captured.tolist() == [n, min(n + 4095, slots), 1, slots]


def tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="moba_static_cuda")
    return model.to(CUDA).eval()


@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "left-padding"])
def test_generate_static_cache_compile_config_equals_eager_moba(padding: bool) -> None:
    model = tiny_llama()
    ids = torch.randint(3, 256, (2, 300), generator=torch.Generator().manual_seed(1)).to(CUDA)
    kw = dict(max_new_tokens=40, do_sample=False)
    if padding:
        kw["attention_mask"] = torch.ones_like(ids)
        kw["attention_mask"][1, :37] = 0
        ids[1, :37] = 0
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.generate(ids, **kw, **{moba_compile.hf.cache_keyword(): moba_compile.hf.MobaCache()})
        ops.CALLS.clear()
        torch._dynamo.utils.counters.clear()
        config = transformers.CompileConfig(fullgraph=True)  # Inductor, mode="reduce-overhead": CUDA graphs
        captured = model.generate(ids, cache_implementation="static", compile_config=config, **kw)
    assert torch.equal(captured, eager)
    # The compiled decode steps ran the static op's Triton kernel (2 MoBA layers), in CUDA graphs (no skip).
    assert ops.CALLS["static_decode:triton"] > 0
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
    decode = {s.layer: s for s in HF.report().sites if s.form == "kv-cache"}
    assert decode[0].decision == "moba" and "graph-safe step" in decode[0].reason
