"""Context parallelism (moba_compile.context_parallel): 2 CPU processes (gloo) against one process, same sequence.

One ``torchrun --nproc-per-node 2`` launch of this very file (its ``__main__`` part, the worker) runs every
distributed scenario and saves, per rank, its output shards, gradients, losses and the error messages of the bad
inputs; the tests below compute the single-process results in the pytest process and compare. One launch keeps the
file well under a minute on 2 cores (each launch costs two interpreter starts with torch and transformers imported).

Scenarios: the op on the reference path (fp32, GQA) and on the interpreted Triton path; the op compiled with
``torch.compile(backend="moba", fullgraph=True)`` (no graph break); the dense layers' op (fp32 and bf16 on the flash
pair, head-tail balanced and not, eager and compiled, and its SDPA fallback) against single-process causal SDPA; a
tiny Llama with ``attn_implementation="moba"`` under :func:`context_parallel` (3 MoBA layers + 1 dense layer by
policy: loss, every parameter's gradient, the report), the same with its decoder layers compiled; bad inputs. Then
``examples/train_context_parallel.py`` on a 2 x 2 ("dp", "cp") mesh of 4 processes with FSDP2 (it compares its losses
and gradient norms with one process itself).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT = 240

# The op-level case: GQA, fp32, S = 64 tokens per rank, chunks of 16, top-3: rank 1's queries select among chunks
# held by both ranks, so the gathered keys and the reduce-scattered gradients both matter.
OP = dict(B=1, HQ=4, HKV=2, L=128, D=16, C=16, K=3)
# The interpreted Triton case: smaller (the interpreter costs ~2 ms per program-iteration).
TRITON = dict(B=1, HQ=2, HKV=1, L=64, D=16, C=16, K=2)
POLICY = {"chunk_size": 16, "topk": 2, "dense_last": 1}
# The dense layers' op: GQA 4/2, S = 64 per rank, head-tail balanced unless "balance" is False; "fallback" has
# Dv != D, which the flash kernels refuse (SDPA path).
DENSE = {
    "dense_fp32": dict(dtype=torch.float32, DV=16, balance=True),
    "dense_bf16": dict(dtype=torch.bfloat16, DV=16, balance=True),
    "dense_unbalanced": dict(dtype=torch.float32, DV=16, balance=False),
    "dense_fallback": dict(dtype=torch.float32, DV=8, balance=True),
}
MODEL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
SEQ = 128


def _op_inputs(case: dict[str, int], seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    b, hq, hkv, length, d = case["B"], case["HQ"], case["HKV"], case["L"], case["D"]
    q = torch.randn(b, hq, length, d, generator=gen)
    k = torch.randn(b, hkv, length, d, generator=gen)
    v = torch.randn(b, hkv, length, d, generator=gen)
    grad = torch.randn(b, hq, length, d, generator=gen)
    return q, k, v, grad


def _dense_inputs(name: str) -> tuple[torch.Tensor, ...]:
    case = DENSE[name]
    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, length, d = OP["B"], OP["HQ"], OP["HKV"], OP["L"], OP["D"]
    shapes = ((b, hq, length, d), (b, hkv, length, d), (b, hkv, length, case["DV"]), (b, hq, length, case["DV"]))
    return tuple(torch.randn(s, generator=gen).to(case["dtype"]) for s in shapes)


def _build_model() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODEL)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def _ids() -> torch.Tensor:
    return torch.randint(0, MODEL["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(1))


def _interpreter_runs_kernels() -> bool:
    """triton 3.6's CPU interpreter (the oldest environment's) cannot run the forward kernel; CI runs this file on the
    newest releases only (.ci/run), where it can."""
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 7)


# ----------------------------------------------------------------------------------------------------------------------
# The worker (run by torchrun)
# ----------------------------------------------------------------------------------------------------------------------
def _error(fn: Any) -> str:
    try:
        fn()
    except Exception as err:  # the message is what the test checks
        return f"{type(err).__name__}: {err}"
    return "no error"


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import moba_compile.hf
    from moba_compile import context_parallel as cp

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("cp",))
    result: dict[str, Any] = {}

    def op_case(
        case: dict[str, int], impl: str, compiled: bool = False, routing: str = "head"
    ) -> dict[str, torch.Tensor]:
        q, k, v, grad = (cp.shard_sequence(t, mesh, dim=2) for t in _op_inputs(case, seed=0))
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))

        def fn(q, k, v):
            return cp.context_parallel_moba_attention(
                q, k, v, mesh_or_group=mesh, chunk_size=case["C"], topk=case["K"], impl=impl, routing=routing
            )

        if compiled:
            fn = torch.compile(fn, backend="moba", fullgraph=True, options={"compiler": "aot_eager"})
        o = fn(q, k, v)
        o.backward(grad)
        return {"out": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}

    before = dict(moba_compile.ops.CALLS)
    result["op_reference"] = op_case(OP, "reference")
    result["op_compiled"] = op_case(OP, "reference", compiled=True)
    result["op_group"] = op_case(OP, "reference", routing="group")  # spec 6: group routing across shards
    if _interpreter_runs_kernels():
        result["op_triton"] = op_case(TRITON, "triton")
    result["calls"] = {k: v - before.get(k, 0) for k, v in moba_compile.ops.CALLS.items()}

    def dense_case(name: str, compiled: bool = False) -> dict[str, Any]:
        q, k, v, grad = (cp.shard_sequence(t, mesh, dim=2) for t in _dense_inputs(name))
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))

        def fn(q, k, v):
            return cp.context_parallel_dense_attention(q, k, v, mesh_or_group=mesh, balance=DENSE[name]["balance"])

        if compiled:
            fn = torch.compile(fn, backend="moba", fullgraph=True, options={"compiler": "aot_eager"})
        calls = dict(moba_compile.ops.CALLS)
        o = fn(q, k, v)
        o.backward(grad)
        used = {k: n - calls.get(k, 0) for k, n in moba_compile.ops.CALLS.items() if n != calls.get(k, 0)}
        return {"out": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "calls": used}

    for name in DENSE:
        result[name] = dense_case(name)
    result["dense_compiled"] = dense_case("dense_fp32", compiled=True)

    # A tiny Llama, attn_implementation="moba", under context_parallel: eager, compiled, FSDP2 on a 1 x 2 mesh.
    attention = moba_compile.hf.register(POLICY, name="moba")

    def model_case(model: torch.nn.Module, run: Any, grad_reduce: Any) -> dict[str, Any]:
        ids = _ids()
        labels, positions = cp.shift_labels(ids), cp.global_positions(ids)
        calls = dict(moba_compile.ops.CALLS)
        with cp.context_parallel(mesh, buffers=[ids, positions, labels], buffer_seq_dims=[1, 1, 1]):
            logits = run(input_ids=ids, position_ids=positions, use_cache=False).logits
            loss = cp.context_parallel_loss(logits, labels, mesh)
            grad_reduce(loss)
        used = {k: n - calls.get(k, 0) for k, n in moba_compile.ops.CALLS.items() if n != calls.get(k, 0)}
        grads = {
            n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in model.named_parameters()
        }
        return {"loss": loss.detach(), "grads": grads, "ids_restored": ids.shape[1], "calls": used}

    def plain_backward(model: torch.nn.Module) -> Any:
        def reduce(loss: torch.Tensor) -> None:
            loss.backward()
            cp.reduce_gradients(model, mesh)

        return reduce

    model = _build_model()
    model.set_attn_implementation("moba")
    result["model_eager"] = model_case(model, model, plain_backward(model))
    result["report"] = [(s.layer, s.decision, s.reason) for s in attention.report().sites]

    model = _build_model()
    model.set_attn_implementation("moba")
    # The decoder layers compiled (the model's forward, which builds masks and positions, stays eager).
    for layer in model.model.layers:
        layer.compile(backend="moba", options={"compiler": "aot_eager"})
    result["model_compiled"] = model_case(model, model, plain_backward(model))

    dist.barrier()

    # Bad input: each error message, for the test to read.
    q, k, v, _ = (cp.shard_sequence(t, mesh, dim=2) for t in _op_inputs(OP, seed=0))
    errors = {
        "indivisible_world": _error(lambda: cp.shard_sequence(torch.zeros(1, 127), mesh, dim=1)),
        "indivisible_chunk": _error(
            lambda: cp.context_parallel_moba_attention(q, k, v, mesh_or_group=mesh, chunk_size=24, topk=2)
        ),
        "mesh_without_cp": _error(
            lambda: cp.context_parallel_moba_attention(
                q, k, v, mesh_or_group=init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",)), chunk_size=16, topk=2
            )
        ),
        "kv_cache": _error(
            lambda: cp.context_parallel_moba_attention(q[:, :, -1:], k, v, mesh_or_group=mesh, chunk_size=16, topk=2)
        ),
        "mask": _error(
            lambda: cp.context_parallel_moba_attention(
                q, k, v, mesh_or_group=mesh, chunk_size=16, topk=2, attn_mask=torch.ones(64, 64, dtype=torch.bool)
            )
        ),
    }
    model = _build_model()
    model.set_attn_implementation("moba")
    ids = _ids()
    positions = cp.global_positions(ids)
    padding = torch.ones_like(ids)
    padding[:, :5] = 0

    def padded() -> None:
        with cp.context_parallel(mesh, buffers=[ids, positions, padding], buffer_seq_dims=[1, 1, 1]):
            model(input_ids=ids, position_ids=positions, attention_mask=padding, use_cache=False)

    errors["padding"] = _error(padded)

    def local_positions() -> None:
        with cp.context_parallel(mesh, buffers=[ids], buffer_seq_dims=[1]):
            model(input_ids=ids, use_cache=False)

    errors["local_positions"] = _error(local_positions)

    def model_cache() -> None:
        with cp.context_parallel(mesh, buffers=[ids, positions], buffer_seq_dims=[1, 1]):
            past = model(input_ids=ids, position_ids=positions, use_cache=True).past_key_values
            model(input_ids=ids[:, -1:], position_ids=positions[:, -1:] + 1, past_key_values=past, use_cache=True)

    errors["model_kv_cache"] = _error(model_cache)

    def dense_model() -> None:
        model.set_attn_implementation("sdpa")
        with cp.context_parallel(mesh, buffers=[ids, positions], buffer_seq_dims=[1, 1]):
            model(input_ids=ids, position_ids=positions, use_cache=False)

    errors["sdpa_model"] = _error(dense_model)
    result["errors"] = errors
    from transformers import AttentionInterface

    result["sdpa_restored"] = AttentionInterface._global_mapping["sdpa"].__name__ == "sdpa_attention_forward"
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------------
# The tests (pytest process)
# ----------------------------------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on a POSIX system")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("cp")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), __file__, str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _shards(t: torch.Tensor, dim: int) -> list[torch.Tensor]:
    return list(t.chunk(WORLD, dim=dim))


def _single_op(case: dict[str, int], impl: str, routing: str = "head") -> dict[str, torch.Tensor]:
    from moba_compile import moba_attention

    q, k, v, grad = _op_inputs(case, seed=0)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    o = moba_attention(q, k, v, chunk_size=case["C"], topk=case["K"], impl=impl, routing=routing)
    o.backward(grad)
    return {"out": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


@pytest.mark.parametrize("scenario", ["op_reference", "op_compiled", "op_group"])
def test_op_matches_single_process(ranks: list[dict[str, Any]], scenario: str) -> None:
    single = _single_op(OP, "reference", routing="group" if scenario == "op_group" else "head")
    for name, full in single.items():
        for r, expected in enumerate(_shards(full, 2)):
            # Same rows, same formulas; only the reduce-scatter's sum of dK/dV over ranks orders additions differently.
            torch.testing.assert_close(ranks[r][scenario][name], expected, rtol=1e-5, atol=1e-6, msg=f"{name} rank {r}")
    # The MoBA path really ran (top-3 of up to 7 earlier chunks differs from dense attention).
    dense = torch.nn.functional.scaled_dot_product_attention(*_op_inputs(OP, 0)[:3], is_causal=True, enable_gqa=True)
    assert (dense[:, :, 64:] - ranks[1][scenario]["out"]).abs().max() > 1e-2


def test_op_triton_interpreted_matches_single_process(ranks: list[dict[str, Any]]) -> None:
    if not _interpreter_runs_kernels():
        pytest.skip("triton < 3.7: its CPU interpreter cannot run the kernels (the oldest environment)")
    single = _single_op(TRITON, "reference")
    for name, full in single.items():
        for r, expected in enumerate(_shards(full, 2)):
            # Interpreted Triton (fp32 tl.dot on numpy) versus the reference: fp32 rounding of another summation order.
            torch.testing.assert_close(ranks[r]["op_triton"][name], expected, rtol=1e-4, atol=1e-5, msg=f"{name} {r}")
    assert ranks[0]["calls"].get("attention:triton", 0) >= 1
    assert ranks[0]["calls"].get("attention_backward:triton", 0) >= 1


def _single_dense(name: str) -> dict[str, torch.Tensor]:
    q, k, v, grad = _dense_inputs(name)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    o.backward(grad)
    return {"out": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


@pytest.mark.parametrize(
    ("scenario", "case", "expected_calls"),
    [
        # Balanced: the two half-shards each rank computes are one flash pair each, forward and backward.
        ("dense_fp32", "dense_fp32", {"cp_dense:balanced": 1, "cp_dense:flash": 2, "cp_dense_backward:flash": 2}),
        ("dense_bf16", "dense_bf16", {"cp_dense:balanced": 1, "cp_dense:flash": 2, "cp_dense_backward:flash": 2}),
        ("dense_compiled", "dense_fp32", {"cp_dense:flash": 2, "cp_dense_backward:flash": 2}),
        # Rank 0 too: its one causal part is one flash call.
        ("dense_unbalanced", "dense_unbalanced", {"cp_dense:flash": 1, "cp_dense_backward:flash": 1}),
        ("dense_fallback", "dense_fallback", {"cp_dense:sdpa": 1}),
    ],
)
def test_dense_layer_matches_single_process(
    ranks: list[dict[str, Any]], scenario: str, case: str, expected_calls: dict[str, int]
) -> None:
    single = _single_dense(case)
    # fp32: same softmax, other summation orders (the two-part merge, dK/dV summed over ranks). bf16: both sides
    # round their outputs and gradients to bf16 (here: the parts' dq and the merged output too), a few bf16 ulps.
    tol = dict(rtol=1e-5, atol=2e-6) if DENSE[case]["dtype"] == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, full in single.items():
        for r, expected in enumerate(_shards(full, 2)):
            got = ranks[r][scenario][name]
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got, expected, **tol, msg=f"{scenario} {name} rank {r}")
    for r in range(WORLD):
        # Compiled, only the ops count (at run time); the Python-side "balanced" count is for eager calls.
        assert ranks[r][scenario]["calls"] == expected_calls, f"rank {r}: {ranks[r][scenario]['calls']}"


@pytest.mark.parametrize("prefix", [0, 8, 40])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flash_pair_equals_lower_right_causal_attention(prefix: int, dtype: torch.dtype) -> None:
    # One process: the merged flash pair (earlier keys unmasked + own keys causal) against SDPA with the lower-right
    # causal mask, outputs and gradients, GQA 4/2 and a batch of 2; fp64 shows the merge and backward rule are exact.
    from torch.nn.attention.bias import causal_lower_right

    from moba_compile.flash_merge import causal_flash_attention

    gen = torch.Generator().manual_seed(4)
    shapes = ((2, 4, 8, 16), (2, 2, prefix + 8, 16), (2, 2, prefix + 8, 16), (2, 4, 8, 16))
    q, k, v, grad = (torch.randn(s, generator=gen, dtype=dtype) for s in shapes)
    results = []
    for fn in (
        lambda q, k, v: causal_flash_attention(q, k, v, scale=0.3),
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(8, prefix + 8), scale=0.3, enable_gqa=True
        ),
    ):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad)
        results.append([out, *(t.grad for t in leaves)])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for name, got, expected in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(got, expected, **tol, msg=name)


def test_flash_pair_ops_pass_opcheck() -> None:
    # Fake kernels (shapes, strides), autograd registration and schema of moba::cp_dense_flash and its backward.
    import moba_compile.flash_merge  # noqa: F401  (registers the ops)

    gen = torch.Generator().manual_seed(5)
    for prefix in (0, 8):
        q = torch.randn(1, 4, 8, 16, generator=gen, requires_grad=True)
        k, v = (torch.randn(1, 2, prefix + 8, 16, generator=gen, requires_grad=True) for _ in "kv")
        torch.library.opcheck(torch.ops.moba.cp_dense_flash.default, (q, k, v, 0.25))
        out, lse = torch.ops.moba.cp_dense_flash(q, k, v, 0.25)
        args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, 0.25)
        torch.library.opcheck(torch.ops.moba.cp_dense_flash_backward.default, args)


def test_flash_pair_refuses_what_flash_cannot_take() -> None:
    from moba_compile.flash_merge import causal_flash_attention, flash_unsupported_reason

    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    assert flash_unsupported_reason(q, k, k[..., :8]) == "value head dim 8 differs from the query's 16"
    assert flash_unsupported_reason(q, k[:, :, :4], k[:, :, :4]) == "fewer keys (4) than queries (8)"
    assert flash_unsupported_reason(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)) is not None
    with pytest.raises(ValueError, match="cannot take these inputs: mixed dtypes"):
        causal_flash_attention(q.double(), k, k)


def test_docstring_examples_run() -> None:
    import doctest

    from moba_compile import context_parallel, flash_merge

    for module in (context_parallel, flash_merge):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_head_tail_plan_routes_every_half_and_balances(world: int) -> None:
    from moba_compile.context_parallel import _head_tail_plan

    plans = [_head_tail_plan(r, world) for r in range(world)]
    # The all-to-all, simulated on half indices: rank r's outgoing halves in its send order, cut by its splits.
    inbox: list[list[int]] = [[] for _ in range(world)]
    for src, (send, send_splits, _, _) in enumerate(plans):
        out = [2 * src + h for h in send]
        for dest, n in enumerate(send_splits):
            inbox[dest] += out[:n]
            out = out[n:]
    work = []
    for r, (_, _, recv, recv_splits) in enumerate(plans):
        computed = (r, 2 * world - 1 - r)
        assert inbox[r] == [computed[j] for j in recv]  # arrives where the plan expects it
        assert recv_splits == [sum(h // 2 == src for h in inbox[r]) for src in range(world)]
        work.append(sum(h + 0.5 for h in computed))  # half i: i full half-blocks of earlier keys + its causal half
    assert sorted(h for box in inbox for h in box) == list(range(2 * world))  # every half computed exactly once
    assert len(set(work)) == 1  # every rank attends the same number of scores


def test_dense_layer_bf16_error_is_single_process_bf16_error(ranks: list[dict[str, Any]]) -> None:
    # Against the fp64 truth, the merged flash pair under context parallelism is no less accurate than single-process
    # bf16 SDPA (each up to bf16 rounding): the merge adds no error of its own beyond a rounding.
    q, k, v, grad = (t.double().requires_grad_() for t in _dense_inputs("dense_bf16"))
    truth = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    truth.backward(grad.double())
    exact = {"out": truth.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    single = _single_dense("dense_bf16")
    for name, full in exact.items():
        got = torch.cat([ranks[r]["dense_bf16"][name] for r in range(WORLD)], dim=2).double()
        err_cp, err_single = (got - full).abs().max(), (single[name].double() - full).abs().max()
        assert err_cp <= 2 * err_single + 1e-3, f"{name}: context parallel {err_cp:.2e}, one process {err_single:.2e}"


@pytest.fixture(scope="module")
def single_model() -> dict[str, Any]:
    import moba_compile.hf

    moba_compile.hf.register(POLICY, name="moba_single")
    model = _build_model()
    model.set_attn_implementation("moba_single")
    ids = _ids()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("scenario", ["model_eager", "model_compiled"])
def test_model_loss_and_gradients_match_single_process(
    ranks: list[dict[str, Any]], single_model: dict[str, Any], scenario: str
) -> None:
    for r in range(WORLD):
        got = ranks[r][scenario]
        # fp32; the loss sums per-rank partial sums, gradients are summed over ranks: rounding of another order.
        torch.testing.assert_close(got["loss"], single_model["loss"], rtol=1e-5, atol=1e-6)
        assert got["grads"].keys() == single_model["grads"].keys()
        for name, expected in single_model["grads"].items():
            torch.testing.assert_close(got["grads"][name], expected, rtol=2e-4, atol=2e-6, msg=f"{scenario} {name}")
        assert got["ids_restored"] == SEQ  # the buffers were restored on exit


def test_policy_decides_per_layer_under_context_parallelism(ranks: list[dict[str, Any]]) -> None:
    decisions = sorted((layer, decision) for layer, decision, _ in ranks[1]["report"])
    assert decisions == [(0, "moba"), (1, "moba"), (2, "moba"), (3, "dense")]
    assert all("context parallel" in why for _, decision, why in ranks[1]["report"] if decision == "moba")
    # The dense layer ran balanced on flash pairs (two per rank), forward and backward, never on SDPA.
    for r in range(WORLD):
        calls = ranks[r]["model_eager"]["calls"]
        assert calls.get("cp_dense:flash") == 2 and calls.get("cp_dense_backward:flash") == 2, calls
        assert calls.get("cp_dense:balanced") == 1 and "cp_dense:sdpa" not in calls, calls


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("indivisible_world", "not divisible by the context-parallel world size 2"),
        ("indivisible_chunk", "not a multiple of chunk_size 24"),
        ("mesh_without_cp", "no sequence dimension 'cp'"),
        ("kv_cache", "KV cache"),
        ("mask", "attention mask"),
        ("padding", "padding mask is not supported"),
        ("local_positions", "GLOBAL position ids"),
        ("model_kv_cache", "KV cache"),
        ("sdpa_model", "would attend to this rank's shard only"),
    ],
)
def test_bad_input_is_refused(ranks: list[dict[str, Any]], case: str, words: str) -> None:
    message = ranks[1]["errors"][case]
    assert message.startswith("ContextParallelError") and words in message, message


def test_example_fsdp2_on_a_2x2_mesh_matches_single_process() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "examples/train_context_parallel.py"]
    args = ["--dp", "2", "--batch", "2", "--fsdp", "--steps", "2"]
    proc = subprocess.run(cmd + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "context parallel matches one process" in proc.stdout
    assert proc.stdout.count("grad norm cp") == 2


def test_example_comparison_flags_differences() -> None:
    from examples.train_context_parallel import compare

    assert not compare([(1.0, 2.0)], [(1.0, 2.1)], 1e-4)  # a gradient-norm difference fails the comparison
    assert not compare([(float("nan"), 2.0)], [(1.0, 2.0)], 1e-4)


def test_sdpa_is_restored_after_the_context(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["sdpa_restored"] and ranks[1]["sdpa_restored"]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
