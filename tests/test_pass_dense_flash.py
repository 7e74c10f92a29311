"""Dense layers at full speed: the policy's ``dense_sdpa = "flash_when_causal"`` and ``moba::dense_attention``.

A dense site with a boolean mask runs flash where the mask is exactly causal (``is_causal=True`` for ``Lq == Lk``, no
mask for one decode query) and its own masked SDPA call elsewhere. Every test checks the result against SDPA with the
mask (the call the site had) and reads ``ops.CALLS`` to prove which branch ran.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import F64
from models import TINY_LLAMA

import moba_compile
from moba_compile import dense_ops, ops
from moba_compile.masks import MASK_APPLY, MASK_CAUSAL, MASK_DOCUMENTS, MASK_NOT_CAUSAL, analyse_mask
from moba_compile.report import FLASH_RAN, MASKED_RAN

transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")

# The all-dense policies convert no site to MoBA, which the backend rightly warns about; here that is the point.
pytestmark = pytest.mark.filterwarnings("ignore::moba_compile.MobaCompileWarning")

FLASH = "flash_when_causal"
MOBA_POLICY = {"chunk_size": 4, "topk": 2, "dense_last": 1, "dense_sdpa": FLASH}  # layers 0, 1 MoBA; layer 2 dense
ALL_DENSE = {"version": 1, "rules": [{"module": "re:.*", "mode": "dense"}], "dense_sdpa": FLASH}
F32 = {"rtol": 1e-5, "atol": 1e-5}  # float32: flash and the masked kernel sum in different orders


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n, length, d).reshape(b, h * n, length, d)


def _mask(case: str, lq: int, lk: int, batch: int = 2) -> torch.Tensor:
    pos = torch.arange(lq)[:, None] + (lk - lq)
    mask = (torch.arange(lk)[None, :] <= pos).expand(batch, 1, lq, lk).clone()
    if case == "padding":
        mask[0, ..., :2] = False
    elif case == "non-causal":
        mask[1] = True
    elif case == "documents":
        doc = (torch.arange(lk) >= lk // 2).long()
        mask &= doc[None, None, -lq:, None] == doc[None, None, None, :]
    return mask


def _calls(before: dict[str, int]) -> dict[str, int]:
    return {
        k: n - before.get(k, 0)
        for k, n in ops.CALLS.items()
        if k.startswith("dense_attention") and n != before.get(k, 0)
    }


# (mask case, Lq, Lk, the kind analyse_mask finds, the branch that must run)
OP_CASES = [
    ("causal", 8, 8, MASK_CAUSAL, "flash"),
    ("padding", 8, 8, MASK_APPLY, "masked"),
    ("non-causal", 8, 8, MASK_NOT_CAUSAL, "masked"),
    ("documents", 8, 8, MASK_DOCUMENTS, "masked"),
    ("causal", 1, 8, MASK_CAUSAL, "flash"),  # decode: the one query sees every key, no mask needed
    ("padding", 1, 8, MASK_APPLY, "masked"),
    ("causal", 3, 8, MASK_CAUSAL, "masked"),  # chunked prefill: bottom-right causal, not flash's top-left is_causal
]


@pytest.mark.parametrize(("case", "lq", "lk", "kind", "branch"), OP_CASES)
@pytest.mark.parametrize("n_rep", [1, 2])
def test_op_equals_sdpa_with_the_mask_and_takes_the_right_branch(case, lq, lk, kind, branch, n_rep):
    torch.manual_seed(0)
    b, hkv, d = 2, 2, 16
    # The query in the layout a model's transpose(1, 2) gives it, as transformers hands it to SDPA.
    q = torch.randn(b, lq, hkv * n_rep, d, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k = torch.randn(b, hkv, lk, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, lk, d, dtype=torch.float64, requires_grad=True)
    mask = _mask(case, lq, lk)
    assert analyse_mask(mask, lq, lk) == kind
    mask_kind = torch.tensor(kind)
    before = dict(ops.CALLS)
    out = dense_ops.dense_attention(q, k, v, mask, mask_kind, scale=0.3, n_rep=n_rep)
    expected = F.scaled_dot_product_attention(q, _repeat(k, n_rep), _repeat(v, n_rep), attn_mask=mask, scale=0.3)
    grad = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    assert _calls(before) == {f"dense_attention:{branch}": 1, f"dense_attention_backward:{branch}": 1}
    if branch == "masked":
        # The site's own SDPA call, recomputed under autograd for the backward: the same numbers, bit for bit.
        assert torch.equal(out, expected)
        assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))
    else:
        torch.testing.assert_close(out, expected, **F64)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, **F64)
    # One layout whatever the branch and the inputs' strides: [B, H, L, D] stored as [B, L, H, D], which a model's
    # out.transpose(1, 2).contiguous() reads without a copy.
    for t in (out, *grads):
        assert t.transpose(1, 2).is_contiguous()


def test_masked_branch_keeps_the_calls_enable_gqa():
    torch.manual_seed(1)
    q = torch.randn(2, 4, 8, 16, requires_grad=True)
    k = torch.randn(2, 2, 8, 16, requires_grad=True)
    mask = _mask("padding", 8, 8)
    out = dense_ops.dense_attention(q, k, k, mask, torch.tensor(MASK_APPLY), scale=0.25, enable_gqa=True)
    expected = F.scaled_dot_product_attention(q, k, k, attn_mask=mask, scale=0.25, enable_gqa=True)
    assert torch.equal(out, expected)
    assert all(
        torch.equal(a, b)
        for a, b in zip(torch.autograd.grad(out.sum(), (q, k)), torch.autograd.grad(expected.sum(), (q, k)))
    )


@pytest.mark.parametrize(("case", "lq"), [("causal", 8), ("padding", 8), ("causal", 1)])
def test_op_passes_opcheck(case, lq):
    # Schema, fake kernel (shapes and strides of both branches), registered autograd and AOT dispatch.
    torch.manual_seed(2)
    q = torch.randn(2, 8, 4, 16).transpose(1, 2)[:, :, :lq].requires_grad_()
    k = torch.randn(2, 2, 8, 16, requires_grad=True)
    v = torch.randn(2, 2, 8, 16, requires_grad=True)
    mask = _mask(case, lq, 8)
    kind = torch.tensor(analyse_mask(mask, lq, 8))
    torch.library.opcheck(torch.ops.moba.dense_attention.default, (q, k, v, mask, kind, 0.25, 2, False))


def test_flash_is_refused_where_no_kernel_takes_the_inputs():
    q = torch.randn(1, 2, 4, 8)
    assert dense_ops.flash_branch(MASK_CAUSAL, q, q, q) is True
    assert dense_ops.flash_branch(MASK_CAUSAL, q, q, torch.randn(1, 2, 4, 16)) is None  # head dims differ
    assert dense_ops.flash_branch(MASK_CAUSAL, q.to(torch.int64), q, q) is None
    assert dense_ops.flash_branch(MASK_APPLY, q, q, q) is None
    assert "does not take torch.int32" in dense_ops.flash_kernel_unsupported_reason(
        torch.device("cpu"), torch.int32, (8, 8, 8)
    )


# --------------------------------------------------------------------------------------------------------------------
# Under torch.compile(backend="moba") on a tiny Hugging Face Llama
# --------------------------------------------------------------------------------------------------------------------


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_LLAMA)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _inputs(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and the attention mask the model gets: a 2-D padding mask, or a 4-D boolean mask transformers hands
    SDPA as it is (torch 2.13 would otherwise run is_causal without a mask when nothing is padded)."""
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    if case == "padding":
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding
        return ids, mask
    return ids, _mask(case, 12, 12)


def _train_step(model, policy, ids, mask, compiler):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moba", options={"policy": policy, "compiler": compiler})
    before = dict(ops.CALLS)
    out = compiled(ids, attention_mask=mask, labels=ids, use_cache=False)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    return out.logits.detach(), grads, _calls(before)


@pytest.mark.parametrize(
    ("case", "branch", "compiler"),
    [("causal", "flash", "inductor"), ("padding", "masked", "aot_eager"), ("non-causal", "masked", "aot_eager")],
)
def test_compiled_training_equals_the_masked_sdpa_run(case, branch, compiler):
    ids, mask = _inputs(case)
    model = _llama().train()
    reference = copy.deepcopy(model)
    logits, grads, calls = _train_step(model, MOBA_POLICY, ids, mask, compiler)
    # The reference (SDPA's masked kernel as the model calls it) under aot_eager whatever the case's compiler: what
    # the Inductor case tests is the flash branch through Inductor, and a second Inductor compile of the whole
    # training step would only double the case's cost (~20 s on two cores).
    expected_logits, expected_grads, reference_calls = _train_step(
        reference, {**MOBA_POLICY, "dense_sdpa": "as_is"}, ids, mask, "aot_eager"
    )
    # The one dense layer (layer 2) ran the branch its mask calls for, forward and backward; as_is runs no such op.
    assert calls == {f"dense_attention:{branch}": 1, f"dense_attention_backward:{branch}": 1}
    assert reference_calls == {}
    torch.testing.assert_close(logits, expected_logits, **F32)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, **F32)


@pytest.mark.parametrize(("case", "ran"), [("causal", FLASH_RAN), ("padding", MASKED_RAN)])
def test_report_shows_which_dense_site_takes_flash_and_which_ran(case, ran):
    ids, mask = _inputs(case)
    report = moba_compile.explain(_llama().eval(), ids, attention_mask=mask, use_cache=False, policy=MOBA_POLICY)
    dense = report.dense_sites
    assert [s.layer for s in dense] == [2]
    assert "dense_sdpa = 'flash_when_causal': flash attention" in dense[0].reason
    assert dense[0].reason.endswith(ran)
    assert dense[0].mask_tag == report.moba_sites[0].mask_tag  # one mask check per forward, shared with MoBA sites
    as_is = moba_compile.explain(
        _llama().eval(), ids, attention_mask=mask, use_cache=False, policy={**MOBA_POLICY, "dense_sdpa": "as_is"}
    )
    assert "dense_sdpa" not in as_is.dense_sites[0].reason and as_is.dense_sites[0].mask_tag is None


@pytest.fixture(scope="module")
def decode_models():
    """The tiny Llama compiled once per policy (flash_when_causal, and as_is as the reference), shared by both mask
    cases: their steps have the same shapes and differ only in the masks' values, which the compiled op reads at run
    time (the branch it takes is counted per call), so the second case runs the first one's graphs."""
    torch._dynamo.reset()
    model = _llama().eval()
    return {
        name: torch.compile(model, backend="moba", options={"policy": policy, "compiler": "aot_eager"})
        for name, policy in (("flash", ALL_DENSE), ("as_is", {**ALL_DENSE, "dense_sdpa": "as_is"}))
    }


def _decode(compiled, steps_masks):
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    cache = transformers.DynamicCache(config=compiled.config)
    logits = []
    with torch.no_grad():
        out = compiled(ids, past_key_values=cache, use_cache=True)
        before = dict(ops.CALLS)
        for mask in steps_masks:
            token = out.logits[:, -1:].argmax(-1)
            out = compiled(token, past_key_values=out.past_key_values, attention_mask=mask, use_cache=True)
            logits.append(out.logits)
    return logits, _calls(before)


@pytest.mark.parametrize(("case", "branch"), [("causal", "flash"), ("padding", "masked")])
def test_compiled_decode_steps_equal_the_masked_sdpa_run(case, branch, decode_models):
    # Each decode step hands SDPA a [B, 1, 1, Lk] mask: all True (exactly causal for one query: flash without a mask)
    # or with a padded key (masked SDPA as before).
    masks = []
    for lk in (11, 12, 13):
        mask = torch.ones(2, 1, 1, lk, dtype=torch.bool)
        if case == "padding":
            mask[1, ..., 0] = False
        masks.append(mask)
    logits, calls = _decode(decode_models["flash"], masks)
    expected, reference_calls = _decode(decode_models["as_is"], masks)
    layers = TINY_LLAMA["num_hidden_layers"]
    assert calls == {f"dense_attention:{branch}": layers * len(masks)}
    assert reference_calls == {}
    for got, want in zip(logits, expected):
        torch.testing.assert_close(got, want, **F32)


def test_default_policy_leaves_dense_sites_bit_for_bit():
    ids, mask = _inputs("causal")
    model = _llama().eval()
    policy = {key: value for key, value in MOBA_POLICY.items() if key != "dense_sdpa"}
    torch._dynamo.reset()
    before = dict(ops.CALLS)
    report = moba_compile.explain(model, ids, attention_mask=mask, use_cache=False, policy=policy)
    assert _calls(before) == {}
    assert report.dense_sites[0].reason == "dense_last=1: layer 2 is among the last 1 of 3 attention layers"


def test_chunked_prefill_dense_site_is_reported_not_eligible():
    # Several new queries over a longer cache: bottom-right causality, which flash's is_causal (top-left) is not.
    model = _llama().eval()
    ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(5))
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :8], past_key_values=cache, use_cache=True)
    mask = _mask("causal", 4, 12, batch=1)
    report = moba_compile.explain(
        model, ids[:, 8:], past_key_values=cache, attention_mask=mask, use_cache=True, policy=ALL_DENSE
    )
    assert report.dense_sites and all(
        "dense_sdpa = 'flash_when_causal' does not apply (several queries over a longer KV cache" in s.reason
        for s in report.dense_sites
    )
