"""The MoBA reference (moba_compile.reference) against the brute-force oracle (tests/naive.py) and spec section 1.

Everything numeric runs in float64 unless the test is about low precision; tolerances live in ``conftest`` with their
reasons.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    F64,
    Case,
    bottom_right_causal,
    low_precision_atol,
    make_mask,
    masked_attention,
    own_chunk_causal,
    rand_qkv,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from naive import naive_moba, naive_moba_mask
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from moba_compile import reference

# --------------------------------------------------------------------------------------------------------------------
# The named grid
# --------------------------------------------------------------------------------------------------------------------

GRID = [
    Case(2, 37, 37, 4, 4, 5, 3),  # MHA prefill; 37 = 7 * 5 + 2: partial last chunk
    Case(2, 37, 37, 4, 2, 5, 3),  # GQA
    Case(1, 40, 40, 4, 1, 8, 2),  # MQA, whole chunks only
    Case(2, 13, 41, 4, 2, 6, 3),  # chunked prefill 1 < Lq < Lk
    Case(3, 1, 45, 4, 2, 7, 3),  # decode
    Case(2, 1, 43, 2, 1, 6, 2),  # decode whose own chunk is a 1-key partial chunk (p = 42 = 7 * 6)
    Case(1, 33, 33, 2, 2, 8, 2),  # last chunk holds a single key
    Case(2, 30, 30, 4, 2, 4, 1),  # K = 1: own chunk only
    Case(1, 20, 20, 2, 1, 4, 9),  # K beyond the 5 chunks
    Case(1, 12, 12, 2, 2, 1, 4),  # C = 1: every key its own chunk
    Case(1, 15, 15, 2, 1, 16, 2),  # C > Lk: a single chunk
    Case(1, 15, 15, 2, 1, 15, 1),  # C == Lk
    Case(2, 24, 24, 4, 2, 4, 3, scale=0.37),  # custom scale
    Case(2, 24, 24, 4, 2, 4, 3, d=8, dv=5),  # Dv != D
    Case(2, 16, 16, 2, 2, 4, 2, d=3, dv=11),  # Dv > D, odd head dim
    Case(2, 29, 29, 4, 2, 4, 3, mask="random"),
    Case(2, 29, 29, 4, 2, 4, 3, mask="random_b1"),
    Case(3, 27, 27, 4, 2, 5, 2, mask="left_pad"),  # early rows of padded elements see no key: zeros
    Case(3, 27, 27, 4, 2, 5, 2, mask="right_pad"),
    Case(2, 26, 26, 2, 1, 4, 3, mask="empty_rows"),  # fully masked rows -> zeros
    Case(3, 25, 25, 4, 2, 4, 2, mask="causal_pad"),  # causal AND padding, as Hugging Face builds it
    Case(2, 9, 33, 4, 2, 5, 3, mask="random"),  # chunked prefill with a mask
    Case(3, 1, 33, 4, 2, 5, 3, mask="left_pad"),  # padded decode, mask [B, 1, 1, Lk]
    Case(2, 12, 12, 2, 1, 4, 2, mask="all_false"),  # every row empty
]
GRID_IDS = [c.id for c in GRID]


def naive_lse(q, k, allowed, scale):
    group = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    return torch.logsumexp(s.masked_fill(~allowed, -math.inf), dim=-1)


@pytest.mark.parametrize("case", GRID, ids=GRID_IDS)
def test_reference_matches_naive(case: Case) -> None:
    q, k, v, mask = case.inputs()
    out, lse = reference.moba_attention_forward(q, k, v, attn_mask=mask, **case.params())
    expected = naive_moba(q, k, v, case.c, case.k, case.scale, mask)
    assert out.shape == (case.b, case.hq, case.lq, case.dv or case.d) and out.dtype == torch.float64
    assert_close(out, expected, **F64)
    assert_close(reference.moba_attention(q, k, v, attn_mask=mask, **case.params()), out, rtol=0, atol=0)
    # The log-sum-exp over exactly the attended keys; -inf on empty rows.
    scale = case.scale if case.scale is not None else 1 / math.sqrt(case.d)
    allowed = naive_moba_mask(q, k, case.c, case.k, mask)
    assert_close(lse, naive_lse(q, k, allowed, scale), **F64)
    empty = ~allowed.any(-1)
    assert torch.equal(lse[empty], torch.full_like(lse[empty], -math.inf))
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))


def brute_force_selection(q, k, chunk_size: int, topk: int) -> list:
    """Per (batch, head, row): the list of chosen earlier chunks, best first, from Python floats."""
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    n = -(-lk // chunk_size)
    result = []
    for bi in range(b):
        for h in range(hq):
            keys = k[bi, h // (hq // hkv)].tolist()
            means = []
            for c in range(n):
                rows = keys[c * chunk_size : min(lk, (c + 1) * chunk_size)]
                means.append([sum(col) / len(rows) for col in zip(*rows, strict=True)])
            for i in range(lq):
                own = (lk - lq + i) // chunk_size
                qi = q[bi, h, i].tolist()
                scores = [(sum(a * m for a, m in zip(qi, means[c], strict=True)), c) for c in range(own)]
                best = sorted(scores, reverse=True)[: topk - 1]  # ties: the higher chunk index sorts first
                result.append([c for _, c in best])
    return result


@pytest.mark.parametrize("case", [c for c in GRID if c.mask == "none"], ids=[c.id for c in GRID if c.mask == "none"])
def test_select_chunks_matches_brute_force(case: Case) -> None:
    q, k, _, _ = case.inputs()
    sel = reference.select_chunks(q, k, chunk_size=case.c, topk=case.k)
    # No row has more than ceil(Lk / C) - 1 earlier chunks: a larger topk is clamped (bounded memory, same selection).
    slots = min(case.k, -(-case.lk // case.c)) - 1
    assert sel.dtype == torch.int64 and sel.shape == (case.b, case.hq, case.lq, slots)
    flat = sel.reshape(case.b * case.hq * case.lq, slots).tolist()
    for got, want in zip(flat, brute_force_selection(q, k, case.c, case.k), strict=True):
        assert got == want + [-1] * (slots - len(want))


def test_select_chunks_never_picks_own_or_future_chunks() -> None:
    q, k, _ = rand_qkv(3, 2, 4, 2, 17, 50, 8)
    sel = reference.select_chunks(q, k, chunk_size=4, topk=20)
    own = ((torch.arange(17) + 50 - 17) // 4)[None, None, :, None]
    assert bool((sel < own).all())
    # Every earlier chunk is chosen exactly once when K - 1 exceeds their number.
    for i in range(17):
        row = sel[0, 0, i]
        assert sorted(row[row >= 0].tolist()) == list(range(int(own[0, 0, i, 0])))


# --------------------------------------------------------------------------------------------------------------------
# Degenerate equivalences (spec section 1, "consequences worth testing")
# --------------------------------------------------------------------------------------------------------------------

DENSE_CASES = [
    Case(2, 30, 30, 4, 2, 4, 8),  # K == ceil(30 / 4)
    Case(2, 30, 30, 4, 2, 4, 50),  # K far beyond
    Case(2, 30, 30, 4, 4, 30, 1),  # C == Lk, even with K = 1
    Case(2, 30, 30, 4, 1, 64, 2),  # C > Lk
    Case(2, 11, 30, 4, 2, 7, 5),  # chunked prefill, K == ceil(30 / 7)
    Case(2, 11, 30, 4, 2, 31, 1),  # chunked prefill, C > Lk
    Case(3, 1, 30, 4, 2, 3, 10),  # decode
    Case(3, 1, 30, 4, 2, 30, 1),  # decode, C == Lk
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=[c.id for c in DENSE_CASES])
def test_full_coverage_equals_dense_causal_sdpa(case: Case) -> None:
    q, k, v, _ = case.inputs()
    out = reference.moba_attention(q, k, v, **case.params())
    # SDPA's is_causal is top-left aligned; MoBA's causality is bottom-right, so pass the explicit mask.
    dense = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bottom_right_causal(case.lq, case.lk), enable_gqa=case.hq != case.hkv
    )
    assert_close(out, dense, **F64)


@pytest.mark.parametrize("mask_kind", ["none", "random", "causal_pad"])
def test_decode_steps_equal_prefill_rows(mask_kind: str) -> None:
    case = Case(2, 29, 29, 4, 2, 4, 3, mask=mask_kind, seed=5)
    q, k, v, mask = case.inputs()
    full_mask = None if mask is None else mask.expand(case.b, case.hq, case.lq, case.lk)
    prefill = reference.moba_attention(q, k, v, attn_mask=full_mask, **case.params())
    for t in range(1, case.lk + 1):  # a decode step at every position, with the KV cache up to it
        step_mask = None if full_mask is None else full_mask[:, :, t - 1 : t, :t]
        step = reference.moba_attention(
            q[:, :, t - 1 : t], k[:, :, :t], v[:, :, :t], attn_mask=step_mask, **case.params()
        )
        assert_close(step, prefill[:, :, t - 1 : t], **F64)
    # And the plain decode of the last row against the full cache.
    last = reference.moba_attention(
        q[:, :, -1:], k, v, attn_mask=None if full_mask is None else full_mask[:, :, -1:], **case.params()
    )
    assert_close(last, prefill[:, :, -1:], **F64)


@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("bounds", [(0, 7), (7, 19), (19, 31), (0, 31), (30, 31)], ids=lambda b: f"rows{b[0]}-{b[1]}")
def test_chunked_prefill_rows_equal_prefill_rows(bounds: tuple[int, int], mask_kind: str) -> None:
    case = Case(2, 31, 31, 4, 2, 5, 3, mask=mask_kind, seed=6)
    q, k, v, mask = case.inputs()
    prefill = reference.moba_attention(q, k, v, attn_mask=mask, **case.params())
    a, b = bounds
    # KV cache holding positions [0, b): the queries a..b-1 sit at the bottom right.
    part = reference.moba_attention(
        q[:, :, a:b], k[:, :, :b], v[:, :, :b], attn_mask=None if mask is None else mask[:, :, a:b, :b], **case.params()
    )
    assert_close(part, prefill[:, :, a:b], **F64)
    # Full cache, last rows only (Lq < Lk with keys beyond none of them: b == Lk).
    tail = reference.moba_attention(
        q[:, :, a:], k, v, attn_mask=None if mask is None else mask[:, :, a:], **case.params()
    )
    assert_close(tail, prefill[:, :, a:], **F64)


@pytest.mark.parametrize("mask_kind", ["none", "left_pad", "random"])
def test_batch_split_invariance(mask_kind: str) -> None:
    case = Case(3, 23, 23, 4, 2, 4, 2, mask=mask_kind, seed=7)
    q, k, v, mask = case.inputs()
    together = reference.moba_attention(q, k, v, attn_mask=mask, **case.params())
    for bi in range(3):
        alone = reference.moba_attention(
            q[bi : bi + 1],
            k[bi : bi + 1],
            v[bi : bi + 1],
            attn_mask=None if mask is None else mask[bi : bi + 1],
            **case.params(),
        )
        assert_close(alone, together[bi : bi + 1], **F64)


def test_small_topk_on_long_input_differs_from_dense() -> None:
    q, k, v = rand_qkv(8, 1, 2, 1, 256, 256, 16)
    out = reference.moba_attention(q, k, v, chunk_size=16, topk=2)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    # The first C * K = 32 positions see every earlier key under MoBA too: dense there, to float64 rounding.
    assert_close(out[:, :, :32], dense[:, :, :32], **F64)
    # Later rows drop 14 of 16 chunks at the end: on N(0, 1) data the outputs move by O(0.1) per element, so a mean
    # absolute difference above 0.05 can only come from a sparse path that really ran.
    assert float((out[:, :, 128:] - dense[:, :, 128:]).abs().mean()) > 0.05


@pytest.mark.parametrize(
    "case",
    [Case(2, 26, 26, 4, 2, 4, 1), Case(2, 9, 26, 4, 2, 4, 1), Case(2, 1, 26, 4, 1, 5, 1)],
    ids=lambda c: c.id,
)
def test_topk_one_is_own_chunk_causal(case: Case) -> None:
    q, k, v, _ = case.inputs()
    out = reference.moba_attention(q, k, v, **case.params())
    block_diag = own_chunk_causal(case.lq, case.lk, case.c)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=block_diag, enable_gqa=case.hq != case.hkv)
    assert_close(out, dense, **F64)
    assert torch.equal(reference.select_chunks(q, k, chunk_size=case.c, topk=1), torch.empty(*q.shape[:3], 0).long())


# --------------------------------------------------------------------------------------------------------------------
# Ties go to the later chunk
# --------------------------------------------------------------------------------------------------------------------


def tied_keys(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer-valued q/k (exact in every float dtype; chunk sums and means by 4 are exact, so are the dot products).

    Chunks 0 and 2 are identical and score 19 / 4 = 4.75 against the all-ones query; chunks 1 and 3 score -2.375;
    chunk 4 is the partial last one. Rows in chunks 3 and 4 see an exact tie between chunks 0 and 2 (and 1 and 3).
    """
    hi = torch.tensor([[2.0, 1, 0, 1], [3, 0, 1, 1], [1, 2, 2, 0], [2, 1, 1, 1]])
    lo = -hi / 2
    k = torch.cat([hi, lo, hi, lo, hi[:2]])[None, None].to(dtype)  # Lk = 18, C = 4: chunks 0..3 full, 4 partial
    q = torch.ones(1, 1, 18, 4).to(dtype)
    return q, k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_ties_go_to_later_chunk(dtype: torch.dtype) -> None:
    q, k = tied_keys(dtype)
    means = reference.chunk_means(k, 4)[0, 0] @ torch.ones(4, dtype=means_dtype(dtype))
    assert means[0] == means[2] and means[1] == means[3]  # the ties are exact
    sel2 = reference.select_chunks(q, k, chunk_size=4, topk=2)[0, 0, :, 0].tolist()
    assert sel2[:4] == [-1] * 4  # chunk 0: nothing earlier
    assert sel2[4:8] == [0] * 4  # chunk 1: only chunk 0
    assert sel2[8:12] == [0] * 4  # chunk 2: 0 beats 1
    assert sel2[12:18] == [2] * 6  # chunks 3, 4: 0 and 2 tie, the later one wins
    sel3 = reference.select_chunks(q, k, chunk_size=4, topk=3)[0, 0].tolist()
    assert sel3[12:16] == [[2, 0]] * 4  # both tied chunks, later first
    assert sel3[16:18] == [[2, 0]] * 2
    sel4 = reference.select_chunks(q, k, chunk_size=4, topk=4)[0, 0].tolist()
    assert sel4[16:18] == [[2, 0, 3]] * 2  # then 1 and 3 tie at -4: 3 first


def means_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def test_all_chunks_tied_selects_the_latest() -> None:
    # Every chunk holds the same keys: all scores tie, so the K - 1 chunks just before the own one win.
    k = torch.arange(6.0).reshape(1, 1, 3, 2).repeat(1, 1, 5, 1)  # Lk = 15, C = 3: five identical chunks
    q = torch.randint(-3, 4, (1, 2, 15, 2), generator=torch.Generator().manual_seed(0)).float()  # exact scores
    sel = reference.select_chunks(q, k, chunk_size=3, topk=3)
    for i in range(15):
        own = i // 3
        want = [c for c in (own - 1, own - 2) if c >= 0]
        assert sel[0, :, i].tolist() == [want + [-1] * (2 - len(want))] * 2
    v = torch.randn(1, 1, 15, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = reference.moba_attention(q.double(), k.double(), v, chunk_size=3, topk=3)
    assert_close(out, naive_moba(q, k, v, 3, 3), **F64)


# --------------------------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------------------------

GRAD_CASES = [
    Case(2, 21, 21, 4, 2, 4, 2),
    Case(2, 21, 21, 4, 4, 4, 3, scale=0.6),
    Case(1, 23, 23, 3, 1, 5, 2, d=6, dv=4),
    Case(2, 7, 26, 4, 2, 4, 3),
    Case(3, 1, 26, 4, 2, 4, 2),
    Case(2, 22, 22, 4, 2, 4, 2, mask="empty_rows"),
    Case(3, 22, 22, 4, 2, 4, 2, mask="causal_pad"),
    Case(2, 20, 20, 2, 1, 4, 1),
    Case(2, 12, 12, 2, 1, 4, 2, mask="all_false"),
]


def grad_out_for(out: torch.Tensor, seed: int = 99) -> torch.Tensor:
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.id for c in GRAD_CASES])
def test_autograd_equals_handwritten_backward(case: Case) -> None:
    q, k, v, mask = case.inputs(requires_grad=True)
    out, lse = reference.moba_attention_forward(q, k, v, attn_mask=mask, **case.params())
    go = grad_out_for(out)
    auto = torch.autograd.grad(out, (q, k, v), go)
    hand = reference.moba_attention_backward(
        go, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), attn_mask=mask, **case.params()
    )
    for a, h, t in zip(auto, hand, (q, k, v), strict=True):
        assert h.shape == t.shape and h.dtype == t.dtype
        assert not h.isnan().any()
        assert_close(h, a, **F64)


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.id for c in GRAD_CASES])
def test_gradient_equals_fixed_selection_attention(case: Case) -> None:
    """No gradient through the gate: the reference's gradients are those of plain attention over a constant key set."""
    q, k, v, mask = case.inputs(requires_grad=True)
    out = reference.moba_attention(q, k, v, attn_mask=mask, **case.params())
    with torch.no_grad():
        allowed = naive_moba_mask(q, k, case.c, case.k, mask)
    fixed = masked_attention(q, k, v, allowed, case.scale)
    assert_close(out, fixed, **F64)
    go = grad_out_for(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(fixed, (q, k, v), go), strict=True):
        assert_close(a, b, **F64)


def test_gradcheck_reference() -> None:
    # Fixed seed: the selection's score margins (~0.1) dwarf gradcheck's 1e-6 perturbations, so no chunk flips.
    q, k, v, mask = Case(1, 7, 10, 2, 1, 3, 2, d=4, dv=3, mask="random", seed=11).inputs(requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: reference.moba_attention(q, k, v, chunk_size=3, topk=2, attn_mask=mask), (q, k, v)
    )
    assert torch.autograd.gradcheck(
        lambda q, k, v: reference.moba_attention(q, k, v, chunk_size=2, topk=2, scale=0.9), (q, k, v)
    )


def test_fully_masked_rows_have_zero_output_and_grads() -> None:
    case = Case(2, 22, 22, 4, 2, 4, 2, mask="empty_rows", seed=12)
    q, k, v, mask = case.inputs(requires_grad=True)
    out, lse = reference.moba_attention_forward(q, k, v, attn_mask=mask, **case.params())
    # Empty = no key left once the MoBA selection meets the mask (a superset of the rows the mask alone empties).
    empty = ~naive_moba_mask(q.detach(), k.detach(), case.c, case.k, mask).any(-1)
    assert empty.any() and bool((empty | mask.any(-1)).all())
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert bool(torch.isneginf(lse[empty]).all()) and bool(torch.isfinite(lse[~empty]).all())
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out_for(out))
    for g in (dq, dk, dv):
        assert not g.isnan().any()
    assert torch.equal(dq[empty], torch.zeros_like(dq[empty]))
    hand = reference.moba_attention_backward(
        grad_out_for(out),
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        lse.detach(),
        attn_mask=mask,
        **case.params(),
    )
    assert torch.equal(hand[0][empty], torch.zeros_like(hand[0][empty]))
    # Nothing attends at all: every gradient is exactly zero.
    q, k, v, mask = case.with_(mask="all_false").inputs(requires_grad=True)
    out = reference.moba_attention(q, k, v, attn_mask=mask, **case.params())
    assert torch.equal(out, torch.zeros_like(out))
    for g in torch.autograd.grad(out, (q, k, v), grad_out_for(out)):
        assert torch.equal(g, torch.zeros_like(g))


def test_no_gradient_through_the_gate() -> None:
    # Decode: the row attends its own chunk 7 plus one earlier chunk. Keys of the other six chunks change the gate
    # scores (through their chunk means) but must get no gradient at all.
    q, k, v = rand_qkv(13, 1, 2, 1, 1, 32, 8, requires_grad=True)
    out = reference.moba_attention(q, k, v, chunk_size=4, topk=2)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out_for(out))
    chosen = set(reference.select_chunks(q, k, chunk_size=4, topk=2).flatten().tolist()) | {7}
    assert len(chosen) <= 3  # two query heads share the key head: at most two chosen chunks plus the own one
    for c in range(8):
        keys = slice(4 * c, 4 * c + 4)
        if c in chosen:
            assert dk[0, 0, keys].abs().sum() > 0 and dv[0, 0, keys].abs().sum() > 0
        else:
            assert torch.equal(dk[0, 0, keys], torch.zeros_like(dk[0, 0, keys]))
            assert torch.equal(dv[0, 0, keys], torch.zeros_like(dv[0, 0, keys]))
    # A perturbation of an unchosen chunk's key that moves its mean but not the selection leaves the output unchanged.
    unchosen = min(set(range(7)) - chosen)
    k2 = k.detach().clone()
    k2[0, 0, 4 * unchosen] += 1e-3
    assert torch.equal(
        reference.select_chunks(q, k2, chunk_size=4, topk=2), reference.select_chunks(q, k, chunk_size=4, topk=2)
    )
    assert torch.equal(reference.moba_attention(q.detach(), k2, v.detach(), chunk_size=4, topk=2), out.detach())


# --------------------------------------------------------------------------------------------------------------------
# Low precision
# --------------------------------------------------------------------------------------------------------------------

LOW_CASES = [
    Case(2, 33, 33, 4, 2, 5, 3),
    Case(2, 9, 40, 4, 1, 8, 2, mask="random"),
    Case(3, 1, 40, 4, 2, 6, 3, mask="left_pad"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", LOW_CASES, ids=[c.id for c in LOW_CASES])
def test_low_precision_dtype_and_error(case: Case, dtype: torch.dtype) -> None:
    q, k, v, mask = case.inputs(dtype=dtype, requires_grad=True)
    out, lse = reference.moba_attention_forward(q, k, v, attn_mask=mask, **case.params())
    assert out.dtype == dtype and lse.dtype == torch.float32
    # The float64 reference on the same (already rounded) values: the gap is the reference's own rounding only.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    # The fp32 gate must pick what the fp64 gate picks on these values, or the comparison below would be meaningless.
    assert torch.equal(
        reference.select_chunks(q, k, chunk_size=case.c, topk=case.k),
        reference.select_chunks(q64, k64, chunk_size=case.c, topk=case.k),
    )
    ref = reference.moba_attention(q64, k64, v64, attn_mask=mask, **case.params())
    assert_close(out.double(), ref, rtol=0, atol=low_precision_atol(dtype, ref))
    go = grad_out_for(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    for g, r, t in zip(grads, ref_grads, (q, k, v), strict=True):
        assert g.dtype == dtype and g.shape == t.shape
        # Gradients too are accumulated in fp32 and rounded once to the input dtype.
        assert_close(g.double(), r, rtol=0, atol=low_precision_atol(dtype, r))


# --------------------------------------------------------------------------------------------------------------------
# GQA: key/value are not repeated
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 2), (4, 1)], ids=["GQA2", "GQA3", "MQA"])
def test_gqa_equals_mha_on_repeated_keys(hq: int, hkv: int) -> None:
    case = Case(2, 19, 19, hq, hkv, 4, 2, mask="random", seed=14)
    q, k, v, mask = case.inputs()
    gqa = reference.moba_attention(q, k, v, attn_mask=mask, **case.params())
    group = hq // hkv
    mha = reference.moba_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, **case.params()
    )
    assert_close(gqa, mha, **F64)
    assert_close(gqa, naive_moba(q, k, v, case.c, case.k, None, mask), **F64)


class LargestAllocation(TorchDispatchMode):
    """Largest storage (in elements) among the floating tensors produced by any dispatched op."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def test_gqa_never_materialises_repeated_keys() -> None:
    b, hq, hkv, lq, lk, d = 1, 8, 1, 4, 128, 16
    q, k, v = rand_qkv(15, b, hq, hkv, lq, lk, d)
    repeated = b * hq * lk * d  # what k or v repeated over the query heads would take
    with LargestAllocation() as probe:
        reference.moba_attention_forward(q, k, v, chunk_size=16, topk=3)
    assert probe.largest < repeated, probe.largest
    # The probe does see a repeat: the oracle's repeat_interleave trips it.
    with LargestAllocation() as probe:
        masked_attention(q, k, v, bottom_right_causal(lq, lk))
    assert probe.largest >= repeated


# --------------------------------------------------------------------------------------------------------------------
# Hypothesis: shapes and seeds, not tensors
# --------------------------------------------------------------------------------------------------------------------


@st.composite
def cases(draw) -> Case:
    lk = draw(st.integers(1, 40))
    lq = draw(st.one_of(st.just(lk), st.just(1), st.integers(1, lk)))
    hkv = draw(st.integers(1, 2))
    return Case(
        b=draw(st.integers(1, 2)),
        lq=lq,
        lk=lk,
        hq=hkv * draw(st.sampled_from([1, 2, 3])),
        hkv=hkv,
        c=draw(st.integers(1, 12)),
        k=draw(st.integers(1, 6)),
        d=draw(st.integers(1, 6)),
        dv=draw(st.integers(1, 6)),
        mask=draw(st.sampled_from(["none", "none", "random", "left_pad", "empty_rows"])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(deadline=None, derandomize=True, database=None, max_examples=40)
@given(case=cases())
@example(case=Case(1, 1, 1, 1, 1, 1, 1))  # a single token
@example(case=Case(1, 6, 6, 2, 1, 1, 1))  # C = 1 and K = 1: each row sees only itself
@example(case=Case(2, 17, 17, 3, 1, 4, 99))  # K far beyond the chunk count
@example(case=Case(1, 1, 25, 2, 2, 4, 2))  # decode whose own chunk is the lone key 24
@example(case=Case(2, 9, 9, 2, 1, 4, 2, mask="all_false"))  # no row sees any key
@example(case=Case(2, 1, 13, 4, 2, 13, 3, mask="left_pad"))  # decode, one chunk, padded
def test_reference_matches_naive_hypothesis(case: Case) -> None:
    q, k, v, mask = case.inputs(requires_grad=True)
    out, lse = reference.moba_attention_forward(q, k, v, attn_mask=mask, **case.params())
    assert_close(out, naive_moba(q.detach(), k.detach(), v.detach(), case.c, case.k, case.scale, mask), **F64)
    go = grad_out_for(out, seed=case.seed)
    auto = torch.autograd.grad(out, (q, k, v), go)
    hand = reference.moba_attention_backward(
        go, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), attn_mask=mask, **case.params()
    )
    for a, h in zip(auto, hand, strict=True):
        assert_close(h, a, **F64)


# --------------------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------------------


def _base():
    q, k, v = rand_qkv(0, 1, 4, 2, 8, 8, 8, 6, dtype=torch.float32)
    return {"query": q, "key": k, "value": v, "chunk_size": 4, "topk": 2, "scale": None, "attn_mask": None}


BAD_INPUTS = {
    "query-rank3": ({"query": torch.randn(4, 8, 8)}, ValueError, r"query must be 4-D"),
    "key-rank5": ({"key": torch.randn(1, 2, 8, 8, 1)}, ValueError, r"key must be 4-D"),
    "query-not-tensor": ({"query": [[1.0]]}, TypeError, r"query must be a torch\.Tensor"),
    "Hq%Hkv": (
        {"key": torch.randn(1, 3, 8, 8), "value": torch.randn(1, 3, 8, 6)},
        ValueError,
        r"multiple of key/value",
    ),
    "head-dim": ({"key": torch.randn(1, 2, 8, 5)}, ValueError, r"head dims differ: query 8, key 5"),
    "Lq>Lk": ({"query": torch.randn(1, 4, 9, 8)}, ValueError, r"Lq=9 > Lk=8"),
    "Lk=0": (
        {"query": torch.randn(1, 4, 0, 8), "key": torch.randn(1, 2, 0, 8), "value": torch.randn(1, 2, 0, 6)},
        ValueError,
        r"key sequence is empty",
    ),
    "dtype-mix": ({"key": torch.randn(1, 2, 8, 8, dtype=torch.float64)}, ValueError, r"must share a dtype"),
    "int-query": ({"query": torch.ones(1, 4, 8, 8, dtype=torch.int64)}, ValueError, r"query must be a floating-point"),
    "batch": ({"key": torch.randn(2, 2, 8, 8)}, ValueError, r"batch sizes differ"),
    "float-mask": ({"attn_mask": torch.zeros(8, 8)}, ValueError, r"only boolean masks"),
    "mask-shape": ({"attn_mask": torch.ones(1, 3, 8, 8, dtype=torch.bool)}, ValueError, r"does not broadcast"),
    "mask-too-big": ({"attn_mask": torch.ones(2, 4, 8, 8, dtype=torch.bool)}, ValueError, r"does not broadcast"),
    "chunk_size=0": ({"chunk_size": 0}, ValueError, r"chunk_size must be >= 1, got 0"),
    "topk=0": ({"topk": 0}, ValueError, r"topk must be >= 1, got 0"),
    "topk=-3": ({"topk": -3}, ValueError, r"topk must be >= 1, got -3"),
    "chunk_size=True": ({"chunk_size": True}, TypeError, r"chunk_size must be an int"),
    "topk=2.0": ({"topk": 2.0}, TypeError, r"topk must be an int"),
    "chunk_size=4.5": ({"chunk_size": 4.5}, TypeError, r"chunk_size must be an int"),
    "scale=inf": ({"scale": math.inf}, ValueError, r"scale must be finite"),
    "scale=nan": ({"scale": math.nan}, ValueError, r"scale must be finite"),
    "scale=str": ({"scale": "0.5"}, TypeError, r"scale must be a float"),
}


@pytest.mark.parametrize("entry", ["moba_attention", "moba_attention_forward"])
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_invalid_inputs_raise(name: str, entry: str) -> None:
    change, exc, pattern = BAD_INPUTS[name]
    kwargs = {**_base(), **change}
    with pytest.raises(exc, match=pattern):
        getattr(reference, entry)(**kwargs)


def test_select_chunks_validates() -> None:
    q, k, _ = rand_qkv(0, 1, 4, 2, 8, 8, 8)
    with pytest.raises(ValueError, match=r"topk must be >= 1"):
        reference.select_chunks(q, k, chunk_size=4, topk=0)
    with pytest.raises(ValueError, match=r"Lq=9 > Lk=8"):
        reference.select_chunks(torch.randn(1, 4, 9, 8, dtype=torch.float64), k, chunk_size=4, topk=2)


def test_make_mask_shapes() -> None:
    # The helper's masks must broadcast as the grid assumes (a wrong shape would silently test less).
    for kind in ("random", "random_b1", "left_pad", "right_pad", "empty_rows", "causal_pad", "all_false"):
        mask = make_mask(kind, 3, 4, 6, 9)
        assert torch.broadcast_shapes(mask.shape, (3, 4, 6, 9)) == (3, 4, 6, 9)
        assert mask.dtype == torch.bool
    assert make_mask("left_pad", 3, 4, 6, 9)[:, 0, 0].sum(-1).tolist() == [9, 6, 3]
