"""A policy together with a torch.compile mode, and options validated where the user can catch the error.

``torch.compile(model, backend="moba", options={...}, mode=...)`` is refused by torch ("Either mode or options can be
specified"), so the mode is a backend option (``options={"policy": ..., "mode": ...}``) or an argument of
``moba_compile.make_backend``; ``torch.compile(..., backend=make_backend(...), mode=...)`` works as well, since then no
``options=`` reaches torch.compile.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from models import TinyLM

import moba_compile
from moba_compile import ops, reference
from moba_compile.backend import collect_reports

torch._dynamo.config.fail_on_recompile_limit_hit = True

C, K = 8, 2
POLICY = {"chunk_size": C, "topk": K, "dense_last": 1}
MODE = "max-autotune-no-cudagraphs"


@pytest.fixture
def inductor_patches(monkeypatch):
    """Record the config patches each Inductor compile gets (and compile nothing: the graph runs as rewritten)."""
    import torch._inductor.compile_fx as compile_fx

    seen: list[dict | None] = []

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(compile_fx, "compile_fx", fake_compile_fx)
    return seen


def _run(compiled, ids):
    before = ops.CALLS["attention:reference"]
    with collect_reports() as reports:
        compiled(ids)
    return ops.CALLS["attention:reference"] - before, reports


@pytest.mark.parametrize(
    "how",
    ["options-mode", "make_backend-mode", "make_backend-keywords-and-torch.compile-mode"],
)
def test_policy_and_mode_together_reach_inductor(how, inductor_patches):
    torch._dynamo.reset()
    model, ids = TinyLM(), torch.randint(0, 50, (1, 40))
    if how == "options-mode":
        compiled = torch.compile(model, backend="moba", options={"policy": POLICY, "mode": MODE})
    elif how == "make_backend-mode":
        compiled = torch.compile(model, backend=moba_compile.make_backend({"policy": POLICY}, mode=MODE))
    else:
        compiled = torch.compile(model, backend=moba_compile.make_backend(policy=POLICY), mode=MODE)
    ran, reports = _run(compiled, ids)
    assert inductor_patches == [torch._inductor.list_mode_options(MODE)]
    assert ran == 2  # the policy applied: layers 0 and 1 MoBA, layer 2 dense
    assert [s.decision for s in reports[0].sites] == ["moba", "moba", "dense"]


def reference_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, *, chunk_size, topk):
    return reference.moba_attention(q, k, v, chunk_size=chunk_size, topk=topk, attn_mask=attn_mask)


@pytest.mark.slow  # a real Inductor compile of forward and backward: ~25 s on 2 CPU cores
def test_mode_option_trains_like_default_mode_through_real_inductor():
    """A real Inductor compile under the mode (CPU: no CUDA graphs, nothing to autotune beyond templates), two SGD
    steps, against the eager model on the reference: the same losses and weights."""
    torch.manual_seed(0)
    model = TinyLM(dim=16, heads=2, kv_heads=1, n_layers=2)
    oracle = copy.deepcopy(model)
    oracle.layers[0].attn.sdpa = functools.partial(reference_sdpa, chunk_size=C, topk=K)
    ids = torch.randint(0, 50, (1, 32))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moba", options={"policy": POLICY, "mode": MODE})
    losses = {}
    for name, fn, params in (("compiled", compiled, model.parameters()), ("oracle", oracle, oracle.parameters())):
        opt = torch.optim.SGD(params, lr=0.1)
        losses[name] = []
        for _ in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(fn(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["compiled"], losses["oracle"], atol=1e-5, rtol=1e-5)
    for p, q in zip(model.parameters(), oracle.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)  # two SGD steps of float32 rounding


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: moba_compile.make_backend(policy=POLICY, mode="fastest"), "mode.*'fastest' is not valid"),
        (lambda: moba_compile.make_backend(policy=POLICY, compiler="aot_eager", mode=MODE), "needs compiler"),
        (lambda: moba_compile.make_backend({"policy": POLICY}, policy=POLICY), "both in options and as keywords"),
        (lambda: moba_compile.make_backend({"mode": MODE}, mode="max-autotune"), "contradicts"),
        (lambda: moba_compile.make_backend(policy={"topk": 0}), "topk"),
    ],
    ids=["unknown-mode", "mode-without-inductor", "option-twice", "two-modes", "bad-policy"],
)
def test_make_backend_validates_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_options_through_backend_string_are_raised_at_first_call_wrapped_by_dynamo():
    """The documented limitation: torch hands options to the backend only when it compiles, and Dynamo wraps what the
    backend raises; the message is kept, and the PolicyError is the cause."""
    torch._dynamo.reset()
    compiled = torch.compile(TinyLM(), backend="moba", options={"policy": {"topk": 0}})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="topk") as caught:
        compiled(torch.randint(0, 50, (1, 8)))
    assert isinstance(caught.value.__cause__ or caught.value.inner_exception, moba_compile.PolicyError)
