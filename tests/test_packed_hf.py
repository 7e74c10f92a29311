"""Packed documents in Hugging Face models (issue 17): the compile pass and the ``attn_implementation`` path.

transformers' SDPA path builds a block-diagonal causal mask for a packed row (position ids restarting at 0, as
``DataCollatorWithFlattening`` gives them, with ``use_cache=False``). ``moba::analyse_mask`` recognises it at run time
and every document runs as MoBA on its own, so a packed row gives the logits and gradients of its documents run one by
one. Tiny Llama (tests/models.py TINY_LLAMA), float64, reference implementation.
"""

from __future__ import annotations

import pytest
import torch
from models import TINY_LLAMA

import moba_compile
import moba_compile.hf
from moba_compile import ops

transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")

# Chunk 8, top-2, the last layer dense: the 30- and 24-token documents are sparse MoBA.
POLICY = {"chunk_size": 8, "topk": 2, "dense_last": 1}
LENGTHS = [7, 30, 3, 24]
F64 = {"rtol": 1e-9, "atol": 1e-9}


def _model(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_LLAMA)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).double().eval()


def _packed_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 64, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return ids, positions


def _per_document(fn, ids: torch.Tensor) -> torch.Tensor:
    bounds = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    return torch.cat([fn(ids[:, s:e]) for s, e in zip(bounds[:-1], bounds[1:])], dim=1)


def _packed_docs() -> int:
    return sum(n for key, n in ops.CALLS.items() if key.startswith("attention:packed:"))


def test_compiled_model_on_a_packed_row_equals_its_documents_one_by_one() -> None:
    model = _model()
    ids, positions = _packed_inputs()
    compiled = torch.compile(model, backend="moba", options={"policy": POLICY, "compiler": "eager"})
    before = _packed_docs()
    packed = compiled(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert _packed_docs() - before == 2 * len(LENGTHS)  # two MoBA layers, every document

    def one(doc_ids: torch.Tensor) -> torch.Tensor:
        return compiled(input_ids=doc_ids, use_cache=False).logits

    torch._dynamo.reset()
    torch.testing.assert_close(packed, _per_document(one, ids), **F64)
    # explain() reports the run-time finding: the MoBA layers' form is "packed".
    report = moba_compile.explain(model, ids, policy=POLICY, position_ids=positions, use_cache=False)
    forms = {s.layer: (s.decision, s.form) for s in report.sites}
    assert forms == {0: ("moba", "packed"), 1: ("moba", "packed"), 2: ("dense", "mask")}
    assert all("MoBA per document" in s.reason for s in report.sites if s.decision == "moba")


def test_compiled_gradients_on_a_packed_row_equal_the_documents_one_by_one() -> None:
    model = _model()
    ids, positions = _packed_inputs()
    compiled = torch.compile(model, backend="moba", options={"policy": POLICY, "compiler": "eager"})
    labels = ids.masked_fill(positions == 0, -100)
    loss = compiled(input_ids=ids, position_ids=positions, labels=labels, use_cache=False).loss
    n_scored = int((labels[:, 1:] != -100).sum())
    (loss * n_scored).backward()
    packed = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    bounds = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e - s < 2:
            continue  # a document of one token predicts nothing
        doc_loss = compiled(input_ids=ids[:, s:e], labels=ids[:, s:e], use_cache=False).loss
        (doc_loss * (e - s - 1)).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed[name], p.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_attention_function_on_a_packed_row_equals_its_documents_one_by_one() -> None:
    model = _model()
    ids, positions = _packed_inputs()
    attention = moba_compile.hf.register(POLICY, name="moba_packed_test")
    model.set_attn_implementation("moba_packed_test")
    before = _packed_docs()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        assert _packed_docs() - before == 2 * len(LENGTHS)
        alone = _per_document(lambda x: model(input_ids=x, use_cache=False).logits, ids)
    torch.testing.assert_close(packed, alone, **F64)
    decisions = {s.layer: s.decision for s in attention.report().sites}
    assert decisions == {0: "moba", 1: "moba", 2: "dense"}


def _cu() -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)


def test_attention_function_takes_cu_seq_lens_and_reports_the_form() -> None:
    model = _model()
    ids, positions = _packed_inputs()
    attention = moba_compile.hf.register(POLICY, name="moba_packed_cu")
    model.set_attn_implementation("moba_packed_cu")
    cu = _cu()
    flash_kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(), "max_length_q": 30, "max_length_k": 30}
    with torch.no_grad():
        alone = _per_document(lambda x: model(input_ids=x, use_cache=False).logits, ids)
        # The boundaries alone (no position ids, so the rotary positions run on over the row and no mask is built):
        # the boundaries give the documents, every MoBA layer runs them.
        before = ops.CALLS["packed_attention:reference"]
        model(input_ids=ids, use_cache=False, **flash_kwargs)
        assert ops.CALLS["packed_attention:reference"] - before == 2 * len(LENGTHS)
        forms = {s.layer: (s.decision, s.form) for s in attention.report().sites}
        # Both, as DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives them: they must agree, and the
        # row then gives its documents' logits.
        both = model(input_ids=ids, position_ids=positions, use_cache=False, **flash_kwargs).logits
    torch.testing.assert_close(both, alone, **F64)
    # The dense layer (dense_last) attends per document too: SDPA alone would attend across them.
    assert forms == {0: ("moba", "packed"), 1: ("moba", "packed"), 2: ("dense", "packed")}
    sites = {s.layer: s for s in attention.report().sites}
    assert sites[0].form == "packed" and "MoBA per document" in sites[0].reason


@pytest.mark.parametrize(
    "case,match",
    [
        ("disagree", "disagree with the attention mask's documents"),
        ("short", "must end at the packed sequence length 64"),
        ("q_only", "only one of them is given"),
    ],
)
def test_attention_function_refuses_bad_cu_seq_lens_visibly(case: str, match: str) -> None:
    model = _model()
    ids, positions = _packed_inputs()
    attention = moba_compile.hf.register(POLICY, name=f"moba_packed_bad_{case}")
    model.set_attn_implementation(f"moba_packed_bad_{case}")
    cu = _cu()
    kwargs = {"position_ids": positions, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    if case == "disagree":
        kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = torch.tensor([0, 10, 64], dtype=torch.int32)
    elif case == "short":
        kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = torch.tensor([0, 10, 60], dtype=torch.int32)
    else:
        del kwargs["cu_seq_lens_k"]
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, **kwargs).logits
    sites = {s.layer: s for s in attention.report().sites}
    assert all(sites[layer].decision == "dense" and match in sites[layer].reason for layer in (0, 1)), sites
    # Dense attention with transformers' own (position-id) mask: the documents of the position ids, one by one.
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        want = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(out, want, **F64)
