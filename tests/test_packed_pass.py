"""Packed documents through the compile pass and the torch.export pass on a hand-written model (tests/models.py).

A model that takes its boolean attention mask as an input gets the block-diagonal causal mask of packed documents:
``moba::analyse_mask`` finds ``MASK_DOCUMENTS`` at run time and every document runs as MoBA on its own, so the packed
row gives the outputs of its documents run one by one (the model has no positional embedding: a document's output
does not depend on where it sits in the row).
"""

from __future__ import annotations

import pytest
import torch
from models import Block
from torch import nn

import moba_compile
import moba_compile.export
from moba_compile import ops

POLICY = {"chunk_size": 8, "topk": 2, "dense_last": 1}
LENGTHS = [9, 31, 1, 23]
F32 = {"rtol": 1e-5, "atol": 1e-5}


class MaskedLM(nn.Module):
    """Embedding, three blocks called with the given mask, head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.layers = nn.ModuleList([Block(32, 4, 2, "mask") for _ in range(3)])
        self.head = nn.Linear(32, 50)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(x)


def _model() -> MaskedLM:
    torch.manual_seed(0)
    return MaskedLM().eval()


def _documents_mask(lengths: list[int]) -> torch.Tensor:
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(len(doc))
    return ((doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None]))[None, None]


def _per_document(fn, ids: torch.Tensor) -> torch.Tensor:
    bounds = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        outs.append(fn(ids[:, s:e], torch.ones(e - s, e - s, dtype=torch.bool).tril()[None, None]))
    return torch.cat(outs, dim=1)


def _packed_docs() -> int:
    return sum(n for key, n in ops.CALLS.items() if key.startswith("attention:packed:"))


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 50, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(2))


def test_compile_pass_runs_packed_documents(ids: torch.Tensor) -> None:
    model = _model()
    compiled = torch.compile(model, backend="moba", options={"policy": POLICY, "compiler": "eager"})
    before = _packed_docs()
    with torch.no_grad():
        packed = compiled(ids, _documents_mask(LENGTHS))
        assert _packed_docs() - before == 2 * len(LENGTHS)  # layers 0 and 1 are MoBA
        alone = _per_document(compiled, ids)
    torch.testing.assert_close(packed, alone, **F32)
    report = moba_compile.explain(model, ids, _documents_mask(LENGTHS), policy=POLICY)
    assert [(s.layer, s.decision, s.form) for s in report.sites] == [(0, "moba", "packed"), (1, "moba", "packed"),
                                                                      (2, "dense", "mask")]  # fmt: skip


def test_exported_program_runs_packed_documents(ids: torch.Tensor) -> None:
    model = _model()
    program = torch.export.export(model, (ids, _documents_mask(LENGTHS)))
    rewritten, report = moba_compile.export.apply(program, POLICY)
    assert [s.decision for s in report.sites] == ["moba", "moba", "dense"]
    before = _packed_docs()
    with torch.no_grad():
        packed = rewritten.module()(ids, _documents_mask(LENGTHS))
    assert _packed_docs() - before == 2 * len(LENGTHS)
    with torch.no_grad():
        alone = _per_document(
            torch.compile(model, backend="moba", options={"policy": POLICY, "compiler": "eager"}), ids
        )
    torch.testing.assert_close(packed, alone, **F32)
