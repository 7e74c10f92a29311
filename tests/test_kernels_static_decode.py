"""The static-cache step's small kernels: each row's length from the step's mask (``static_length_triton``,
``moba::static_length``) and the in-place means update (``update_static_means_triton``), interpreted.

- The length: one past the last slot the mask's last query row allows in any head, ``slots`` for a row that allows
  nothing. Checked on hypothesis-drawn masks (batch and head dims of 1 or more, broadcast and strided layouts, empty,
  sparse, dense and left-padded rows, lengths on and off the kernel's blocks of 32 slots) against the reference the op
  ran before the kernel existed (``mask[:, :, -1].any(1)``, flip, ``argmax``: ``_length_reference``) and a plain loop,
  exactly (integers). In a graph (aot_eager, fullgraph) one graph serves every mask in place.
- The update: the chunks a step completes are averaged in place from the cache's buffer by the prefill gate's means
  computation, so every row is bitwise ``ops.chunk_means`` of the keys (strided bf16 buffers, per-row lengths, steps of
  one key and of several), and rows no step completed are never written.

With ``MOBA_TEST_DEVICE=cuda`` (``TRITON_INTERPRET=0`` on a GPU machine) the kernels run compiled on the GPU on the same
inputs and oracles.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (a missing triton must fail the tests, not skip them)
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_cases import TEST_DEVICE, on_test_device  # noqa: E402

from moba_compile import ops  # noqa: E402
from moba_compile.kernels import support as ksupport  # noqa: E402
from moba_compile.kernels.decode import static_length_triton, static_length_unsupported_reason  # noqa: E402
from moba_compile.static_decode_ops import _length_reference  # noqa: E402

static_length_triton = on_test_device(static_length_triton)
length_from_mask = on_test_device(ops.static_length_from_mask)


def loop_length(mask: torch.Tensor) -> list[int]:
    """One past the last slot any head of the last query row allows, per mask batch row; ``slots`` if none."""
    slots = mask.shape[-1]
    out = []
    for b in range(mask.shape[0]):
        allowed = [j for j in range(slots) if bool(mask[b, :, -1, j].any())]
        out.append(allowed[-1] + 1 if allowed else slots)
    return out


def draw_mask(b: int, h: int, lq: int, slots: int, kind: str, layout: str, seed: int) -> torch.Tensor:
    """A boolean mask ``[b, h, lq, slots]`` of a kind (what its rows allow) and a memory layout."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "padded":  # a static cache's step: left padding, then the row's keys, nothing after
        start = torch.randint(0, slots, (b,), generator=gen)
        end = start + torch.randint(0, slots + 1, (b,), generator=gen) % (slots - start + 1)
        pos = torch.arange(slots)
        row = (pos >= start[:, None]) & (pos < end[:, None])
        mask = row[:, None, None, :].expand(b, h, lq, slots).clone()
    else:
        p = {"empty": 0.0, "sparse": 0.02, "half": 0.5, "full": 1.0}[kind]
        mask = torch.rand(b, h, lq, slots, generator=gen) < p
    if layout == "broadcast":  # batch and heads of 1, expanded (stride 0), as transformers' mask may reach a layer
        return mask[:1, :1].expand(b, h, lq, slots)
    if layout == "sliced":  # a view whose slot stride is 2
        wide = torch.zeros(b, h, lq, 2 * slots, dtype=torch.bool)
        wide[..., ::2] = mask
        return wide[..., ::2]
    if layout == "heads_inner":  # [B, Lq, H, slots] storage viewed as [B, H, Lq, slots]
        return mask.transpose(1, 2).contiguous().transpose(1, 2)
    return mask


@settings(deadline=None, derandomize=True, database=None, max_examples=40)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    lq=st.integers(1, 3),
    slots=st.integers(1, 200),
    kind=st.sampled_from(["empty", "sparse", "half", "full", "padded"]),
    layout=st.sampled_from(["contiguous", "broadcast", "sliced", "heads_inner"]),
    seed=st.integers(0, 2**16),
)
@example(b=1, h=1, lq=1, slots=1, kind="empty", layout="contiguous", seed=0)  # one slot, allowing nothing
@example(b=2, h=1, lq=1, slots=64, kind="full", layout="contiguous", seed=0)  # the last slot of a block: 64
@example(b=2, h=2, lq=1, slots=33, kind="padded", layout="broadcast", seed=1)  # one slot past a block
@example(b=1, h=1, lq=1, slots=200, kind="sparse", layout="contiguous", seed=3)  # several blocks: the merge runs
def test_length_kernel_equals_the_reference_on_drawn_masks(b, h, lq, slots, kind, layout, seed):
    mask = draw_mask(b, h, lq, slots, kind, layout, seed)
    want = _length_reference(mask)
    assert want.tolist() == loop_length(mask)
    got = static_length_triton(mask)
    assert got.dtype == torch.int64 and got.shape == (b,) and got.is_contiguous()
    assert torch.equal(got, want)
    # Through the op: the mask's batch of 1 expands to the batch; the reference path gives the same.
    through = length_from_mask(mask[:1], 4, impl="triton")
    assert torch.equal(through, ops.static_length_from_mask(mask[:1], 4, impl="reference"))
    assert through.shape == (4,) and through.tolist() == [want[0].item()] * 4


def test_length_op_counts_paths_and_auto_keeps_cpu_tensors_on_the_reference():
    mask = torch.zeros(2, 1, 1, 50, dtype=torch.bool)
    mask[0, ..., 3:40] = True
    ops.CALLS.clear()
    assert ops.static_length_from_mask(mask, 2).tolist() == [40, 50]  # CPU tensors, "auto": the reference
    assert length_from_mask(mask, 2, impl="triton").tolist() == [40, 50]
    assert ops.CALLS["static_length:reference"] == 1 and ops.CALLS["static_length:triton"] == 1


def test_length_errors_name_the_problem(monkeypatch: pytest.MonkeyPatch):
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask must be a 4-D boolean tensor"):
        ops.static_length_from_mask(mask.float(), 2)
    with pytest.raises(ValueError, match="mask must be a 4-D boolean tensor"):
        ops.static_length_from_mask(mask[0], 2)
    with pytest.raises(ValueError, match=r"a query row and a slot, got shape \[2, 1, 0, 8\]"):
        ops.static_length_from_mask(mask[:, :, :0], 2)
    with pytest.raises(ValueError, match=r"a query row and a slot, got shape \[2, 1, 1, 0\]"):
        ops.static_length_from_mask(mask[..., :0], 2)
    with pytest.raises(ValueError, match="mask's batch 2 is neither 1 nor the batch 3"):
        ops.static_length_from_mask(mask, 3)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.static_length_from_mask(mask, 2, impl="cuda")
    assert static_length_unsupported_reason(mask.to("meta")) == "meta tensors"
    monkeypatch.setattr(ksupport, "interpreting", lambda: False)
    from moba_compile.kernels import decode as kdecode

    monkeypatch.setattr(kdecode, "interpreting", lambda: False)
    assert static_length_unsupported_reason(mask) == "CPU tensors need TRITON_INTERPRET=1"
    with pytest.raises(RuntimeError, match="impl='triton' cannot read this mask's length: CPU tensors need"):
        ops.static_length_from_mask(mask, 2, impl="triton")


def test_length_op_fake_kernel_and_opcheck():
    mask = torch.rand(3, 2, 2, 40, generator=torch.Generator().manual_seed(0)) < 0.3
    torch.library.opcheck(torch.ops.moba.static_length.default, (mask, "reference"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.ops.moba.static_length(torch.empty(5, 1, 1, 1000, dtype=torch.bool), "triton")
        assert fake.shape == (5,) and fake.dtype == torch.int64 and fake.is_contiguous()


def test_length_in_a_graph_follows_the_mask_in_place():
    """One graph (aot_eager, fullgraph) over a mask that a static cache's step rewrites in place: the kernel's result
    each time, no recompile."""
    slots = 150
    mask = torch.zeros(2, 1, 1, slots, dtype=torch.bool, device=TEST_DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda m: ops.static_length_from_mask(m, 2, impl="triton"), backend="aot_eager", fullgraph=True
    )
    for n in (1, 31, 32, 33, 100, 150):
        mask.zero_()
        mask[0, ..., :n] = True
        mask[1, ..., 5 : max(n - 3, 6)] = True  # left padding, a shorter row
        ops.CALLS.clear()
        got = compiled(mask).cpu().tolist()
        assert ops.CALLS["static_length:triton"] == 1
        assert got == [n, max(n - 3, 6)], n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_update_writes_bitwise_the_prefill_means_in_place(dtype):
    """A [B, L, H, D]-strided key buffer (a projection's layout), rows 9 keys apart, chunk 16 (blocks of 16 keys
    interpreted): a prefill of 13 keys, then steps of one key, and a step of 20 keys completing two chunks at once.
    After every step the complete rows are bitwise ``ops.chunk_means`` of the keys (the prefill gate's kernel), and
    the rows no step completed keep their sentinel: the update never writes them."""
    b, hkv, slots, d, chunk = 2, 2, 100, 64, 16
    gen = torch.Generator().manual_seed(7)
    key = torch.randn(b, slots, hkv, d, generator=gen).to(dtype).transpose(1, 2).to(TEST_DEVICE)
    means = ops.static_chunk_means_buffer(key, chunk).fill_(-3.0)
    length = torch.tensor([13, 22], device=TEST_DEVICE)

    def check() -> None:
        for row, n in enumerate(length.tolist()):
            done = n // chunk
            want = ops.chunk_means(key[row : row + 1, :, :n], chunk, impl="triton")[0, :, :done]
            assert torch.equal(means[row, :, :done], want), (row, n)
            assert bool((means[row, :, done:] == -3.0).all()), (row, n)

    ops.update_static_chunk_means_(means, key, length, new_tokens=13, chunk_size=chunk, impl="triton")
    check()
    for _ in range(40):
        length += 1  # in place: the step's own key
        ops.update_static_chunk_means_(means, key, length, new_tokens=1, chunk_size=chunk, impl="triton")
        check()
    length += 20
    ops.update_static_chunk_means_(means, key, length, new_tokens=20, chunk_size=chunk, impl="triton")
    check()


def test_static_step_kernels_compile_for_h100_without_spills() -> None:
    # No GPU here: the means update and the two length kernels at the launchers' CUDA configurations for sm_90a, with
    # Triton's compiler and ptxas: they must compile, spill-free, on whichever Triton is installed.
    from kernel_cases import compile_check_records

    code = (
        "import json; from benchmarks.decode import compile_check; print(json.dumps(compile_check(prefix='static_')))"
    )
    records = compile_check_records(["-c", code])
    assert set(records) == {
        "static_means-D64",
        "static_means-D128",
        "static_length-final",
        "static_length-blocks",
        "static_length_merge",
    }
    assert all(r["ok"] and r["spill_bytes"] == 0 for r in records.values()), records
