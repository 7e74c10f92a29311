"""The ops without autograd and with mutated inputs (issue "no policy or result is silently wrong", item 4, ops part).

- ``torch.inference_mode()`` gives exactly the ``no_grad`` results, for ``moba::analyse_mask`` and ``moba::attention``
  with a boolean padding mask (reference and interpreted Triton).
- Without grad (``no_grad``, ``inference_mode``, or inputs that need none) nothing is saved for backward.
- No result is cached by tensor identity: a mask or key mutated in place (same tensor, same address) is analysed and
  attended afresh. ops.py and kernels/ keep no such cache (see the comments at ``ops.CALLS`` and
  ``ops.MASK_OBSERVATIONS``); these tests keep it that way.
"""

from __future__ import annotations

import pytest
import torch
from conftest import F64, bottom_right_causal, make_mask, rand_qkv

import moba_compile
from moba_compile import masks, ops
from moba_compile.ops import MASK_APPLY, MASK_CAUSAL, MASK_NOT_CAUSAL

ANALYSE = torch.ops.moba.analyse_mask.default


def _padding_inputs(lq: int, dtype: torch.dtype = torch.float64, d: int = 8):  # noqa: ANN202
    """Seeded q/k/v (B=3, Hq=4, Hkv=2, Lk=24) and the Hugging Face form of a left-padding mask (causal AND padding)."""
    q, k, v = rand_qkv(7, 3, 4, 2, lq, 24, d, dtype=dtype)
    return q, k, v, make_mask("causal_pad", 3, 4, lq, 24)


@pytest.mark.parametrize("lq", [24, 5, 1], ids=["prefill", "chunked", "decode"])
def test_analyse_mask_under_inference_mode_equals_no_grad(lq: int) -> None:
    q, k, _, mask = _padding_inputs(lq)
    with torch.no_grad():
        want = ANALYSE(mask, q, k, "")
    with torch.inference_mode():
        got = ANALYSE(mask, q, k, "")
    assert got.is_inference() and int(got) == int(want) == MASK_APPLY


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("lq", [24, 5, 1], ids=["prefill", "chunked", "decode"])
def test_attention_under_inference_mode_equals_no_grad(lq: int, impl: str) -> None:
    dtype, d = (torch.float32, 16) if impl == "triton" else (torch.float64, 8)
    q, k, v, mask = _padding_inputs(lq, dtype, d)
    chunk = 16 if impl == "triton" else 4

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        kind = ANALYSE(mask, q, k, "")
        via_kind = ops.attention(q, k, v, chunk_size=chunk, topk=2, attn_mask=mask, mask_kind=kind, impl=impl)
        public = moba_compile.moba_attention(q, k, v, chunk_size=chunk, topk=2, attn_mask=mask, impl=impl)
        return via_kind, public

    with torch.no_grad():
        want = run()
    with torch.inference_mode():
        got = run()
    for g, w in zip(got, want):
        assert g.is_inference() and not g.requires_grad
        assert torch.equal(g, w)
    assert torch.equal(want[0], want[1])  # the analysed kind (APPLY) applies the mask, as no kind does


class _SaveCounter(torch.autograd.graph.saved_tensors_hooks):
    """Counts the tensors autograd saves for backward while active."""

    def __init__(self) -> None:
        self.saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            self.saved += 1
            return t

        super().__init__(pack, lambda t: t)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad-enabled-control"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_no_tensors_saved_without_grad(mode: str, masked: bool) -> None:
    q, k, v, mask = _padding_inputs(24)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    counter = _SaveCounter()
    with context(), counter:
        out = moba_compile.moba_attention(q, k, v, chunk_size=4, topk=2, attn_mask=mask if masked else None)
        raw, _ = torch.ops.moba.attention(q, k, v, mask if masked else None, None, 4, 2, 0.35, 0, "reference")
    if mode == "grad-enabled-control":
        # The hook does see what the op saves when grad is on (q, k, v, out, lse, ... for each of the two calls).
        assert counter.saved >= 10 and out.grad_fn is not None and raw.grad_fn is not None
    else:
        assert counter.saved == 0
        assert out.grad_fn is None and raw.grad_fn is None and not out.requires_grad


def test_inputs_needing_no_grad_save_nothing() -> None:
    q, k, v, _ = _padding_inputs(24)
    counter = _SaveCounter()
    with counter:
        out = moba_compile.moba_attention(q, k, v, chunk_size=4, topk=2)
    assert counter.saved == 0 and out.grad_fn is None


def test_vmap_under_inference_mode_equals_no_grad() -> None:
    q, k, v, mask = _padding_inputs(24)
    qs = torch.stack([q, 2 * q])

    def fn(q_: torch.Tensor) -> torch.Tensor:
        return moba_compile.moba_attention(q_, k, v, chunk_size=4, topk=2, attn_mask=mask)

    with torch.no_grad():
        want = torch.vmap(fn)(qs)
    with torch.inference_mode():
        got = torch.vmap(fn)(qs)
    assert torch.equal(got, want)


def test_mask_mutated_in_place_is_analysed_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    # Same tensor object and address, new contents: an identity-keyed cache would answer with the old kind.
    monkeypatch.setattr(masks, "MASK_OBSERVATIONS", {})  # its home; ops re-exports it
    q, k, _, _ = _padding_inputs(24)
    mask = bottom_right_causal(24, 24).clone()
    ptr = mask.data_ptr()
    assert int(ANALYSE(mask, q, k, "t")) == MASK_CAUSAL
    mask[0, 5] = True  # row 0 may now see a later key
    assert mask.data_ptr() == ptr
    assert int(ANALYSE(mask, q, k, "t")) == MASK_NOT_CAUSAL
    mask[0, 5] = False
    with torch.inference_mode():
        assert int(ANALYSE(mask, q, k, "t")) == MASK_CAUSAL
    # The observation is a report (the worst kind seen under the tag), not what later calls are answered from.
    assert masks.MASK_OBSERVATIONS == {"t": MASK_NOT_CAUSAL}


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_inputs_mutated_in_place_are_attended_afresh(impl: str) -> None:
    dtype, d, chunk = (torch.float32, 16, 16) if impl == "triton" else (torch.float64, 8, 4)
    q, k, v, mask = _padding_inputs(24, dtype, d)
    first = moba_compile.moba_attention(q, k, v, chunk_size=chunk, topk=2, attn_mask=mask, impl=impl)
    k.mul_(-1.5)  # new gate scores and attention weights, same storage
    mask[1, ..., 8:12] = False
    second = moba_compile.moba_attention(q, k, v, chunk_size=chunk, topk=2, attn_mask=mask, impl=impl)
    fresh = moba_compile.moba_attention(q, k.clone(), v, chunk_size=chunk, topk=2, attn_mask=mask.clone(), impl=impl)
    assert torch.equal(second, fresh)
    assert not torch.allclose(first, second, **F64)
