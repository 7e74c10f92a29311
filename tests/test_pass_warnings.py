"""Policy mistakes are warned about (``MobaCompileWarning`` and a WARNING on the ``moba_compile`` logger), not only
listed in the INFO report; a model without any SDPA call is never compiled in silence; ``explain`` refuses keywords the
model cannot take. Where MoBA still runs, the result is checked against ``moba_compile.reference``."""

from __future__ import annotations

import copy
import functools
import logging
import warnings

import pytest
import torch
from models import TinyLM
from torch import nn

import moba_compile
from moba_compile import ops, reference

torch._dynamo.config.fail_on_recompile_limit_hit = True

C, K = 8, 2


def _compile_run(model: nn.Module, policy: dict, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    torch._dynamo.reset()
    before = ops.CALLS["attention:reference"]
    out = torch.compile(model, backend="moba", options={"policy": policy, "compiler": "eager"})(ids)
    return out, ops.CALLS["attention:reference"] - before


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(0))


def reference_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, *, chunk_size, topk):
    return reference.moba_attention(q, k, v, chunk_size=chunk_size, topk=topk, attn_mask=attn_mask)


def test_rule_matching_nothing_warns_and_logs(caplog):
    torch.manual_seed(0)
    model = TinyLM()
    policy = {"chunk_size": C, "topk": K, "dense_last": 0, "rules": [{"module": "model.layers.1.attn", "topk": 3}]}
    with (
        caplog.at_level(logging.WARNING, logger="moba_compile"),
        pytest.warns(moba_compile.MobaCompileWarning, match=r"rule 0 \(module='model.layers.1.attn'\) matches no"),
    ):
        out, ran = _compile_run(model, policy, _ids())
    assert any("matches no attention site" in r.getMessage() for r in caplog.records)
    assert ran == 3  # the rule changed nothing: every layer ran MoBA with the default top-k
    oracle = copy.deepcopy(model)
    for attn in oracle.attention_modules():
        attn.sdpa = functools.partial(reference_sdpa, chunk_size=C, topk=K)
    torch.testing.assert_close(out, oracle(_ids()), atol=2e-5, rtol=0)


def test_policy_converting_nothing_warns():
    policy = {"chunk_size": C, "topk": K, "dense_last": 0, "rules": [{"module": "re:.*", "mode": "dense"}]}
    with pytest.warns(moba_compile.MobaCompileWarning, match="converts none of the 3 attention sites"):
        out, ran = _compile_run(TinyLM(), policy, _ids())
    assert ran == 0


def test_dense_last_larger_than_the_layer_count_warns():
    with pytest.warns(moba_compile.MobaCompileWarning, match="dense_last = 5 is larger than the 3 attention layers"):
        _, ran = _compile_run(TinyLM(), {"chunk_size": C, "topk": K, "dense_last": 5}, _ids())
    assert ran == 0


def test_num_layers_smaller_than_the_real_count_warns():
    policy = {"chunk_size": C, "topk": K, "dense_last": 1, "num_layers": 2}
    with pytest.warns(moba_compile.MobaCompileWarning, match="num_layers = 2 is smaller than the 3 attention layers"):
        _, ran = _compile_run(TinyLM(), policy, _ids())
    assert ran == 2  # layers 0 and 2 (index 1 is "last" of 2): the warning is about this wrong count


class NoAttention(nn.Module):
    """An attention written by hand (matmul and softmax): not SDPA, so nothing to convert."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = (x @ x.transpose(-1, -2)).softmax(-1)
        return scores @ x


def test_model_without_sdpa_warns_no_attention_found():
    x = torch.randn(1, 2, 16, 8)
    torch._dynamo.reset()
    with pytest.warns(moba_compile.MobaCompileWarning, match="no attention found"):
        out = torch.compile(NoAttention(), backend="moba", options={"compiler": "eager"})(x)
    torch.testing.assert_close(out, NoAttention()(x))


def test_fitting_policy_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", moba_compile.MobaCompileWarning)
        _, ran = _compile_run(TinyLM(), {"chunk_size": C, "topk": K, "dense_last": 1}, _ids())
    assert ran == 2


def test_explain_refuses_a_keyword_the_model_does_not_take():
    with pytest.raises(TypeError, match=r"'polcy' \(did you mean 'policy'\?\).*own keywords are policy, impl"):
        moba_compile.explain(TinyLM(), _ids(), polcy={"chunk_size": C})


def test_explain_passes_keywords_the_model_takes():
    model = TinyLM(form="mask").eval()
    pad = torch.ones(1, 40, dtype=torch.bool)
    report = moba_compile.explain(model, _ids(), pad=pad, policy={"chunk_size": C, "topk": K, "dense_last": 0})
    assert [s.decision for s in report.sites] == ["moba"] * 3


class AnyKeywords(nn.Module):
    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True) * kwargs.get("gain", 1.0)


def test_explain_cannot_tell_for_a_kwargs_forward_and_passes_the_keyword_on():
    x = torch.randn(1, 2, 16, 8)
    report = moba_compile.explain(AnyKeywords(), x, gain=2.0, policy={"chunk_size": 4, "topk": 1, "dense_last": 0})
    assert [s.decision for s in report.sites] == ["moba"]
