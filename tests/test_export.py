"""``moba_compile.export``: the pass on ``torch.export`` programs.

Hand-written models (tests/models.py: ``is_causal``, a boolean mask, the repeat_kv idiom, ``enable_gqa``) and a tiny
Hugging Face Llama are exported, rewritten and run; each result is compared with the same model whose attention calls
MoBA directly (``moba_compile.moba_attention(..., impl="reference")``, or ``attn_implementation`` registered by
``moba_compile.hf.register``), the report with ``moba_compile.explain`` for the same model and policy, and bad input
with what the backend does with it. The AOTInductor package is built on the CPU by the example's test
(tests/test_export_example.py) and on CUDA by tests/gpu/test_cuda_export.py.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import TINY_LLAMA, TOKEN_IDS, TinyLM

import moba_compile
import moba_compile.export
from moba_compile import MobaCompileWarning, PolicyError, ops

C, K = 8, 2  # 40 keys in 5 chunks, top-2: sparse enough that dense attention gives another answer
POLICY = {"chunk_size": C, "topk": K, "dense_last": 1}
ATOL = 1e-5  # the rewritten program and the oracle run the same reference; the rest of the model may fuse differently


def _ids(seed: int = 0, length: int = 40, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


def _tiny(form: str, kv_heads: int = 2, n_layers: int = 3) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(heads=4, kv_heads=kv_heads, n_layers=n_layers, form=form).eval()


def _moba_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA's signature, MoBA's computation: the oracle's attention (the reference, chunk C, top-K)."""
    return moba_compile.moba_attention(
        query, key, value, chunk_size=C, topk=K, scale=scale, attn_mask=attn_mask, impl="reference"
    )


def _oracle(model: TinyLM, dense_last: int) -> TinyLM:
    """The same model calling MoBA directly in every layer but the last ``dense_last`` (which keep SDPA)."""
    oracle = copy.deepcopy(model)
    modules = oracle.attention_modules()
    for attn in modules[: len(modules) - dense_last]:
        attn.sdpa = _moba_sdpa
    return oracle


def _rows(report: moba_compile.Report) -> list[tuple]:
    return [(s.module, s.layer, s.decision, s.chunk_size, s.topk, s.form, s.impl, s.reason) for s in report.sites]


def _sdpa_calls(program: torch.export.ExportedProgram) -> int:
    return sum(1 for n in program.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)


def _moba_calls(program: torch.export.ExportedProgram) -> int:
    return sum(1 for n in program.graph.nodes if n.target is torch.ops.moba.attention.default)


@pytest.mark.parametrize(
    ("form", "kv_heads"),
    [("is_causal", 4), ("is_causal", 2), ("mask", 4), ("mask", 2), ("repeat", 2)],
    ids=["is_causal", "is_causal-enable_gqa", "mask", "mask-enable_gqa", "mask-repeat_kv"],
)
def test_exported_model_runs_moba_like_the_oracle(form: str, kv_heads: int) -> None:
    model = _tiny(form, kv_heads)
    ids = _ids()
    program = torch.export.export(model, (ids,))
    rewritten, report = moba_compile.export.apply(program, POLICY)
    assert isinstance(rewritten, torch.export.ExportedProgram)
    assert [(s.module, s.layer, s.decision) for s in report.sites] == [
        ("layers.0.attn", 0, "moba"),
        ("layers.1.attn", 1, "moba"),
        ("layers.2.attn", 2, "dense"),
    ]
    assert {s.form for s in report.sites} == {"is_causal" if form == "is_causal" else "mask"}
    assert ("repeat_kv seen through" in report.sites[0].reason) == (form == "repeat")
    assert (_sdpa_calls(rewritten), _moba_calls(rewritten)) == (1, 2)
    assert (_sdpa_calls(program), _moba_calls(program)) == (3, 0), "the input program is left as it was"
    before = ops.CALLS["attention:reference"]
    with torch.no_grad():
        got = rewritten.module()(ids)
        assert ops.CALLS["attention:reference"] - before == 2
        expected = _oracle(model, dense_last=1)(ids)
        dense = model(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(got, dense, atol=1e-3), "MoBA must differ from dense attention at this size"


@pytest.mark.parametrize("form", ["is_causal", "mask", "repeat"])
def test_report_agrees_with_explain(form: str) -> None:
    model = _tiny(form)
    ids = _ids()
    _, report = moba_compile.export.apply(torch.export.export(model, (ids,)), POLICY)
    assert _rows(report) == _rows(moba_compile.explain(model, ids, policy=POLICY))
    assert {s.graph for s in report.sites} == {0}
    assert str(report).splitlines()[0] == "moba-compile report: 2 of 3 attention sites on MoBA"


def test_padding_mask_and_dynamic_length() -> None:
    """A padding mask (MoBA intersects it with its selection) and a sequence length declared dynamic: one rewritten
    program serves other lengths, the ``moba::`` ops' fake kernels keeping the length symbolic."""
    model = _tiny("mask")
    seq = torch.export.Dim("seq", min=2, max=512)
    ids = _ids(1)
    pad = torch.ones_like(ids, dtype=torch.bool)
    pad[1, :5] = False
    program = torch.export.export(model, (ids, pad), dynamic_shapes=({1: seq}, {1: seq}))
    rewritten, report = moba_compile.export.apply(program, POLICY)
    assert [s.decision for s in report.sites] == ["moba", "moba", "dense"]
    # min_seq_len is applied at run time: the key length is not known when deciding.
    assert all(not s.effectively_dense for s in report.sites)
    [symbol] = rewritten.range_constraints
    assert (rewritten.range_constraints[symbol].lower, rewritten.range_constraints[symbol].upper) == (2, 512)
    attention = [n for n in rewritten.graph.nodes if n.target is torch.ops.moba.attention.default]
    assert all(isinstance(n.meta["val"][0].shape[2], torch.SymInt) for n in attention)
    oracle = _oracle(model, dense_last=1)
    for length in (24, 57):
        ids = _ids(2, length)
        pad = torch.ones_like(ids, dtype=torch.bool)
        pad[0, :3] = False
        with torch.no_grad():
            got, expected = rewritten.module()(ids, pad), oracle(ids, pad)
        real = pad  # a padded query row attends to nothing: not compared
        torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


def test_saved_and_loaded_and_decomposed_program_keeps_moba(tmp_path) -> None:
    model = _tiny("is_causal")
    ids = _ids(3)
    rewritten, _ = moba_compile.export.apply(torch.export.export(model, (ids,)), POLICY)
    torch.export.save(rewritten, tmp_path / "moba.pt2")
    loaded = torch.export.load(tmp_path / "moba.pt2")
    decomposed = rewritten.run_decompositions()
    with torch.no_grad():
        expected = rewritten.module()(ids)
        for program, atol in ((loaded, 0.0), (decomposed, 1e-6)):  # decomposed: linear as addmm, summed otherwise
            assert _moba_calls(program) == 2
            torch.testing.assert_close(program.module()(ids), expected, atol=atol, rtol=0)


def test_graph_module_is_rewritten_in_place() -> None:
    """``ep.module()`` (what the issue tried with ``passes.rewrite_sdpa``) is an exported graph too."""
    model = _tiny("is_causal")
    ids = _ids(4)
    gm = torch.export.export(model, (ids,)).module()
    same, report = moba_compile.export.apply(gm, POLICY)
    assert same is gm
    assert [s.module for s in report.sites] == ["layers.0.attn", "layers.1.attn", "layers.2.attn"]
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), _oracle(model, dense_last=1)(ids), atol=ATOL, rtol=0)


def test_sdpa_result_returned_by_the_program() -> None:
    """An SDPA call whose result is the program's output: the signature names the MoBA call's output instead."""

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    rewritten, report = moba_compile.export.apply(
        torch.export.export(Attention(), (q, k, v)), {**POLICY, "dense_last": 0}
    )
    assert [(s.module, s.layer, s.decision) for s in report.sites] == [("", 0, "moba")]
    assert "layer from the order of SDPA calls" in report.sites[0].reason
    expected = moba_compile.moba_attention(q, k, v, chunk_size=C, topk=K, impl="reference")
    torch.testing.assert_close(rewritten.module()(q, k, v), expected, atol=0, rtol=0)


def test_regions_torch_export_makes_of_context_managers() -> None:
    """``torch.no_grad()`` and ``torch.autocast`` blocks around SDPA become higher-order regions in an exported program:
    the call inside is rewritten (cast to the autocast dtype, as SDPA would be), and reported as explain reports it."""

    class Regions(torch.nn.Module):
        def forward(self, q, k, v):
            with torch.no_grad():
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                b = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return a + b.float()

    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    policy = {**POLICY, "dense_last": 0}
    model = Regions()
    rewritten, report = moba_compile.export.apply(torch.export.export(model, (q, k, v)), policy)
    assert _rows(report) == _rows(moba_compile.explain(model, q, k, v, policy=policy))
    assert [s.decision for s in report.sites] == ["moba", "moba"]
    assert "inputs cast to bfloat16" in report.sites[1].reason
    low = [t.bfloat16() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the op runs inside the region, as SDPA did
        b = moba_compile.moba_attention(*low, chunk_size=C, topk=K, impl="reference")
    expected = moba_compile.moba_attention(q, k, v, chunk_size=C, topk=K, impl="reference") + b.float()
    torch.testing.assert_close(rewritten.module()(q, k, v), expected, atol=0, rtol=0)


# Bad input: what the backend (explain) does with the same model and policy.


@pytest.mark.parametrize(
    "policy",
    [{"chunk_sise": 8}, {"chunk_size": 0}, {"rules": [{"layers": [0], "mode": "fast"}]}],
    ids=["unknown-key", "bad-value", "bad-rule"],
)
def test_bad_policy_raises_what_the_backend_raises(policy: dict) -> None:
    model = _tiny("is_causal", n_layers=1)
    ids = _ids()
    program = torch.export.export(model, (ids,))
    with pytest.raises(PolicyError) as from_export:
        moba_compile.export.apply(program, policy)
    with pytest.raises(PolicyError) as from_explain:
        moba_compile.explain(model, ids, policy=policy)
    assert str(from_export.value) == str(from_explain.value)
    with pytest.raises(PolicyError):
        moba_compile.export.export(model, (ids,), policy=policy)


def _warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, MobaCompileWarning)]


@pytest.mark.parametrize(
    "policy",
    [
        {**POLICY, "rules": [{"module": "layers.7.attn", "mode": "dense"}]},  # a rule matching no site
        {**POLICY, "dense_last": 5},  # more than the layers; converts nothing
        {**POLICY, "num_layers": 2},
    ],
    ids=["rule-matches-nothing", "dense_last-too-large", "num_layers-too-small"],
)
def test_policy_not_fitting_the_model_warns_as_the_backend_does(policy: dict) -> None:
    model = _tiny("is_causal")
    ids = _ids()
    program = torch.export.export(model, (ids,))
    from_export = _warnings(lambda: moba_compile.export.apply(program, policy))
    from_explain = _warnings(lambda: moba_compile.explain(model, ids, policy=policy))
    assert from_export and from_export == from_explain


def test_bad_arguments() -> None:
    model = _tiny("is_causal", n_layers=1)
    ids = _ids()
    program = torch.export.export(model, (ids,))
    with pytest.raises(ValueError, match="impl = 'fast' is not valid; allowed: 'auto', 'triton', 'reference'"):
        moba_compile.export.apply(program, POLICY, impl="fast")
    with pytest.raises(TypeError, match=r"got TinyLM; export it first"):
        moba_compile.export.apply(model, POLICY)
    with pytest.raises(TypeError, match="Dynamo graph"):
        gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
        for node in gm.graph.nodes:
            node.meta["example_value"] = None
        moba_compile.export.apply(gm, POLICY)


def test_program_without_sdpa_warns_and_says_why() -> None:
    """A program decomposed before the pass (``run_decompositions`` writes SDPA as matmul and softmax) has no SDPA."""
    model = _tiny("is_causal", n_layers=1)
    program = torch.export.export(model, (_ids(),)).run_decompositions()
    [message] = _warnings(lambda: moba_compile.export.apply(program, POLICY))
    assert "no attention found in this exported program" in message and "run_decompositions()" in message


# Hugging Face: transformers hands an exported model the boolean-mask form (it builds the mask when tracing).

transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")
HF_POLICY = {"chunk_size": C, "topk": K, "dense_last": 1}


@functools.cache
def _hf_moba_name() -> str:
    moba_compile.hf.register(HF_POLICY, name="moba_export_test", impl="reference")
    return "moba_export_test"


def _llama(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_LLAMA, **TOKEN_IDS)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def _hf_inputs(padded: bool) -> dict:
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(7))
    kwargs = {"use_cache": False}
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :6] = 0
        ids[1, :6] = TOKEN_IDS["pad_token_id"]
        kwargs["attention_mask"] = mask
    return {"input_ids": ids, **kwargs}


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask-given", "padding-mask"])
def test_tiny_llama_exported_runs_moba_like_the_hf_path(padded: bool) -> None:
    import moba_compile.hf  # noqa: F401 (registers the attention function)

    inputs = _hf_inputs(padded)
    model = _llama()
    program = torch.export.export(model, (), inputs)
    rewritten, report = moba_compile.export.apply(program, HF_POLICY)
    assert [(s.module, s.decision, s.form) for s in report.sites] == [
        ("model.layers.0.self_attn", "moba", "mask"),
        ("model.layers.1.self_attn", "moba", "mask"),
        ("model.layers.2.self_attn", "dense", "mask"),
    ]
    assert all("repeat_kv seen through" in s.reason for s in report.moba_sites)
    with torch.no_grad():
        got = rewritten.module()(**inputs).logits
        expected = _llama(_hf_moba_name())(**inputs).logits
        dense = model(**inputs).logits
    real = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    assert not torch.allclose(got[real], dense[real], atol=1e-3)


def test_tiny_llama_report_agrees_with_explain() -> None:
    """With a padding mask both paths see the mask form on every torch release (without one, Dynamo may get
    ``is_causal`` where torch.export always gets the mask transformers builds when tracing)."""
    inputs = _hf_inputs(padded=True)
    model = _llama()
    _, report = moba_compile.export.apply(torch.export.export(model, (), inputs), HF_POLICY)
    assert _rows(report) == _rows(moba_compile.explain(model, policy=HF_POLICY, **inputs))


def test_tiny_llama_dynamic_length() -> None:
    model = _llama()
    inputs = _hf_inputs(padded=False)
    # Dim.DYNAMIC: a named Dim trips a stride guard of transformers' attention that torch 2.11 cannot prove.
    rewritten, report = moba_compile.export.export(
        model,
        (),
        inputs,
        dynamic_shapes={"input_ids": {1: torch.export.Dim.DYNAMIC}, "use_cache": None},
        policy=HF_POLICY,
    )
    assert [s.decision for s in report.sites] == ["moba", "moba", "dense"]
    hf = _llama(_hf_moba_name())
    for length in (33, 70):
        ids = torch.randint(3, 64, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            got = rewritten.module()(input_ids=ids, use_cache=False).logits
            expected = hf(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
