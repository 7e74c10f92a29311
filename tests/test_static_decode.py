"""Graph-safe MoBA decode on a static KV cache (issue 16): ``moba::static_decode`` and its means update.

The length of each batch row is a device tensor; the ops must give what the dynamic-cache path gives on the row's
first ``length`` keys (the reference on the cut keys, and bitwise the Triton decode kernel on the cut keys with the
same means), keep the means buffer right across chunk boundaries, and work when the same tensors are reused with a
growing length (what a CUDA graph replay does). The Triton kernels run interpreted on small shapes.
"""

from __future__ import annotations

import pytest
import torch

from moba_compile import kernels, ops, reference
from moba_compile.kernels import launch as kernel_launch


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    # Launcher buffers start as NaN / max int: an output no kernel wrote fails the comparison.
    monkeypatch.setattr(kernel_launch, "POISON_BUFFERS", True)


def _qkv(b, hq, hkv, lq, slots, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, slots, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, slots, d, generator=gen).to(dtype)
    return q, k, v


def _filled_means(key: torch.Tensor, length: torch.Tensor, chunk: int, impl: str) -> torch.Tensor:
    means = ops.static_chunk_means_buffer(key, chunk)
    means.fill_(float("nan"))  # rows past the length are never read: NaN there must not reach any output
    ops.update_static_chunk_means_(means, key, length, new_tokens=key.shape[2], chunk_size=chunk, impl=impl)
    return means


@pytest.mark.parametrize("lq", [1, 3])
@pytest.mark.parametrize("lengths", [[3, 7], [8, 9], [16, 17], [30, 37]], ids=lambda x: "L" + "-".join(map(str, x)))
def test_reference_equals_moba_on_the_real_keys(lengths, lq):
    """Per-row lengths at and around chunk boundaries, GQA, a padding mask, Lq = 1 and a chunked step of 3 rows."""
    slots, chunk, topk = 37, 4, 3
    q, k, v = _qkv(2, 4, 2, lq, slots, 8, torch.float64, seed=sum(lengths) + lq)
    length = torch.tensor(lengths)
    pad = torch.ones(2, 1, 1, slots, dtype=torch.bool)
    pad[1, :, :, :2] = False  # left padding of row 1
    means = _filled_means(k, length, chunk, "reference")
    out, lse = reference.moba_static_decode_forward(
        q, k, v, length, chunk_size=chunk, topk=topk, attn_mask=pad, chunk_means=means
    )
    for b, n in enumerate(lengths):
        ref, ref_lse = reference.moba_attention_forward(
            q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], chunk_size=chunk, topk=topk,
            attn_mask=pad[b : b + 1, :, :, :n],
        )  # fmt: skip
        torch.testing.assert_close(out[b : b + 1], ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(lse[b : b + 1], ref_lse, atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunk", [16, 64])
def test_update_means_across_chunk_boundaries_equals_chunk_means(chunk):
    """A prefill of 13 keys, then one key per step up to the buffer's end (70 slots, chunk 16 or 64: not a multiple),
    with the same length tensor incremented in place: the buffer's complete rows are bitwise ops.chunk_means of the
    keys, on both paths (the Triton one averages a completed chunk in place, in 4 or 1 blocks of 16 keys interpreted);
    rows not yet complete are left alone."""
    slots = 70
    _, k, _ = _qkv(2, 2, 2, 1, slots, 16, torch.float32, seed=3)
    for impl in ("reference", "triton"):
        means = ops.static_chunk_means_buffer(k, chunk)
        assert means.shape == (2, 2, slots // chunk, 16)
        means.fill_(-7.0)
        length = torch.tensor(13)
        ops.update_static_chunk_means_(means, k, length, new_tokens=13, chunk_size=chunk, impl=impl)
        for n in range(13, slots + 1):
            if n > 13:
                length.add_(1)  # in place, as a static cache's counter: a graph replay sees the same tensor
                ops.update_static_chunk_means_(means, k, length, new_tokens=1, chunk_size=chunk, impl=impl)
            done = n // chunk
            expect = ops.chunk_means(k[:, :, :n], chunk, impl=impl)
            assert torch.equal(means[:, :, :done], expect), (impl, n)
            assert bool((means[:, :, done:] == -7.0).all()), (impl, n)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_update_means_chunked_steps_and_per_row_lengths(impl):
    """Steps of several keys completing several chunks at once, rows at different lengths, on both paths."""
    slots, chunk = 64, 16
    _, k, _ = _qkv(2, 2, 2, 1, slots, 16, torch.float32, seed=5)
    means = ops.static_chunk_means_buffer(k, chunk)
    # Row 1 is 6 keys ahead of row 0 (the step's keys are shared: a batch's steps have one Lq): steps of 5, 17, 18.
    for end, new in (((5, 11), 5), ((22, 28), 17), ((40, 46), 18)):
        ops.update_static_chunk_means_(means, k, torch.tensor(end), new_tokens=new, chunk_size=chunk, impl=impl)
        for b, n in enumerate(end):
            expect = ops.chunk_means(k[b : b + 1, :, :n], chunk, impl=impl)[0]
            assert torch.equal(means[b, :, : n // chunk], expect), (end, b)
    assert bool((means[:, :, 46 // chunk :] == 0).all()), "rows no step completed stay untouched"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernel_equals_dynamic_decode_kernel(dtype):
    """The static kernel (length on the device, fixed grid over 3 x 32 + 8 slots) against the dynamic decode kernel on
    the cut keys: bitwise, for lengths before, at and after chunk boundaries, with and without a padding mask; and the
    reference within the data's low-precision error."""
    slots, chunk, topk = 104, 32, 3
    q, k, v = _qkv(2, 4, 2, 1, slots, 64, dtype, seed=11)
    pad = torch.ones(2, 1, 1, slots, dtype=torch.bool)
    pad[0, :, :, :3] = False
    for lengths in ([1, 31], [32, 33], [64, 104]):
        length = torch.tensor(lengths)
        means = _filled_means(k, length, chunk, "triton")
        for mask in (None, pad):
            out, lse = torch.ops.moba.static_decode(q, k, v, means, length, mask, chunk, topk, 0.125, "triton")
            for b, n in enumerate(lengths):
                m = None if mask is None else mask[b : b + 1, :, :, :n]
                o, lo = kernels.moba_decode_triton(
                    q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], chunk, topk, 0.125, m
                )
                assert torch.equal(out[b : b + 1], o) and torch.equal(lse[b : b + 1], lo), (lengths, b)
            ref, _ = reference.moba_static_decode_forward(
                q.double(), k.double(), v.double(), length, chunk_size=chunk, topk=topk, scale=0.125, attn_mask=mask
            )
            atol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 output rounding (2**-8 relative) on values < 4
            torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)


def test_growing_length_with_the_same_tensors_as_graph_replay():
    """One step function over fixed buffers (keys written in place, the length tensor incremented in place), called
    as a graph replay would: every step equals the dynamic-cache path over the keys so far; under torch.compile
    (fullgraph, one graph for every length) too, which also proves the ops need no host value of the length."""
    slots, chunk, topk, b, hkv, hq, d = 40, 8, 2, 2, 2, 4, 16
    gen = torch.Generator().manual_seed(2)
    stream_k = torch.randn(b, hkv, slots, d, generator=gen)
    stream_v = torch.randn(b, hkv, slots, d, generator=gen)
    stream_q = torch.randn(slots, b, hq, 1, d, generator=gen)
    prefill = 10

    def run(step):
        k = torch.zeros(b, hkv, slots, d)
        v = torch.zeros(b, hkv, slots, d)
        k[:, :, :prefill], v[:, :, :prefill] = stream_k[:, :, :prefill], stream_v[:, :, :prefill]
        means = ops.static_chunk_means_buffer(k, chunk)
        length = torch.tensor(prefill)
        ops.update_static_chunk_means_(means, k, length, new_tokens=prefill, chunk_size=chunk)
        outs = []
        for n in range(prefill, slots):
            k[:, :, n], v[:, :, n] = stream_k[:, :, n], stream_v[:, :, n]
            length.add_(1)
            outs.append(step(stream_q[n], k, v, means, length).clone())
        return outs

    def step(q, k, v, means, length):
        ops.update_static_chunk_means_(means, k, length, new_tokens=1, chunk_size=chunk)
        return ops.static_decode(q, k, v, chunk_means=means, length=length, chunk_size=chunk, topk=topk)

    eager = run(step)
    torch._dynamo.reset()
    counters_before = dict(torch._dynamo.utils.counters["stats"])
    compiled = run(torch.compile(step, backend="aot_eager", fullgraph=True))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"] - counters_before.get("unique_graphs", 0)
    assert frames == 1, f"one graph for every length, got {frames}"
    for i, n in enumerate(range(prefill, slots)):
        ref = ops.attention(stream_q[n], stream_k[:, :, : n + 1], stream_v[:, :, : n + 1], chunk_size=chunk, topk=topk)
        torch.testing.assert_close(eager[i], ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(compiled[i], eager[i], atol=0, rtol=0)


def test_max_cache_len_not_a_multiple_of_the_chunk():
    """70 slots, chunk 16: the partial last chunk is only ever an own chunk, so no mean is needed for it."""
    q, k, v = _qkv(1, 2, 1, 1, 70, 16, torch.float64, seed=9)
    length = torch.tensor(70)
    means = _filled_means(k, length, 16, "reference")
    out = ops.static_decode(q, k, v, chunk_means=means, length=length, chunk_size=16, topk=2)
    torch.testing.assert_close(out, ops.attention(q, k, v, chunk_size=16, topk=2), atol=1e-12, rtol=0)


def test_bad_input():
    q, k, v = _qkv(2, 2, 1, 1, 32, 16, torch.float32, seed=1)
    means = ops.static_chunk_means_buffer(k, 8)
    good = dict(chunk_means=means, length=torch.tensor([5, 9]), chunk_size=8, topk=2)
    with pytest.raises(ValueError, match="length must be an integer tensor"):
        ops.static_decode(q, k, v, **{**good, "length": torch.tensor([5.0, 9.0])})
    with pytest.raises(ValueError, match="length must be an integer tensor"):
        ops.static_decode(q, k, v, **{**good, "length": torch.tensor([1, 2, 3])})
    with pytest.raises(ValueError, match="length must be an integer tensor"):
        ops.static_decode(q, k, v, **{**good, "length": 5})
    with pytest.raises(ValueError, match=r"chunk_means must be \[B, Hkv, slots // C, D\]"):
        ops.static_decode(q, k, v, **{**good, "chunk_size": 4})
    with pytest.raises(ValueError, match="chunk_means must be fp32"):
        ops.static_decode(q, k, v, **{**good, "chunk_means": means.half()})
    with pytest.raises(ValueError, match="query, key and value must share a dtype"):
        ops.static_decode(q.double(), k, v, **good)
    with pytest.raises(RuntimeError, match="chunk_size 8 is not a multiple of 16"):
        ops.static_decode(q, k, v, **good, impl="triton")
    means16 = ops.static_chunk_means_buffer(k, 16)
    with pytest.raises(RuntimeError, match="one query row, got Lq=2"):
        ops.static_decode(
            torch.cat([q, q], 2), k, v, **{**good, "chunk_means": means16, "chunk_size": 16}, impl="triton"
        )
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.static_decode(q.requires_grad_(), k, v, **good)
    with pytest.raises(ValueError, match="new_tokens must be an int >= 1"):
        ops.update_static_chunk_means_(means, k, torch.tensor(3), new_tokens=0, chunk_size=8)
    with pytest.raises(ValueError, match=r"chunk_means must be \[B, Hkv, slots // C, D\]"):
        ops.update_static_chunk_means_(means[:, :, :2], k, torch.tensor(3), new_tokens=1, chunk_size=8)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.update_static_chunk_means_(means, k, torch.tensor(3), new_tokens=1, chunk_size=8, impl="cuda")
    with pytest.raises(ValueError, match="key must be a 4-D tensor"):
        ops.static_chunk_means_buffer(k[0], 8)
    with pytest.raises(ValueError, match="mask must be a 4-D boolean tensor"):
        ops.static_length_from_mask(torch.ones(2, 1, 1, 32), 2)
    q64, k64, v64 = _qkv(2, 2, 1, 1, 32, 64, torch.float32, seed=1)
    means64 = ops.static_chunk_means_buffer(k64, 16)
    with pytest.raises(ValueError, match="length must be a contiguous int64"):
        kernels.moba_decode_static_triton(q64, k64, v64, means64, torch.tensor([5, 9], dtype=torch.int32), 16, 2, 0.1)


def test_fake_kernels_and_opcheck():
    q, k, v = _qkv(1, 2, 1, 1, 24, 16, torch.float32, seed=4)
    means = ops.static_chunk_means_buffer(k, 8)
    length = torch.tensor([17])
    torch.library.opcheck(torch.ops.moba.update_static_chunk_means_.default, (means, k, length, 1, 8, "reference"))
    torch.library.opcheck(torch.ops.moba.static_decode.default, (q, k, v, means, length, None, 8, 2, 0.25, "reference"))


def test_chunk_means_is_an_op_a_compiled_graph_can_trace() -> None:
    # A compiled static-cache step computes the gate's means in its graph. On the Triton path they must come from the
    # moba::chunk_means op: tracing the launcher itself would hand the kernel fake tensors (the H200 run of
    # tests/gpu/test_cuda_pass_static_cache.py failed so: "Cannot access data pointer of Tensor").
    key = torch.randn(1, 2, 72, 16)
    compiled = torch.compile(lambda k: ops.chunk_means(k, 16, impl="triton"), backend="aot_eager", fullgraph=True)
    got = compiled(key)
    assert got.shape == (1, 2, 4, 16) and got.dtype == torch.float32
    assert torch.equal(got, ops.chunk_means(key, 16, impl="triton"))
