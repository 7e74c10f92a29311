"""Dense decode on MoBA's split-K decode kernels (``dense_decode_triton``, ``moba::dense_decode``), interpreted.

Runs under the Triton interpreter (``TRITON_INTERPRET=1``) on small CPU shapes, with the launchers' buffers poisoned
(conftest), so a partial cell the combine reads but no program wrote fails the test. With ``MOBA_TEST_DEVICE=cuda``
(and ``TRITON_INTERPRET=0``, on a GPU machine) every call that runs the kernels takes its inputs to the GPU
(``kernel_cases.on_test_device``, or the device directly for the op in a graph and the model through transformers),
so the same suite checks the compiled kernels; inputs, oracles and budgets stay those of the CPU run. (Interpreted, the
internal chunk is 64 keys; compiled, 4096, so the compiled run has one chunk per row: the many-chunk cases are the
interpreted ones and ``tests/gpu/test_cuda_dense_decode.py``.)

Oracle and tolerances:

- ``out``: float64 softmax attention of the query over the first ``length[b]`` keys of its row (AND the mask), on the
  same (already rounded) inputs. Budget: ``2 * ref_err + 4 * eps(dtype) * max|oracle|``, where ``ref_err`` is the
  error of the fp32 reference (``reference.dense_static_decode_forward``) on the same inputs against the oracle (the
  kernel does the same fp32 math in another order) and the floor covers the kernel's rounding of the probabilities to
  the value dtype before ``P @ V`` (as tensor cores take them), which the reference does not do.
- ``lse``: ``2 * ref_lse_err + 8 * eps(fp32) * max(1, max|lse|)``; rows with no attended key: ``out = 0`` and
  ``lse = -inf`` exactly.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (a missing triton must fail the tests, not skip them)
from kernel_cases import TEST_DEVICE, on_test_device  # noqa: E402

from moba_compile import ops, reference  # noqa: E402
from moba_compile.kernels import support as ksupport  # noqa: E402
from moba_compile.kernels.decode import (  # noqa: E402
    DENSE_DECODE_CHUNK,
    _dense_selection,
    dense_decode_chunk,
    dense_decode_triton,
    dense_decode_unsupported_reason,
)

# MOBA_TEST_DEVICE=cuda: the launcher and the op's kernel path run compiled on the GPU; identity on the CPU. The reason
# checks and the selection read metadata or run torch ops, and stay on the CPU (where the interpreted limits apply).
dense_decode_triton = on_test_device(dense_decode_triton)
ops_dense_decode = on_test_device(ops.dense_decode)

D = 64
SCALE = 1 / math.sqrt(D)


def oracle(q, k, v, lengths: list[int], mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 dense attention of each row's query over its first ``lengths[b]`` keys (AND ``mask``)."""
    b, hq = q.shape[0], q.shape[1]
    group = hq // k.shape[1]
    outs, lses = [], []
    for i in range(b):
        n = lengths[i]
        kk = k[i, :, :n].double().repeat_interleave(group, 0)
        vv = v[i, :, :n].double().repeat_interleave(group, 0)
        s = (q[i].double() @ kk.transpose(-1, -2)) * SCALE  # [Hq, 1, n]
        if mask is not None:
            s = s.masked_fill(~mask[i].expand(hq, 1, -1)[..., :n], -math.inf)
        lse = torch.logsumexp(s, -1)
        outs.append(torch.softmax(s, -1).nan_to_num(0.0) @ vv)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def inputs(b: int, hq: int, hkv: int, slots: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, D, generator=gen).to(dtype)
    k = torch.randn(b, hkv, slots, D, generator=gen).to(dtype)
    v = torch.randn(b, hkv, slots, D, generator=gen).to(dtype)
    return q, k, v


def check(out, lse, q, k, v, lengths, mask, dtype) -> None:
    want, want_lse = oracle(q, k, v, lengths, mask)
    length = torch.tensor(lengths)
    ref, ref_lse = reference.dense_static_decode_forward(q, k, v, length, scale=SCALE, attn_mask=mask)
    ref_err = float((ref.double() - want).abs().max())
    budget = 2 * ref_err + 4 * torch.finfo(dtype).eps * float(want.abs().max())
    assert out.dtype == dtype and out.shape == want.shape and out.is_contiguous()
    assert float((out.double() - want).abs().max()) <= budget
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)  # no attended key: -inf in both
    assert torch.all(out.double()[~finite] == 0)
    ref_lse_err = float((ref_lse.double() - want_lse)[finite].abs().max())
    lse_budget = 2 * ref_lse_err + 8 * torch.finfo(torch.float32).eps * max(1.0, float(want_lse[finite].abs().max()))
    assert float((lse.double() - want_lse)[finite].abs().max()) <= lse_budget


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("hq", "hkv"), [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_kernel_equals_dense_attention_over_each_rows_length(dtype, hq, hkv):
    """Per-row lengths on one static buffer of 150 slots (interpreted chunk 64, pieces of 32): 1 key, a length at a
    chunk boundary (64: the own chunk is chunk 0 complete, 65: the own chunk is one key), a piece boundary inside a
    chunk, and the whole buffer; the selection holds -1 in the slots of rows with fewer earlier chunks."""
    lengths = [1, 64, 65, 96, 150]
    q, k, v = inputs(len(lengths), hq, hkv, 150, dtype)
    out, lse = dense_decode_triton(q, k, v, SCALE, length=torch.tensor(lengths))
    check(out, lse, q, k, v, lengths, None, dtype)


@pytest.mark.parametrize("chunk", [16, 48, 144])
def test_any_internal_chunk_gives_the_same_attention(chunk):
    """The internal chunk is only the unit of the work grid: 16 (9 chunks), 48 (a length on no boundary), 144
    (one chunk plus a partial one)."""
    lengths = [16, 17, 150]
    q, k, v = inputs(3, 4, 1, 150, torch.float32, seed=1)  # MQA
    out, lse = dense_decode_triton(q, k, v, SCALE, length=torch.tensor(lengths), chunk_size=chunk)
    check(out, lse, q, k, v, lengths, None, torch.float32)


def test_padding_mask_and_fully_masked_row():
    """transformers' boolean static-cache mask: left padding and empty slots masked; a row whose only key is masked
    attends to nothing (zeros, lse -inf)."""
    lengths = [70, 150, 1]
    q, k, v = inputs(3, 4, 2, 150, torch.float32, seed=2)
    mask = torch.arange(150)[None, None, None, :] < torch.tensor(lengths)[:, None, None, None]
    mask[0, ..., :9] = False  # left padding
    mask[1, ..., 100:130] = False
    mask[2] = False  # nothing to attend to
    out, lse = dense_decode_triton(q, k, v, SCALE, attn_mask=mask, length=torch.tensor(lengths))
    check(out, lse, q, k, v, lengths, mask, torch.float32)
    assert torch.all(out[2] == 0) and torch.all(lse[2] == -math.inf)


def test_per_head_mask_and_dynamic_cache_without_length():
    """``length=None``: every key is the sequence (a dynamic cache); a per-head mask ``[B, Hq, 1, Lk]``."""
    q, k, v = inputs(2, 4, 2, 130, torch.bfloat16, seed=3)
    mask = torch.rand(2, 4, 1, 130, generator=torch.Generator().manual_seed(0)) > 0.3
    out, lse = dense_decode_triton(q, k, v, SCALE, attn_mask=mask)
    check(out, lse, q, k, v, [130, 130], mask, torch.bfloat16)


def test_selection_is_every_earlier_chunk_in_the_gates_layout():
    """Slot j holds chunk j while j is before the row's own chunk, -1 after (clamped lengths as the kernels clamp)."""
    sel = _dense_selection(3, 2, 200, 64, torch.tensor([0, 64, 129]), torch.device("cpu"))
    assert sel.dtype == torch.int32 and sel.shape == (3, 2, 3) and sel.is_contiguous()
    assert sel[:, 0].tolist() == [[-1, -1, -1], [-1, -1, -1], [0, 1, -1]]
    assert torch.equal(sel[:, 0], sel[:, 1])
    assert _dense_selection(1, 1, 200, 64, None, torch.device("cpu")).tolist() == [[[0, 1, 2]]]


def test_unsupported_reasons(monkeypatch: pytest.MonkeyPatch):
    # Metadata checks of CPU tensors, judged as under the CPU run (the interpreter on), also with MOBA_TEST_DEVICE=cuda.
    monkeypatch.setattr(ksupport, "interpreting", lambda: True)
    q, k, v = inputs(1, 4, 2, 40, torch.float32)
    assert dense_decode_unsupported_reason(q, k, v, None) is None
    assert dense_decode_unsupported_reason(q.double(), k.double(), v.double(), None) is not None
    wide = torch.randn(1, 2, 40, 96)
    assert dense_decode_unsupported_reason(wide[:, :, :1], wide, wide, None) == "head dim 96 not in (64, 128)"
    assert "Lq == 1" in dense_decode_unsupported_reason(torch.cat([q, q], 2), k, v, None)
    assert "multiple of 16" in dense_decode_unsupported_reason(q, k, v, None, chunk_size=24)
    assert dense_decode_chunk(40) == 48  # a short buffer: one chunk, a multiple of 16
    # Interpreted: chunks of 64 keys at most (tests cross chunks); compiled: DENSE_DECODE_CHUNK.
    assert dense_decode_chunk(1 << 20) == (64 if TEST_DEVICE.type == "cpu" else DENSE_DECODE_CHUNK)
    with pytest.raises(ValueError, match="length must be None or a contiguous int64"):
        dense_decode_triton(q, k, v, SCALE, length=torch.tensor([3], dtype=torch.int32))


def test_op_runs_the_kernel_and_counts_it():
    """``ops.dense_decode(impl="triton")`` runs the kernel (CALLS moves) and equals the reference path."""
    lengths = torch.tensor([5, 100])
    q, k, v = inputs(2, 4, 2, 100, torch.float32, seed=4)
    ops.CALLS.clear()
    with torch.no_grad():
        out = ops_dense_decode(q, k, v, length=lengths, impl="triton")
        ref = ops.dense_decode(q, k, v, length=lengths, impl="reference")
        auto = ops.dense_decode(q, k, v, length=lengths)  # CPU tensors: the reference, never the interpreter
    assert ops.CALLS["dense_decode:triton"] == 1 and ops.CALLS["dense_decode:reference"] == 2
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert torch.equal(auto, ref)
    want, _ = oracle(q, k, v, lengths.tolist(), None)
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=0)


def test_op_reference_fallback_and_errors():
    """Head dim 8 (no kernel): the graph-safe reference under "auto", an error naming the reason under "triton"."""
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 30, 8)
    ops.CALLS.clear()
    with torch.no_grad():
        out = ops.dense_decode(q, k, k, length=torch.tensor(12))  # a [] length is shared by the batch
    assert ops.CALLS["dense_decode:reference"] == 1
    ref = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :12], k[:, :, :12], enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="impl='triton' cannot run this dense decode step: head dim 8"):
        ops_dense_decode(q, k, k, impl="triton")
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.dense_decode(q.requires_grad_(), k, k)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.dense_decode(q.detach(), k, k, impl="fast")
    with pytest.raises(ValueError, match="length must be an integer tensor"):
        ops.dense_decode(q.detach(), k, k, length=torch.tensor([1.0, 2.0]))


def test_fake_kernel_and_opcheck():
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 30, 8)
    length = torch.tensor([3, 30])
    mask = torch.ones(2, 1, 1, 30, dtype=torch.bool)
    torch.library.opcheck(torch.ops.moba.dense_decode.default, (q, k, k, length, mask, 0.25, "reference"))
    torch.library.opcheck(torch.ops.moba.dense_decode.default, (q, k, k, None, None, 0.25, "auto"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fq, fk, fv = torch.empty(3, 8, 1, 64), torch.empty(3, 2, 1000, 64), torch.empty(3, 2, 1000, 128)
        out, lse = torch.ops.moba.dense_decode(fq, fk, fv, torch.empty(3, dtype=torch.int64), None, 0.1, "triton")
        assert out.shape == (3, 8, 1, 128) and lse.shape == (3, 8, 1) and lse.dtype == torch.float32
        assert out.is_contiguous() and lse.is_contiguous()


def test_compiled_static_step_replays_with_a_growing_length():
    """A graph (aot_eager, fullgraph) of the op over a fixed buffer: the same graph at every length, the kernel's
    result each time (no recompile, no host read of the length)."""
    q, k, v = inputs(2, 4, 2, 96, torch.float32, seed=5)
    length = torch.tensor([1, 40])
    on_device = [t.to(TEST_DEVICE) for t in (q, k, v)]
    device_length = length.to(TEST_DEVICE)

    def step(q, k, v, length):
        return ops.dense_decode(q, k, v, length=length, impl="triton")

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            ops.CALLS.clear()
            out = compiled(*on_device, device_length).cpu()
            assert ops.CALLS["dense_decode:triton"] == 1
            want, _ = oracle(q, k, v, device_length.tolist(), None)
            torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=0)
            device_length += 31  # in place, as a static cache's counter


def test_split_k_runs_the_kernel_through_the_hf_path():
    """Head dim 64 (a kernel head dim) and impl="triton": the dense layers' decode steps of a tiny Llama run the
    split-K kernels, interpreted, over a left-padded static cache (eager), and give the tokens of SDPA. Every layer is
    dense, so only the dense decode runs Triton (the prefill is SDPA)."""
    transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")
    from models import TINY_LLAMA, TOKEN_IDS

    import moba_compile.hf

    attention = moba_compile.hf.register({"dense_last": 2, "dense_decode": "split_k"}, name="dd_kernel", impl="triton")
    moba_compile.hf.register({"dense_last": 2, "dense_decode": "sdpa"}, name="dd_kernel_sdpa", impl="triton")
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **TOKEN_IDS, "num_hidden_layers": 2, "head_dim": 64})

    def build(attn: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval().to(TEST_DEVICE)

    ids = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ids[0, :7] = 0
    ids, mask = ids.to(TEST_DEVICE), mask.to(TEST_DEVICE)
    # disable_compile: on CUDA, generate() compiles a static cache's decode step on its own, and a compiled step calls
    # the ops once per trace rather than once per token, so the counts below would not count steps.
    kw = dict(
        attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static", disable_compile=True
    )
    with torch.no_grad():
        want = build("dd_kernel_sdpa").generate(ids, **kw)
        ops.CALLS.clear()
        got = build("dd_kernel").generate(ids, **kw)
    assert torch.equal(got, want)
    assert ops.CALLS["dense_decode:triton"] == 2 * 3 and ops.CALLS["dense_decode:reference"] == 0
    decode = {s.layer: s for s in attention.report().sites if s.form == "kv-cache"}
    assert all(decode[i].decision == "dense" and "dense_decode = 'split_k'" in decode[i].reason for i in (0, 1))


def test_dense_decode_kernel_compiles_for_h100_without_spills() -> None:
    # No GPU here: compile the split-K attention kernel's SHARED branch (one work item per chunk for a GQA group) at
    # the launcher's CUDA configurations for sm_90a with Triton's compiler and ptxas: it must compile, spill-free, on
    # whichever Triton is installed (3.6 on the GPU machine, 3.9 in CI).
    from kernel_cases import compile_check_records

    code = "import json; from benchmarks.decode import compile_check; print(json.dumps(compile_check(prefix='dense_')))"
    records = compile_check_records(["-c", code])
    assert len(records) == 20 and all(r["ok"] for r in records.values()), records
    assert all(r["spill_bytes"] == 0 for r in records.values()), records
