"""Parameters beyond what the sequence can use (issue "no policy or result is silently wrong", item 7).

``topk`` beyond the number of chunks and ``chunk_size`` beyond the key length describe the same MoBA call as their
clamped values (:func:`moba_compile.validation.bounded_params`), so every path must give exactly the clamped result
with memory bounded by the inputs: ``moba_attention(..., topk=10**6)`` on 512 tokens used to allocate in proportion to
``topk`` (3.7 GB at ``topk=100000``), and ``chunk_size=2**31`` asked for 512 GB. Each check runs under
:class:`AllocationCap`, which fails an op *before* it allocates more than a few MiB (sizes from the op's meta kernel),
and interpreted kernels under a wall-clock :func:`deadline` (a loop over ``chunk_size`` keys would never end).
Values no run can use (beyond int64, non-ints) raise errors that name the argument.
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import F64, bottom_right_causal, make_mask, rand_qkv
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import moba_compile
from moba_compile import ops, reference
from moba_compile.validation import bounded_params

HUGE_TOPK = 10**9
HUGE_CHUNK = 2**40
# The inputs here are a few KiB and the widest legitimate temporary (a [B, Hq, Lq, Lk] block of scores or masks) is
# ~1 MiB, far below 16 MiB; one buffer sized by topk = 10**9 or chunk_size = 2**40 would be GiBs.
CAP_BYTES = 16 << 20


class AllocationCap(TorchDispatchMode):
    """Fail any ATen op whose new (non-view) outputs would exceed ``cap`` bytes, before it runs.

    The op is first run on ``meta`` copies of its arguments, which allocates nothing and gives the output sizes; ops
    without a meta kernel (data-dependent ones such as ``item``) run unchecked. ``peak`` records the largest output
    seen, so a test can also show the check saw real work.
    """

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - dispatch protocol
        kwargs = dict(kwargs or {})
        if func.namespace not in ("aten", "prims"):
            # A custom op (moba::attention) reaches the mode as one call, and its body would run with the mode
            # popped: run its CPU kernel with the mode back on, so the body's own allocations are checked too.
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        if not getattr(func, "is_view", False):
            nbytes = self._output_bytes(func, args, kwargs)
            self.peak = max(self.peak, nbytes or 0)
            if nbytes is not None and nbytes > self.cap:
                raise AssertionError(f"{func} would allocate {nbytes} bytes (cap {self.cap})")
        return func(*args, **kwargs)

    @staticmethod
    def _output_bytes(func, args, kwargs) -> int | None:  # noqa: ANN001
        def meta(x: object) -> object:
            if isinstance(x, torch.Tensor):
                return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
            if isinstance(x, torch.device):
                return torch.device("meta")
            return x

        meta_kwargs = tree_map(meta, kwargs)
        if "device" in meta_kwargs:
            meta_kwargs["device"] = torch.device("meta")
        try:
            out = func(*tree_map(meta, args), **meta_kwargs)
        except Exception:  # noqa: BLE001 - no meta kernel (data-dependent op): nothing to predict
            return None
        leaves, _ = tree_flatten(out)
        return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in the test if the block runs longer than ``seconds`` (the interpreter runs Python, so
    the signal interrupts a kernel loop too)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: work grows with a parameter, not the inputs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_allocation_cap_catches_a_parameter_sized_buffer() -> None:
    # The guard the tests below rely on: the allocation that used to kill the process is refused before it happens.
    with AllocationCap(CAP_BYTES), pytest.raises(AssertionError, match="would allocate 8000000000 bytes"):
        torch.full((1, 1, 1, HUGE_TOPK), -1, dtype=torch.long)
    with AllocationCap(CAP_BYTES) as cap:
        torch.zeros(1024)
    assert cap.peak == 4096


@pytest.mark.parametrize(
    "len_k,chunk_size,topk,expected",
    [
        (512, HUGE_CHUNK, HUGE_TOPK, (8192, 1)),  # one chunk: the 8192 floor keeps kernel-sized chunks as they are
        (512, 100, HUGE_TOPK, (100, 6)),
        (512, 512, 3, (512, 1)),
        (512, 600, 1, (600, 1)),  # at or beyond Lk but within the floor: unchanged
        (20000, HUGE_CHUNK, 2, (20000, 1)),  # beyond the floor: Lk rounded up to 16
        (20001, 2**31, 2, (20016, 1)),
        (37, 5, 8, (5, 8)),  # exactly the chunk count: unchanged
        (37, 5, 9, (5, 8)),
    ],
)
def test_bounded_params_values(len_k: int, chunk_size: int, topk: int, expected: tuple[int, int]) -> None:
    assert bounded_params(len_k, chunk_size, topk) == expected


# --------------------------------------------------------------------------------------------------------------------
# Reference path (impl="reference", and "auto" on CPU), forward and backward through the op
# --------------------------------------------------------------------------------------------------------------------


def _run(q, k, v, *, grad: bool, **kw) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """Output (and q/k/v gradients for a fixed upstream gradient) of ``moba_attention``."""
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    out = moba_compile.moba_attention(*leaves, **kw)
    if not grad:
        return (out.detach(),)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
    return (out.detach(), *(t.grad for t in leaves))


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("mask", ["none", "causal_pad"])
def test_huge_topk_equals_clamped_reference(impl: str, mask: str) -> None:
    # 512 tokens, the size of the report; chunk 64 gives 8 chunks, so any topk >= 8 is topk = 8 (dense causal).
    q, k, v = rand_qkv(0, 1, 2, 1, 512, 512, 8)
    m = make_mask(mask, 1, 2, 512, 512)
    with AllocationCap(CAP_BYTES) as cap, deadline(60):
        got = _run(q, k, v, grad=True, chunk_size=64, topk=HUGE_TOPK, attn_mask=m, impl=impl)
    assert cap.peak > 0  # the cap watched the call
    want = _run(q, k, v, grad=True, chunk_size=64, topk=8, attn_mask=m, impl=impl)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    allowed = bottom_right_causal(512, 512) if m is None else m & bottom_right_causal(512, 512)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    torch.testing.assert_close(got[0], dense, **F64)


@pytest.mark.parametrize("lq", [48, 7, 1], ids=["prefill", "chunked", "decode"])
@pytest.mark.parametrize("chunk_size", [HUGE_CHUNK, 2**31, 2**63 - 1])
def test_huge_chunk_size_equals_clamped_reference(chunk_size: int, lq: int) -> None:
    q, k, v = rand_qkv(1, 2, 4, 2, lq, 48, 8)
    with AllocationCap(CAP_BYTES), deadline(60):
        got = _run(q, k, v, grad=True, chunk_size=chunk_size, topk=HUGE_TOPK)
    clamped = bounded_params(48, chunk_size, HUGE_TOPK)
    assert clamped == (8192, 1)
    want = _run(q, k, v, grad=True, chunk_size=clamped[0], topk=clamped[1])
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # One chunk holds every key: dense causal attention (spec section 1).
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right_causal(lq, 48), enable_gqa=True)
    torch.testing.assert_close(got[0], dense, **F64)
    # ... which chunk_size = Lk gives too.
    torch.testing.assert_close(got[0], _run(q, k, v, grad=False, chunk_size=48, topk=1)[0], **F64)


def test_reference_functions_are_bounded() -> None:
    q, k, v = rand_qkv(2, 1, 2, 2, 40, 40, 8)
    with AllocationCap(CAP_BYTES), deadline(60):
        sel = reference.select_chunks(q, k, chunk_size=8, topk=HUGE_TOPK)
        means = reference.chunk_means(k, HUGE_CHUNK)
        out, lse = reference.moba_attention_forward(q, k, v, chunk_size=HUGE_CHUNK, topk=HUGE_TOPK)
        grads = reference.moba_attention_backward(torch.ones_like(out), q, k, v, out, lse, chunk_size=8, topk=HUGE_TOPK)
    # 5 chunks: at most 4 earlier ones, and every one of them is selected (topk >= the chunk count).
    assert torch.equal(sel, reference.select_chunks(q, k, chunk_size=8, topk=5))
    assert sel.shape == (1, 2, 40, 4)
    assert torch.equal(means, k.mean(dim=2, keepdim=True))
    want_out, want_lse = reference.moba_attention_forward(q, k, v, chunk_size=40, topk=1)
    torch.testing.assert_close(out, want_out, **F64)
    torch.testing.assert_close(lse, want_lse, **F64)
    want = reference.moba_attention_backward(torch.ones_like(out), q, k, v, out, lse, chunk_size=8, topk=5)
    for g, w in zip(grads, want):
        assert torch.equal(g, w)


def test_op_min_seq_len_with_huge_parameters_is_dense() -> None:
    # min_seq_len widens topk to every chunk: computed from the clamped chunk size, so it is 1 here, not Lk / 1.
    q, k, v = rand_qkv(3, 1, 2, 1, 24, 24, 8)
    scale = 1 / math.sqrt(8)
    with AllocationCap(CAP_BYTES), deadline(60):
        out, lse = torch.ops.moba.attention(q, k, v, None, None, HUGE_CHUNK, HUGE_TOPK, scale, 2**62, "reference")
        small_chunk, _ = torch.ops.moba.attention(q, k, v, None, None, 1, HUGE_TOPK, scale, 2**62, "reference")
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, dense, **F64)
    torch.testing.assert_close(small_chunk, dense, **F64)


def test_resolve_impl_judges_the_clamped_parameters() -> None:
    q = torch.zeros(1, 2, 32, 16, dtype=torch.float16)
    assert ops.resolve_impl("triton", q, q, q, HUGE_CHUNK, HUGE_TOPK) == ("triton", "impl='triton' requested")
    assert ops.resolve_impl("triton", q, q, q, 16, 10**6) == ("triton", "impl='triton' requested")


# --------------------------------------------------------------------------------------------------------------------
# Values no run can use
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        ({"chunk_size": 2**63}, ValueError, r"chunk_size must fit in int64"),
        ({"topk": 2**64}, ValueError, r"topk must fit in int64"),
        ({"chunk_size": 10**30}, ValueError, r"chunk_size must fit in int64"),
        ({"topk": float("inf")}, TypeError, r"topk must be an int"),
        ({"chunk_size": 4.0}, TypeError, r"chunk_size must be an int"),
        ({"topk": torch.tensor(3)}, TypeError, r"topk must be an int"),
    ],
    ids=["chunk-2**63", "topk-2**64", "chunk-1e30", "topk-inf", "chunk-float", "topk-tensor"],
)
def test_unusable_parameters_name_the_argument(change: dict, exc: type, pattern: str) -> None:
    q, k, v = rand_qkv(0, 1, 2, 2, 8, 8, 8)
    kwargs = {"chunk_size": 4, "topk": 2, **change}
    with pytest.raises(exc, match=pattern):
        moba_compile.moba_attention(q, k, v, **kwargs)
    with pytest.raises(exc, match=pattern):
        reference.moba_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "value,exc,pattern",
    [(-1, ValueError, r"min_seq_len must be in \[0, 2\*\*63 - 1\]"), (2**63, ValueError, r"min_seq_len must be in"),
     (1.5, TypeError, r"min_seq_len must be an int"), (True, TypeError, r"min_seq_len must be an int")],
    ids=["negative", "2**63", "float", "bool"],
)  # fmt: skip
def test_unusable_min_seq_len_names_the_argument(value: object, exc: type, pattern: str) -> None:
    q, k, v = rand_qkv(0, 1, 2, 2, 8, 8, 8)
    with pytest.raises(exc, match=pattern):
        ops.attention(q, k, v, chunk_size=4, topk=2, min_seq_len=value)


@pytest.mark.parametrize("chunk_size,topk,name", [(0, 2, "chunk_size"), (4, 0, "topk"), (-5, 2, "chunk_size")])
def test_op_called_directly_names_a_bad_parameter(chunk_size: int, topk: int, name: str) -> None:
    # The compile pass calls torch.ops.moba.attention without the public checks: the op body checks again.
    q, k, v = rand_qkv(0, 1, 2, 2, 8, 8, 8)
    with pytest.raises(ValueError, match=rf"{name} must be >= 1"):
        torch.ops.moba.attention(q, k, v, None, None, chunk_size, topk, 0.3, 0, "reference")


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels, interpreted on tiny shapes: through the op (forward, backward, decode) and the launchers directly
# --------------------------------------------------------------------------------------------------------------------


def _triton_inputs(lq: int, lk: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # fp32: the interpreted kernels then use IEEE dots, so equal calls give bitwise equal results.
    return rand_qkv(4, 1, 2, 1, lq, lk, d, dtype=torch.float32)


@pytest.mark.parametrize(
    "chunk_size,topk,clamped",
    [(16, HUGE_TOPK, (16, 2)), (HUGE_CHUNK, HUGE_TOPK, (8192, 1)), (2**31, 1, (8192, 1))],
    ids=["topk", "chunk+topk", "chunk-int32"],
)
def test_triton_prefill_and_backward_equal_clamped(chunk_size: int, topk: int, clamped: tuple[int, int]) -> None:
    q, k, v = _triton_inputs(32, 32, 16)
    assert bounded_params(32, chunk_size, topk) == clamped
    with AllocationCap(CAP_BYTES), deadline(120):
        got = _run(q, k, v, grad=True, chunk_size=chunk_size, topk=topk, impl="triton")
    assert ops.CALLS["attention:triton"] > 0 and ops.CALLS["attention_backward:triton"] > 0
    want = _run(q, k, v, grad=True, chunk_size=clamped[0], topk=clamped[1], impl="triton")
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    ref = _run(q.double(), k.double(), v.double(), grad=True, chunk_size=chunk_size, topk=topk, impl="reference")
    for g, r in zip(got, ref):
        # fp32 kernels against the float64 reference: summation-order error ~1e-6 on O(1) values.
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "chunk_size,topk,clamped",
    [(16, HUGE_TOPK, (16, 3)), (HUGE_CHUNK, HUGE_TOPK, (8192, 1))],
    ids=["topk", "chunk+topk"],
)
def test_triton_decode_equals_clamped(chunk_size: int, topk: int, clamped: tuple[int, int]) -> None:
    q, k, v = _triton_inputs(1, 40, 64)  # the decode kernel takes head dims 64 and 128
    before = ops.CALLS["attention:triton-decode"]
    with AllocationCap(CAP_BYTES), deadline(120):
        got = moba_compile.moba_attention(q, k, v, chunk_size=chunk_size, topk=topk, impl="triton")
    assert ops.CALLS["attention:triton-decode"] == before + 1
    want = moba_compile.moba_attention(q, k, v, chunk_size=clamped[0], topk=clamped[1], impl="triton")
    assert torch.equal(got, want)
    ref = moba_compile.moba_attention(q.double(), k.double(), v.double(), chunk_size=chunk_size, topk=topk)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_triton_launchers_clamp() -> None:
    from moba_compile.kernels import chunk_means_triton, moba_forward_triton, select_chunks_triton
    from moba_compile.kernels.decode import decode_select_chunks_triton

    q, k, v = _triton_inputs(32, 48, 64)
    with AllocationCap(CAP_BYTES), deadline(120):
        sel = select_chunks_triton(q, k, 16, HUGE_TOPK)
        means = chunk_means_triton(k, HUGE_CHUNK)  # the kernel loops over C keys per chunk: C must be clamped
        out, lse = moba_forward_triton(q, k, v, HUGE_CHUNK, HUGE_TOPK, None)
        dsel = decode_select_chunks_triton(q[:, :, -1:], k, 16, HUGE_TOPK)
    assert torch.equal(sel, select_chunks_triton(q, k, 16, 3)) and sel.shape == (1, 2, 32, 2)
    assert torch.equal(sel.long(), reference.select_chunks(q, k, chunk_size=16, topk=HUGE_TOPK))
    torch.testing.assert_close(means, k.mean(dim=2, keepdim=True), rtol=1e-6, atol=1e-6)
    want_out, want_lse = moba_forward_triton(q, k, v, 8192, 1, None)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    assert torch.equal(dsel, decode_select_chunks_triton(q[:, :, -1:], k, 16, 3)) and dsel.shape == (1, 2, 2)
