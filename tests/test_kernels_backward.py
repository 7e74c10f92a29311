"""The Triton MoBA backward (``moba_backward_triton``) versus the reference's gradient formulas, interpreted.

Runs under the Triton interpreter (``TRITON_INTERPRET=1``, set below before anything imports triton), so shapes stay
small. Nothing is skipped: without triton these tests fail, CI installs it.

Every case runs the Triton forward, then the kernel backward on a random ``dO``, and compares ``dq``, ``dk``, ``dv``
with ``reference.moba_attention_backward`` evaluated in float64 on the same inputs (``dO``, q, k, v and the forward's
``out``/``lse``, all upcast exactly). Tolerance per gradient (every term named):

- ``2 * ref_err``: ``ref_err`` is the max error of the same reference run on the fp16/bf16/fp32 inputs versus float64
  (fp32 math and one final rounding to the dtype). The kernel does the same math in another order and rounds once.
- ``eps(dtype) * max(bound)``: the kernel rounds P (before ``dV = P^T dO``) and dS (before ``dK = dS^T Q`` and
  ``dQ = dS K``) to the input dtype, as tensor cores need and FlashAttention does; the reference keeps them in fp32.
  That rounding's first-order error is at most ``eps / 2`` times ``bound`` = ``P^T |dO|`` (dV),
  ``scale * |dS|^T |Q|`` (dK) or ``scale * |dS| |K|`` (dQ), computed here in float64 from a dense reconstruction of
  the attended set; the budget is twice that.

Exact checks: no NaN/inf anywhere; keys that no (row, head) of their group attends (chunks nobody chose, keys after
every row, masked keys) get ``dk = dv = 0`` exactly; rows that attend no key get ``dq = 0`` exactly; deterministic mode
is bitwise reproducible.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import random  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (a missing triton must fail the tests, not skip them)
from conftest import Case, kernel_case, own_chunk_causal  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_cases import (  # noqa: E402
    TEST_DEVICE,
    assert_out_lse_within_budget,
    on_test_device,
    prefill_inputs,
    record_allocations,
)

import moba_compile  # noqa: E402
from moba_compile import ops, reference  # noqa: E402
from moba_compile.kernels import backward as kernel_backward  # noqa: E402
from moba_compile.kernels import flip_selection, moba_backward_triton, moba_forward_triton  # noqa: E402
from moba_compile.kernels import forward as kernel_forward  # noqa: E402
from moba_compile.kernels import gating as kernel_gating  # noqa: E402

# MOBA_TEST_DEVICE=cuda: the launchers run compiled on the GPU (kernel_cases.on_test_device); identity on the CPU.
flip_selection = on_test_device(flip_selection)
moba_backward_triton = on_test_device(moba_backward_triton)
moba_forward_triton = on_test_device(moba_forward_triton)

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_inputs(case: Case, seed: int = 0):
    """Seeded ``(q, k, v, dO, mask)`` for a case (``mask`` may be ``None``)."""
    return prefill_inputs(case, seed, grad_out=True)


def dense_allowed(
    q: torch.Tensor, k: torch.Tensor, c: int, topk: int, mask: torch.Tensor | None, routing: str = "head"
) -> torch.Tensor:
    """Bool ``[B, Hq, Lq, Lk]``: the attended set, from ``reference.select_chunks`` (own chunk causal, chosen chunks,
    AND the mask)."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    n = -(-lk // c)
    sel = reference.select_chunks(q, k, chunk_size=c, topk=topk, routing=routing)
    chosen = torch.zeros(b, hq, lq, n + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(sel < 0, n, sel), True)
    key_chunk = torch.arange(lk) // c
    allowed = chosen[..., :n].gather(-1, key_chunk.expand(b, hq, lq, lk)) | own_chunk_causal(lq, lk, c)
    return allowed if mask is None else allowed & mask


def rounding_bounds(q, k, v, do, out, lse, allowed, scale) -> Grads:
    """Float64 ``(|dS| |K| scale, |dS|^T |Q| scale, P^T |dO|)`` shaped like ``(dq, dk, dv)`` (see the module doc)."""
    b, hq, lq, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    q, k, v, do, out, lse = (t.double() for t in (q, k, v, do, out, lse))
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    finite = torch.isfinite(lse)[..., None]
    s = (q @ kr.transpose(-1, -2)) * scale
    p = torch.where(allowed & finite, torch.exp(s - torch.where(finite, lse[..., None], 0.0)), 0.0)
    ds = p * (do @ vr.transpose(-1, -2) - (do * out).sum(-1, keepdim=True))

    def fold(x: torch.Tensor) -> torch.Tensor:  # sum the query heads of each group
        return x.reshape(b, hkv, g, *x.shape[2:]).sum(2)

    bq = scale * (ds.abs() @ kr.abs())
    bk = fold(scale * (ds.abs().transpose(-1, -2) @ q.abs()))
    bv = fold(p.transpose(-1, -2) @ do.abs())
    return bq, bk, bv


def check_backward(
    q, k, v, do, chunk_size: int, topk: int, mask=None, deterministic: bool = False, routing: str = "head"
) -> Grads:
    """Run forward + kernel backward and check the gradients against the float64 reference (budget above)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = moba_forward_triton(q, k, v, chunk_size, topk, scale, mask, routing=routing)
    grads = moba_backward_triton(
        do, q, k, v, out, lse, chunk_size, topk, scale, mask, deterministic=deterministic, routing=routing
    )
    kw = dict(chunk_size=chunk_size, topk=topk, scale=scale, attn_mask=mask, routing=routing)
    ref64 = reference.moba_attention_backward(*(t.double() for t in (do, q, k, v, out, lse)), **kw)
    ref_lp = reference.moba_attention_backward(do, q, k, v, out, lse, **kw)
    allowed = dense_allowed(q, k, chunk_size, topk, mask, routing)
    bounds = rounding_bounds(q, k, v, do, out, lse, allowed, scale)
    eps = torch.finfo(q.dtype).eps
    for name, got, r64, rlp, bound, like in zip("qkv", grads, ref64, ref_lp, bounds, (q, k, v)):
        assert got.shape == like.shape and got.dtype == like.dtype and got.is_contiguous(), f"d{name} metadata"
        assert torch.isfinite(got).all(), f"d{name} has NaN/inf"
        ref_err = (rlp.double() - r64).abs().max().item()
        err = (got.double() - r64).abs().max().item()
        tol = 2 * ref_err + eps * bound.max().item()
        assert err <= tol, f"d{name} error {err:.3e} > {tol:.3e} (reference's own error {ref_err:.3e})"
    # Exact zeros: keys no row of their group attends, rows that attend nothing.
    b, hq, lq, _ = q.shape
    hkv = k.shape[1]
    attended_keys = allowed.reshape(b, hkv, hq // hkv, lq, -1).any(dim=(2, 3))  # [B, Hkv, Lk]
    dq, dk, dv = grads
    assert torch.all(dk[~attended_keys] == 0) and torch.all(dv[~attended_keys] == 0), "unattended keys need zero grads"
    empty_rows = ~allowed.any(-1)
    assert torch.equal(empty_rows, torch.isinf(lse)), "rows without keys are exactly the lse = -inf rows"
    assert torch.all(dq[empty_rows] == 0), "rows that attend nothing need zero dq"
    return grads


GRID = [
    kernel_case(2, 64, 2, 2, 16, 3, torch.bfloat16),  # MHA, batch 2
    kernel_case(1, 64, 4, 2, 16, 3, torch.float16),  # GQA
    kernel_case(1, 64, 4, 2, 16, 3, torch.bfloat16),
    kernel_case(1, 96, 4, 1, 32, 2, torch.bfloat16),  # MQA
    kernel_case(1, 64, 2, 2, 16, 1, torch.bfloat16),  # K = 1: own chunk only, no flip
    kernel_case(1, 64, 2, 1, 16, 8, torch.float16),  # K beyond the chunk count: dense causal
    kernel_case(1, 100, 2, 2, 16, 3, torch.float16),  # partial last chunk (100 = 6 * 16 + 4)
    kernel_case(1, 40, 2, 1, 16, 3, torch.bfloat16, lk=100),  # Lq < Lk (chunked prefill), partial last chunk
    kernel_case(2, 1, 4, 2, 32, 3, torch.float16, lk=200),  # one query row per head
    kernel_case(1, 128, 2, 2, 16, 12, torch.bfloat16),  # K - 1 = 11 slots, 8 chunks
    kernel_case(1, 64, 2, 1, 32, 2, torch.bfloat16, d=128),  # head dim 128
    kernel_case(1, 48, 2, 2, 16, 3, torch.float16, lk=96, d=128),  # head dim 128, Lq < Lk
    kernel_case(1, 64, 2, 2, 16, 3, torch.float16, dv=32),  # value head dim differs
    kernel_case(1, 64, 4, 2, 16, 3, torch.float16, mask="random_b1_empty"),  # incl. fully masked rows
    kernel_case(1, 64, 4, 2, 16, 3, torch.bfloat16, mask="random_b1_empty"),
    kernel_case(1, 50, 4, 2, 16, 2, torch.bfloat16, lk=80, mask="random_heads"),  # per-head mask, Lq < Lk
    kernel_case(2, 64, 2, 1, 16, 3, torch.float16, mask="pad_first5"),  # key padding
    kernel_case(1, 64, 4, 2, 16, 3, torch.bfloat16, strided=True),  # non-contiguous q/k/v/dO
    kernel_case(1, 64, 2, 1, 16, 3, torch.float32),  # fp32: IEEE dots
    kernel_case(1, 150, 2, 1, 48, 2, torch.bfloat16),  # chunk 48: key blocks of 16, tiles span chunks
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_backward_matches_reference(case: Case) -> None:
    q, k, v, do, mask = make_inputs(case)
    check_backward(q, k, v, do, case.c, case.k, mask)


DET_GRID = [
    kernel_case(1, 64, 4, 2, 16, 3, torch.bfloat16, mask="random_b1_empty"),
    kernel_case(1, 40, 2, 1, 16, 3, torch.float16, lk=100),
    kernel_case(1, 64, 2, 2, 16, 1, torch.bfloat16),
    kernel_case(1, 128, 2, 1, 16, 12, torch.float16),
]


@pytest.mark.parametrize("case", DET_GRID, ids=lambda c: c.id)
def test_deterministic_mode_is_bitwise_reproducible(case: Case) -> None:
    q, k, v, do, mask = make_inputs(case, seed=4)
    first = check_backward(q, k, v, do, case.c, case.k, mask, deterministic=True)
    second = check_backward(q, k, v, do, case.c, case.k, mask, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # The default mode (dQ by atomics; the same dK/dV kernel) differs only in the fp32 summation order of dQ and of the
    # recomputed S/dP, which can move a P/dS rounding or the final rounding by one ulp: allow 2 ulps of the largest
    # gradient (both modes also passed the reference budget above).
    default = check_backward(q, k, v, do, case.c, case.k, mask, deterministic=False)
    for name, a, b in zip("qkv", first, default):
        diff = (a.double() - b.double()).abs().max().item()
        assert diff <= 2 * torch.finfo(q.dtype).eps * max(1.0, b.abs().max().item()), f"d{name} modes differ {diff}"


def test_deterministic_results_do_not_depend_on_the_flip_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU the flip's ranks (hence the list order) come from atomics. Shuffle every list before the sort that
    # deterministic mode applies: every result must stay bitwise identical.
    case = kernel_case(1, 96, 4, 2, 16, 4, torch.bfloat16)
    q, k, v, do, _ = make_inputs(case, seed=6)
    out, lse = moba_forward_triton(q, k, v, case.c, case.k, 0.125)
    args = (do, q, k, v, out, lse, case.c, case.k, 0.125)
    expect = moba_backward_triton(*args, deterministic=True)
    sort = kernel_gating._sort_lists
    shuffled = []

    def shuffle_then_sort(lists: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        lists = lists.clone()
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        gen = torch.Generator().manual_seed(len(shuffled))
        for s, e in zip(starts.tolist(), ends.tolist()):
            lists[s:e] = lists[s:e][torch.randperm(e - s, generator=gen)]
        shuffled.append(True)
        return sort(lists, ends)

    monkeypatch.setattr(kernel_gating, "_sort_lists", shuffle_then_sort)
    got = moba_backward_triton(*args, deterministic=True)
    assert shuffled, "deterministic mode must sort the flip lists"
    for a, b in zip(expect, got):
        assert torch.equal(a, b)


@pytest.fixture
def flip_modes(monkeypatch: pytest.MonkeyPatch) -> list:
    """The ``deterministic`` argument of every ``flip_slot_major`` call the backward makes: the mode it chose."""
    seen: list = []
    real_flip = kernel_backward.flip_slot_major

    def spy(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return real_flip(*args, **kwargs)

    monkeypatch.setattr(kernel_backward, "flip_slot_major", spy)
    return seen


def test_deterministic_follows_torch_setting(flip_modes: list) -> None:
    case = kernel_case(1, 48, 2, 1, 16, 2, torch.float16)
    q, k, v, do, _ = make_inputs(case)
    out, lse = moba_forward_triton(q, k, v, case.c, case.k, 0.125)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        moba_backward_triton(do, q, k, v, out, lse, case.c, case.k, 0.125)
        torch.use_deterministic_algorithms(False)
        moba_backward_triton(do, q, k, v, out, lse, case.c, case.k, 0.125)
    finally:
        torch.use_deterministic_algorithms(was)
    assert flip_modes == [True, False]


def test_long_chunks_default_to_dq_atomics(flip_modes: list) -> None:
    # deterministic=None follows torch's switch alone, at every chunk size: the 2026-12-01 H200 timings put dQ atomics
    # ahead at every spec shape (chunks 512-8192), so no chunk size silently turns the slower atomic-free path on. With
    # the switch on, the same long-chunk call is bitwise that of deterministic=True.
    chunk = 1024
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 16, 32, generator=g).half()
    k, v = (torch.randn(1, 1, 2 * chunk + 16, 32, generator=g).half() for _ in range(2))
    do = torch.randn(1, 2, 16, 32, generator=g).half()
    out, lse = moba_forward_triton(q, k, v, chunk, 2, 0.125)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        moba_backward_triton(do, q, k, v, out, lse, chunk, 2, 0.125)
        torch.use_deterministic_algorithms(True)
        auto = moba_backward_triton(do, q, k, v, out, lse, chunk, 2, 0.125)
    finally:
        torch.use_deterministic_algorithms(was)
    det = moba_backward_triton(do, q, k, v, out, lse, chunk, 2, 0.125, deterministic=True)
    assert flip_modes == [False, True, True]
    for a, b in zip(auto, det):
        assert torch.equal(a, b)


def test_deterministic_dq_is_bitwise_stable_without_partials(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunked prefill with a mask, K=4: dQ is summed slot by slot into one fp32 buffer (no per-slot partials): the only
    # floating scratch is at most [B, Hq, Lq, D], and two runs agree bitwise.
    case = kernel_case(1, 40, 4, 2, 16, 4, torch.bfloat16, lk=90, mask="random_b1_empty")
    q, k, v, do, mask = make_inputs(case, seed=9)
    sizes = record_allocations(monkeypatch, kernel_backward)
    first = check_backward(q, k, v, do, case.c, case.k, mask, deterministic=True)
    second = check_backward(q, k, v, do, case.c, case.k, mask, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    q_numel = case.b * case.hq * case.lq * case.d
    assert max(n for n, dt in sizes if dt.is_floating_point) <= max(q_numel, case.b * case.hkv * case.len_k * case.d)


def test_lq_division_by_multiply_high_is_exact() -> None:
    # The dK/dV kernel decodes a list entry e = g * Lq + i (e < G * Lq < 2^31) as g = (umulhi(e, magic) + e) >> shift
    # in uint32 arithmetic, with backward._udiv_magic(Lq). Exact by construction (its docstring); checked here for
    # every divisor up to 4096, powers of two and their neighbours up to 2^31 - 1 and random ones, at e around the
    # multiples of the divisor, at the top of the range and at random, with the sum kept to 32 bits as on the GPU.
    rng = random.Random(0)
    divisors = set(range(1, 4097)) | {2**p + s for p in range(12, 31) for s in (-1, 0, 1)} | {2**31 - 1}
    divisors |= {rng.randrange(4097, 2**31) for _ in range(2000)}
    for d in sorted(divisors):
        magic, shift = kernel_backward._udiv_magic(d)
        assert -(2**31) <= magic < 2**31 and 0 <= shift <= 31
        m = magic & 0xFFFFFFFF
        top = (2**31 - 1) // d
        quotients = {0, 1, 2, top - 1, top, rng.randrange(top + 1)}
        entries = {q * d + r for q in quotients for r in (-1, 0, 1, d - 1)} | {2**31 - 1, rng.randrange(2**31)}
        for e in entries:
            if 0 <= e < 2**31:
                hi = (e * m) >> 32
                assert hi + e < 2**32 and (hi + e) >> shift == e // d, (d, e)


def test_row_offsets_fit_int32_only_where_they_do() -> None:
    # OFFS32 (int32 row offsets from the dK/dV kernel's 64-bit bases) must be False once an in-group offset of q, dO,
    # the mask or the dQ buffer reaches 2^31, e.g. 1M tokens of 32 heads in [B, L, H, D] memory.
    def tensor(shape: tuple[int, ...], strides: tuple[int, ...]) -> SimpleNamespace:
        return SimpleNamespace(shape=shape, stride=lambda i: strides[i])

    def fits(lq: int, hq: int, g: int, blhd: bool, mask: tuple[int, int, int, int] = (0, 0, 0, 0)) -> bool:
        d = 128
        strides = (lq * hq * d, d, hq * d, 1) if blhd else (hq * lq * d, lq * d, d, 1)
        q = tensor((1, hq, lq, d), strides)
        p = SimpleNamespace(query=q, grad_out=q, mask=SimpleNamespace(strides=mask))
        return kernel_backward._offsets_fit_int32(p, g)

    assert fits(2**20, 32, 1, blhd=False) and fits(2**20, 32, 8, blhd=False)
    assert fits(2**17, 32, 1, blhd=True) and not fits(2**20, 32, 1, blhd=True)
    assert not fits(2**20, 32, 16, blhd=False)  # the dQ buffer: 16 heads x 2^20 rows x 128 = 2^31
    assert not fits(2**17, 32, 1, blhd=False, mask=(0, 0, 2**17 * 2**17, 1))


def assert_same_gradients(got: tuple, expect: tuple, *, atomic_dq: bool) -> None:
    """``(dq, dk, dv)`` bitwise equal, except an atomic-mode dQ on a GPU: its fp32 atomic adds land in a different
    order each run, so it is compared to bf16/fp16 rounding (interpreted, programs run in order: bitwise there too)."""
    for name, a, b in zip(("dq", "dk", "dv"), got, expect):
        if name == "dq" and atomic_dq and a.is_cuda:
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
        else:
            assert torch.equal(a, b), f"{name} differs"


def test_int64_row_offsets_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    # The dK/dV kernel's OFFS32=False variant (int64 row offsets, taken where int32 could overflow) on a small case
    # (GQA, [B, L, H, D]-strided query, a mask, both modes): bitwise the int32 variant's gradients, except the atomic
    # mode's dQ on a GPU, whose fp32 atomic adds land in a different order each run (interpreted, programs run in
    # order and it is bitwise too); its dK/dV have one writer per tile and stay bitwise.
    case = kernel_case(1, 48, 2, 1, 16, 3, torch.bfloat16, lk=64, mask="random_b1_empty")
    q, k, v, do, mask = make_inputs(case, seed=5)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    scale = 1.0 / math.sqrt(case.d)
    out, lse = moba_forward_triton(q, k, v, case.c, case.k, scale, attn_mask=mask)
    for det in (False, True):
        args = (do, q, k, v, out, lse, case.c, case.k, scale)
        narrow = moba_backward_triton(*args, attn_mask=mask, deterministic=det)
        with monkeypatch.context() as patch:
            patch.setattr(kernel_backward, "_offsets_fit_int32", lambda *a: False)
            wide = moba_backward_triton(*args, attn_mask=mask, deterministic=det)
        assert_same_gradients(narrow, wide, atomic_dq=not det)


def test_unchosen_chunks_get_exact_zeros() -> None:
    # 4 query rows in the last of 8 chunks, K = 2: at most 4 of the 7 earlier chunks are chosen; keys before the rows
    # in the own chunk are attended, the chunks nobody chose must get exactly zero dK/dV (and no NaN), in both modes.
    case = kernel_case(1, 4, 1, 1, 16, 2, torch.bfloat16, lk=128)
    q, k, v, do, _ = make_inputs(case, seed=2)
    sel = reference.select_chunks(q, k, chunk_size=16, topk=2)
    unchosen = sorted(set(range(7)) - set(sel.flatten().tolist()))
    assert len(unchosen) >= 3
    for det in (False, True):
        _, dk, dv = check_backward(q, k, v, do, case.c, case.k, deterministic=det)
        for c in unchosen:
            assert torch.all(dk[:, :, c * 16 : (c + 1) * 16] == 0) and torch.all(dv[:, :, c * 16 : (c + 1) * 16] == 0)
        assert dk[:, :, sel[0, 0, 0, 0] * 16].abs().sum() > 0, "a chosen chunk gets a gradient"


def test_every_row_choosing_one_chunk_spans_many_tiles() -> None:
    # Chunk 0's keys point along every query: each row's one chosen chunk (K = 2) is chunk 0, so its entry list holds
    # every (head, row) pair past the first chunk (2 heads x 240 rows = 480 entries, beyond any tile's rows): the
    # forward's and backward's list walks then span many tiles of one segment, while chunks 1-14 are chosen by nobody.
    case = kernel_case(1, 256, 2, 1, 16, 2, torch.bfloat16)
    q, k, v, do, _ = make_inputs(case, seed=4)
    direction = torch.ones(case.d) / math.sqrt(case.d)
    q = (q.float().abs() * 0.5 + direction).to(q.dtype)  # every query has a positive dot with the direction
    k = k.clone()
    k[:, :, :16] = (4.0 * direction).to(k.dtype)  # chunk 0's mean scores far above every other chunk's
    sel = reference.select_chunks(q, k, chunk_size=16, topk=2)
    assert torch.all(sel[:, :, 16:] == 0), "the construction must make chunk 0 every row's choice"
    scale = 1.0 / math.sqrt(case.d)
    out, lse = moba_forward_triton(q, k, v, 16, 2, scale)
    kw = dict(chunk_size=16, topk=2, scale=scale)
    out64, lse64 = reference.moba_attention_forward(q.double(), k.double(), v.double(), **kw)
    out_lp, lse_lp = reference.moba_attention_forward(q, k, v, **kw)
    assert_out_lse_within_budget(out, lse, out64, out_lp, lse64, lse_lp, torch.isinf(lse64), q.dtype)
    for det in (False, True):
        check_backward(q, k, v, do, case.c, case.k, deterministic=det)  # gradients, and exact zeros where unattended


def test_everything_masked_gives_zero_gradients() -> None:
    # Every row has lse = -inf: exp2(s - lse2) must be 0, never NaN, and all gradients exactly 0.
    case = kernel_case(1, 64, 4, 2, 16, 3, torch.float16, mask="all_false")
    q, k, v, do, mask = make_inputs(case)
    for det in (False, True):
        for g in check_backward(q, k, v, do, case.c, case.k, mask, deterministic=det):
            assert torch.all(g == 0)


def test_flip_lists_sorted_in_deterministic_mode() -> None:
    b, hq, hkv, lq, n, km1 = 2, 4, 2, 37, 6, 3
    torch.manual_seed(0)
    sel = torch.randint(-1, n, (b, hq, lq, km1), dtype=torch.int32)
    loose = flip_selection(sel, hkv, n, 16)
    tight = flip_selection(sel, hkv, n, 16, deterministic=True)
    assert torch.equal(loose.counts, tight.counts) and torch.equal(loose.seg_start, tight.seg_start)
    for s, (start, count) in enumerate(zip(tight.seg_start.tolist(), tight.counts.tolist())):
        got = tight.lists[start : start + count].tolist()
        assert got == sorted(loose.lists[start : start + count].tolist()), f"segment {s}"


def test_through_the_op() -> None:
    # moba_attention(impl="triton") + .backward(): the registered autograd must reach the Triton backward.
    case = kernel_case(1, 64, 4, 2, 16, 3, torch.bfloat16, mask="random_b1_empty")
    q, k, v, do, mask = make_inputs(case, seed=1)
    dev = TEST_DEVICE
    leaves = [t.detach().clone().to(dev).requires_grad_() for t in (q, k, v)]
    before = ops.CALLS["attention_backward:triton"]
    out = moba_compile.moba_attention(*leaves, chunk_size=case.c, topk=case.k, attn_mask=mask.to(dev), impl="triton")
    out.backward(do.to(dev))
    assert ops.CALLS["attention_backward:triton"] == before + 1
    # The op ran exactly the launcher pair that check_backward checks against the reference; same results.
    expect = check_backward(q, k, v, do, case.c, case.k, mask, deterministic=False)
    assert_same_gradients(tuple(leaf.grad for leaf in leaves), tuple(e.to(dev) for e in expect), atomic_dq=True)


def test_input_validation() -> None:
    q = torch.randn(1, 2, 32, 64).to(torch.float16)
    out, lse = moba_forward_triton(q, q, q, 16, 2, 0.125)
    with pytest.raises(ValueError, match="grad_out"):
        moba_backward_triton(out[:, :, :8], q, q, q, out, lse, 16, 2, 0.125)
    with pytest.raises(ValueError, match="lse"):
        moba_backward_triton(out, q, q, q, out, lse[:, :1], 16, 2, 0.125)
    q65 = torch.zeros(1, 2, 65 * 16, 64, dtype=torch.float16)  # topk 65 needs 65 chunks, else it is clamped
    with pytest.raises(ValueError, match="topk 65 > 64"):
        moba_backward_triton(q65, q65, q65, q65, q65, q65[..., 0].float(), 16, 65, 0.125)
    empty = torch.zeros(1, 2, 0, 64, dtype=torch.float16)
    dq, dk, dv = moba_backward_triton(empty, empty, q, q, empty, torch.zeros(1, 2, 0), 16, 2, 0.125)
    assert dq.shape == empty.shape and torch.all(dk == 0) and torch.all(dv == 0)


@settings(deadline=None, derandomize=True, database=None, max_examples=8)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    chunk=st.sampled_from([16, 32]),
    lk=st.integers(1, 120),
    lq_frac=st.floats(0.0, 1.0),
    topk=st.integers(1, 6),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    d=st.sampled_from([16, 32]),
    masked=st.booleans(),
    deterministic=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(
    b=1, hkv=1, group=1, chunk=16, lk=1, lq_frac=1.0, topk=1, dtype=torch.float16, d=16, masked=False,
    deterministic=True, seed=0,
)  # fmt: skip
@example(
    b=1, hkv=2, group=2, chunk=16, lk=33, lq_frac=0.0, topk=6, dtype=torch.bfloat16, d=32, masked=True,
    deterministic=False, seed=1,
)  # fmt: skip
def test_hypothesis_shapes(b, hkv, group, chunk, lk, lq_frac, topk, dtype, d, masked, deterministic, seed) -> None:
    lq = max(1, round(lq_frac * lk))
    case = kernel_case(
        b, lq, hkv * group, hkv, chunk, topk, dtype, lk=lk, d=d, mask="random_b1_empty" if masked else None
    )
    q, k, v, do, mask = make_inputs(case, seed=seed)
    check_backward(q, k, v, do, chunk, topk, mask, deterministic=deterministic)


def test_launch_configs_follow_the_gpu_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    # Interpreted: today's small tiles whatever the capability. Compiled: sm_90 (and "no GPU to ask", the compile
    # checks on a CPU machine) gets the tuned table; other architectures a safe default with the same maths: at most
    # 2 pipeline stages, no 128-row key-major forward tile, no spilling backward tiling.
    bf16 = torch.bfloat16
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # also when this suite runs compiled (MOBA_TEST_DEVICE=cuda)
    interp_fwd = kernel_forward._fwd_config(128, 128, bf16, False, 4096)
    interp_bwd = kernel_backward._bwd_config(128, 128, bf16, False)
    for cap in (None, (9, 0), (8, 0), (8, 6), (10, 0)):
        assert kernel_forward._fwd_config(128, 128, bf16, False, 4096, cap) == interp_fwd
        assert kernel_backward._bwd_config(128, 128, bf16, False, cap) == interp_bwd
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    shapes = [(64, False, 512), (128, False, 512), (128, False, 4096), (128, True, 4096), (256, False, 64)]
    for d, masked, chunk in shapes:
        tuned = kernel_forward._fwd_config(d, d, bf16, masked, chunk)
        assert kernel_forward._fwd_config(d, d, bf16, masked, chunk, (9, 0)) == tuned
        assert kernel_forward._fwd_config(d, d, bf16, masked, chunk, None) == tuned
        safe = kernel_forward._fwd_config(d, d, bf16, masked, chunk, (8, 6))
        assert safe.block_n == tuned.block_n and safe.sp_prefetch == 0
        assert (safe.block_m, safe.num_warps) == ((64, 4) if d == 128 else (tuned.block_m, tuned.num_warps))
        assert safe.num_stages <= 2 and safe.sparse() == (safe.block_m, safe.block_n, safe.num_warps, safe.num_stages)
        tuned_b = kernel_backward._bwd_config(d, d, bf16, masked)
        assert kernel_backward._bwd_config(d, d, bf16, masked, (9, 0)) == tuned_b
        safe_b = kernel_backward._bwd_config(d, d, bf16, masked, (8, 0))
        assert safe_b.kv_stages <= 2 and safe_b.dq_stages <= 2
        if d == 128 and not masked:  # the tuned tiling spills (paid back on sm_90 only): the masked case's tiles
            assert (safe_b.kv_block_m, safe_b.kv_block_n) == (32, 32)
