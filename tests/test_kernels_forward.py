"""The Triton MoBA forward (gate, index flip, key-major + own-chunk attention) versus the reference, interpreted.

Runs under the Triton interpreter (``TRITON_INTERPRET=1``, set below before anything imports triton), so shapes stay
small. Nothing is skipped: without triton these tests fail, CI installs it.

Tolerances (every one derived from data or named):

- gate: exact. The chunk index *sets* must equal ``reference.select_chunks`` (exact ties included).
- ``out``: ``2 * ref_err + eps(dtype) * max|out|``, where ``ref_err`` is the max error of
  ``reference.moba_attention_forward`` run on the same fp16/bf16 inputs versus float64 (fp32 math + one rounding to
  the dtype; the kernel does the same math in another order), and the second term is one ulp of the output's
  magnitude: the kernel rounds the probabilities P to the input dtype before ``P @ V``, as tensor cores (and
  FlashAttention) do, which the reference does not.
- ``lse``: ``2 * ref_lse_err + 8 * eps(fp32) * max(1, max|lse|)``: an fp32 log-sum-exp in both, summed in another
  order (a few fp32 ulps); ``-inf`` positions must match exactly.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402, F401  (a missing triton must fail the tests, not skip them)
from conftest import Case, kernel_case  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_cases import (  # noqa: E402
    TEST_DEVICE,
    assert_out_lse_within_budget,
    on_test_device,
    prefill_inputs,
    record_allocations,
)
from naive import naive_moba  # noqa: E402

from moba_compile import reference  # noqa: E402
from moba_compile.kernels import (  # noqa: E402
    chunk_means_triton,
    flip_selection,
    moba_forward_triton,
    select_chunks_triton,
    triton_unsupported_reason,
)
from moba_compile.kernels import forward as kernel_forward  # noqa: E402
from moba_compile.kernels import gating as kernel_gating  # noqa: E402
from moba_compile.kernels import support as kernel_support  # noqa: E402

# MOBA_TEST_DEVICE=cuda: the launchers run compiled on the GPU (kernel_cases.on_test_device); identity on the CPU.
chunk_means_triton = on_test_device(chunk_means_triton)
flip_selection = on_test_device(flip_selection)
moba_forward_triton = on_test_device(moba_forward_triton)
select_chunks_triton = on_test_device(select_chunks_triton)
triton_unsupported_reason = on_test_device(triton_unsupported_reason)


def make_inputs(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return prefill_inputs(case, seed)


def check_forward(
    q, k, v, chunk_size: int, topk: int, mask=None, scale: float | None = None, routing: str = "head", **kwargs
):
    """Run the kernel and compare (out, lse) with the float64 reference under the data-derived budget above."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = moba_forward_triton(q, k, v, chunk_size, topk, scale, mask, routing=routing, **kwargs)
    assert out.dtype == q.dtype and out.is_contiguous() and out.shape == (*q.shape[:3], v.shape[-1])
    assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == q.shape[:3]
    kw = dict(chunk_size=chunk_size, topk=topk, scale=scale, attn_mask=mask, routing=routing)
    out64, lse64 = reference.moba_attention_forward(q.double(), k.double(), v.double(), **kw)
    out_lp, lse_lp = reference.moba_attention_forward(q, k, v, **kw)
    assert_out_lse_within_budget(out, lse, out64, out_lp, lse64, lse_lp, torch.isinf(lse64), q.dtype)
    return out, lse, out64


def check_gate(q, k, chunk_size: int, topk: int, routing: str = "head") -> torch.Tensor:
    sel = select_chunks_triton(q, k, chunk_size, topk, routing=routing)
    ref = reference.select_chunks(q, k, chunk_size=chunk_size, topk=topk, routing=routing)
    assert sel.shape == ref.shape and sel.dtype == torch.int32
    assert torch.equal(sel.long().sort(-1).values, ref.sort(-1).values), "gate index sets differ from the reference"
    return sel


GRID = [
    kernel_case(1, 64, 4, 2, 16, 3, torch.float16),  # GQA
    kernel_case(1, 64, 4, 2, 16, 3, torch.bfloat16),
    kernel_case(2, 64, 4, 4, 16, 3, torch.bfloat16),  # MHA, batch 2
    kernel_case(1, 96, 4, 1, 32, 2, torch.float16),  # MQA
    kernel_case(1, 100, 2, 2, 16, 3, torch.float16),  # partial last chunk (100 = 6 * 16 + 4)
    kernel_case(1, 40, 2, 1, 16, 3, torch.bfloat16, lk=100),  # chunked prefill, partial last chunk
    kernel_case(2, 1, 4, 2, 32, 3, torch.float16, lk=200),  # decode
    kernel_case(1, 1, 4, 1, 16, 4, torch.bfloat16, lk=150),  # decode, MQA
    kernel_case(1, 64, 2, 2, 16, 1, torch.bfloat16),  # K = 1: own chunk only
    kernel_case(1, 64, 2, 1, 16, 8, torch.float16),  # K beyond the chunk count: dense causal
    kernel_case(1, 128, 2, 2, 16, 12, torch.bfloat16),  # K - 1 = 11 > 8 running slots, many chunks
    kernel_case(1, 64, 2, 1, 32, 2, torch.bfloat16, d=128),  # head dim 128
    kernel_case(1, 48, 2, 2, 16, 3, torch.float16, lk=96, d=128),  # head dim 128, Lq < Lk
    kernel_case(1, 64, 2, 2, 16, 3, torch.float16, dv=32),  # value head dim differs
    kernel_case(1, 64, 4, 2, 16, 3, torch.float16, mask="random_b1_empty"),  # incl. fully masked rows
    kernel_case(1, 64, 4, 2, 16, 3, torch.bfloat16, mask="random_b1_empty"),
    kernel_case(1, 50, 4, 2, 16, 2, torch.bfloat16, lk=80, mask="random_heads"),
    kernel_case(2, 64, 2, 1, 16, 3, torch.float16, mask="pad_first5"),
    kernel_case(1, 64, 4, 2, 16, 3, torch.bfloat16, strided=True),  # non-contiguous inputs
    kernel_case(1, 64, 2, 1, 16, 3, torch.float32),  # fp32: IEEE dots
    kernel_case(2, 129, 4, 2, 16, 5, torch.float16),  # odd length, 9 chunks
    kernel_case(
        1, 150, 2, 1, 48, 2, torch.bfloat16
    ),  # chunk 48: not a power of two (key blocks of 16), tiles span chunks
    kernel_case(1, 256, 2, 1, 32, 4, torch.bfloat16),  # N = 256
    kernel_case(1, 200, 2, 2, 64, 3, torch.float16, lk=256, d=128, mask="random_b1_empty"),  # head dim 128 with a mask
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_gate_matches_reference(case: Case) -> None:
    q, k, _, _ = make_inputs(case)
    check_gate(q, k, case.c, case.k)


@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_forward_matches_reference(case: Case) -> None:
    q, k, v, mask = make_inputs(case)
    check_forward(q, k, v, case.c, case.k, mask)


def test_chunk_means_match_reference() -> None:
    # fp32 sums of 50 bf16 keys in another order: agreement to a few fp32 ulps of the sum's magnitude.
    k = torch.randn(2, 3, 50, 32).to(torch.bfloat16)
    for chunk in (16, 24, 48):  # 24 and 48 are not multiples of the key block: blocks must stop at the chunk's end
        means = chunk_means_triton(k, chunk)  # the last chunk is partial in every case
        torch.testing.assert_close(means, reference.chunk_means(k, chunk), rtol=1e-6, atol=1e-6)


def test_gate_exact_ties_go_to_the_later_chunk() -> None:
    # Chunks 0, 2 and 4 are identical, so their means and scores tie exactly; chunks 1 and 3 are identical too.
    # Rows 80.. of the query are zero: every score is 0 (or -0), so the latest earlier chunks must win.
    torch.manual_seed(1)
    c, n = 16, 8
    base = torch.randn(1, 2, 2, c, 32)
    key = torch.randn(1, 2, n, c, 32)
    key[:, :, 0] = key[:, :, 2] = key[:, :, 4] = base[:, :, 0]
    key[:, :, 1] = key[:, :, 3] = base[:, :, 1]
    key = key.reshape(1, 2, n * c, 32).to(torch.float16)
    q = torch.randn(1, 4, n * c, 32).to(torch.float16)
    q[:, :, 80:] = 0
    for topk in (2, 3, 5):
        sel = check_gate(q, key, c, topk)
        ref = reference.select_chunks(q, key, chunk_size=c, topk=topk)
        assert torch.equal(sel.long(), ref), "the kernel also keeps the reference's order (score desc, later first)"
        own = torch.arange(80, n * c) // c
        for r, o in zip(range(80, n * c), own.tolist(), strict=True):
            expect = list(range(o - 1, max(-1, o - topk), -1))
            assert sel[0, 0, r, : len(expect)].tolist() == expect


def test_gate_many_chunks_topk_64() -> None:
    # 70 earlier chunks and K - 1 = 63 running slots: the widest top-k tile, several chunk blocks merged.
    q = torch.randn(1, 1, 20, 16).to(torch.float16)
    k = torch.randn(1, 1, 71 * 16 + 5, 16).to(torch.float16)
    check_gate(q, k, 16, 64)
    check_gate(q, k, 16, 9)


def test_dense_when_topk_covers_every_chunk() -> None:
    # Spec: K >= ceil(Lk / C) is dense causal (bottom-right) attention; checked against SDPA, not the reference.
    case = kernel_case(1, 40, 4, 2, 16, 6, torch.float16, lk=90)
    q, k, v, _ = make_inputs(case)
    out, _, out64 = check_forward(q, k, v, case.c, case.k)
    causal = torch.ones(case.lq, case.len_k, dtype=torch.bool).tril(case.len_k - case.lq)
    dense = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=causal, enable_gqa=True
    )  # float64 SDPA, bottom-right causal mask
    # out64 is the float64 reference; both oracles must agree to float64 rounding, then the kernel's budget applies.
    torch.testing.assert_close(out64, dense, rtol=1e-10, atol=1e-10)


def test_sparse_path_differs_from_dense() -> None:
    # 8 chunks, K = 2: most rows drop most earlier chunks, so the result must be far from dense attention.
    case = kernel_case(1, 128, 2, 2, 16, 2, torch.float16)
    q, k, v, _ = make_inputs(case, seed=3)
    out, _, _ = check_forward(q, k, v, case.c, case.k)
    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert (out.float() - dense).abs().max().item() > 0.1


def test_matches_independent_naive_oracle() -> None:
    # The brute-force oracle of tests/naive.py shares no code with the reference.
    case = kernel_case(1, 48, 4, 2, 16, 3, torch.float16, lk=70, mask="random_b1_empty")
    q, k, v, mask = make_inputs(case, seed=5)
    out, _ = moba_forward_triton(q, k, v, case.c, case.k, 0.125, mask)
    expect = naive_moba(q, k, v, case.c, case.k, 0.125, mask)
    ref_lp = reference.moba_attention(q, k, v, chunk_size=case.c, topk=case.k, scale=0.125, attn_mask=mask)
    tol = 2 * (ref_lp.double() - expect).abs().max().item() + torch.finfo(q.dtype).eps * expect.abs().max().item()
    assert (out.double() - expect).abs().max().item() <= tol


def test_decode_row_equals_last_prefill_row() -> None:
    case = kernel_case(1, 96, 2, 1, 16, 3, torch.bfloat16)
    q, k, v, _ = make_inputs(case, seed=7)
    full, full_lse = moba_forward_triton(q, k, v, 16, 3, 0.125)
    last, last_lse = moba_forward_triton(q[:, :, -1:], k, v, 16, 3, 0.125)
    # Same keys, same gate; only the fp32 accumulation order differs (other tile shapes): one ulp of bf16 output.
    torch.testing.assert_close(last.float(), full[:, :, -1:].float(), rtol=0, atol=torch.finfo(torch.bfloat16).eps)
    torch.testing.assert_close(last_lse, full_lse[:, :, -1:], rtol=1e-6, atol=1e-6)


def test_flip_lists_every_selection_once() -> None:
    b, hq, hkv, lq, n, km1, bm = 2, 4, 2, 37, 6, 3, 16
    g = hq // hkv
    torch.manual_seed(0)
    sel = torch.randint(-1, n, (b, hq, lq, km1), dtype=torch.int32)
    flip = flip_selection(sel, hkv, n, bm)
    seg_start, counts = flip.seg_start.tolist(), flip.counts.tolist()
    plane_size = g * lq * km1
    seen = 0
    for s in range(b * hkv * n):
        plane, c = divmod(s, n)
        got = sorted(flip.lists[seg_start[s] : seg_start[s] + counts[s]].tolist())
        flat = sel.reshape(b * hkv, plane_size)[plane]
        assert got == torch.nonzero(flat == c).flatten().tolist()
        seen += counts[s]
    assert seen == int((sel >= 0).sum())
    # Work tiles: each segment cut into ceil(count / bm) tiles of consecutive entries.
    tiles = list(zip(flip.tile_seg.tolist(), flip.tile_row0.tolist(), strict=True))
    expect = [(s, r) for s in range(b * hkv * n) for r in range(0, counts[s], bm)]
    assert [t for t in tiles if t[0] < flip.n_segments] == expect


def test_forward_scratch_is_bounded_by_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    # No (K-1)-fold buffer: every buffer the forward allocates is at most the output's size (the output, the LSE, the
    # int8 residual of the running output); the index arrays are int32. Chunked prefill with a mask, K=4.
    case = kernel_case(1, 60, 4, 2, 16, 4, torch.bfloat16, lk=90, mask="random_b1_empty")
    sizes = record_allocations(monkeypatch, kernel_forward)
    q, k, v, mask = make_inputs(case, seed=11)
    check_forward(q, k, v, case.c, case.k, mask)
    out_numel = case.b * case.hq * case.lq * case.d
    floats = [n for n, dt in sizes if dt.is_floating_point]
    assert len(floats) == 2 and max(floats) == out_numel, sizes  # out, lse
    assert [n for n, dt in sizes if dt == torch.int8] == [out_numel], sizes  # the residual: one byte per element


@pytest.mark.parametrize("residual", ["int8", "bf16"])
def test_residual_is_allocated_after_the_selection_is_freed(monkeypatch: pytest.MonkeyPatch, residual: str) -> None:
    # The forward's peak: the gate's selection and the flip's ranks (int32, one per entry) must be gone when the
    # residual of the running output (the output's shape; int8 by default, bf16 under residual="bf16") is allocated,
    # so the two never add up; the flip's lists (also one int32 per entry) live on through the attention passes.
    import weakref

    case = kernel_case(1, 60, 4, 2, 16, 4, torch.bfloat16, lk=90)
    out_numel = case.b * case.hq * case.lq * case.d
    n_entries = min(case.k - 1, (case.lk - 1) // case.c) * case.b * case.hq * case.lq
    made: list[tuple[int, torch.dtype, weakref.ref]] = []
    at_residual: list[list[bool]] = []
    lo_dtype = {"int8": torch.int8, "bf16": torch.bfloat16}[residual]

    def spy_for(module):
        real = module.empty

        def spy(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            t = real(*shape, dtype=dtype, device=device)
            if dtype == lo_dtype and t.numel() == out_numel and module is kernel_forward:
                at_residual.append([r() is not None for n, dt, r in made if dt == torch.int32 and n == n_entries])
            made.append((t.numel(), dtype, weakref.ref(t)))
            return t

        return spy

    for module in (kernel_forward, kernel_gating):
        monkeypatch.setattr(module, "empty", spy_for(module))
    q, k, v, _ = make_inputs(case, seed=5)
    check_forward(q, k, v, case.c, case.k, residual=residual)
    # The residual is the one int8 buffer of the output's size; the bf16 one is the second bf16 buffer of that size
    # (the bf16 output comes first).
    assert len(at_residual) == (1 if residual == "int8" else 2), at_residual
    alive = at_residual[-1]
    assert len(alive) == 3 and sum(alive) == 1, alive  # selection, ranks, lists: only the lists are alive


def test_flip_by_slot_groups_rows_by_slot_then_chunk() -> None:
    b, hq, hkv, lq, n, km1 = 2, 4, 2, 37, 6, 3
    torch.manual_seed(0)
    sel = torch.randint(-1, n, (b, hq, lq, km1), dtype=torch.int32)
    by_slot = on_test_device(kernel_gating.flip_by_slot)(sel, hkv, n, 16)
    flip, g = by_slot.flip, hq // hkv
    for j in range(km1):
        for bb in range(b):
            for h in range(hkv):
                for c in range(n):
                    s = ((j * b + bb) * hkv + h) * n + c
                    start, count = int(flip.seg_start[s]), int(flip.counts[s])
                    got = sorted(flip.lists[start : start + count].tolist())
                    want = [gg * lq + i for gg in range(g) for i in range(lq) if sel[bb, h * g + gg, i, j] == c]
                    assert got == want, (j, bb, h, c)
    # Slot j's tiles are [slot_tiles[j], slot_tiles[j + 1]) and cover exactly its segments.
    ends = by_slot.slot_tiles.tolist()
    per_slot = b * hkv * n
    for j in range(km1):
        segs = flip.tile_seg[ends[j] : ends[j + 1]]
        assert bool(((segs >= j * per_slot) & (segs < (j + 1) * per_slot)).all())
        # A launch's grid covers its slot's tiles: exactly where the count is read back (CPU), else the static bound.
        exact = kernel_gating._exact_tile_count(TEST_DEVICE)
        assert by_slot.grids[j] == ends[j + 1] - ends[j] if exact else by_slot.grids[j] >= ends[j + 1] - ends[j]


def test_static_tile_bound_with_padding_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CUDA path never reads the tile count back: it launches E // bm + S tiles, the surplus marked tile_seg == S.
    monkeypatch.setattr(kernel_gating, "_exact_tile_count", lambda device: False)
    case = kernel_case(1, 64, 4, 2, 16, 3, torch.float16)
    q, k, v, _ = make_inputs(case, seed=2)
    sel = select_chunks_triton(q, k, case.c, case.k)
    flip = flip_selection(sel, case.hkv, 4, 16)
    padding = flip.tile_seg == flip.n_segments
    assert padding.any() and not padding[: int((~padding).sum())].any(), "padding tiles come last"
    check_forward(q, k, v, case.c, case.k)


def test_unsupported_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    def q_(d: int = 64, dtype: torch.dtype = torch.float16, length: int = 32, heads: int = 2) -> torch.Tensor:
        return torch.zeros(1, heads, length, d, dtype=dtype)

    q = q_()
    assert triton_unsupported_reason(q, q, q, 16, 3, None) is None
    assert triton_unsupported_reason(q_(72), q_(72), q_(72), 16, 3, None) == "head dim 72 not in (16, 32, 64, 128, 256)"
    assert triton_unsupported_reason(q, q, q_(48), 16, 3, None) == "value head dim 48 not in (16, 32, 64, 128, 256)"
    q64 = q_(dtype=torch.float64)
    assert triton_unsupported_reason(q64, q64, q64, 16, 3, None) == "dtype float64 routed to the reference"
    assert triton_unsupported_reason(q, q, q, 100, 3, None) == "chunk_size 100 is not a multiple of 16"
    # Limits apply to the clamped parameters (bounded_params): a chunk beyond Lk is one chunk, topk beyond the chunk
    # count selects them all, so only sequences long enough to use the value meet the limit.
    long_q = q_(length=8300)
    assert triton_unsupported_reason(long_q, long_q, long_q, 8208, 3, None) == "chunk_size 8208 not in [16, 8192]"
    assert triton_unsupported_reason(q, q, q, 8208, 3, None) is None
    q65 = q_(length=65 * 16)
    assert triton_unsupported_reason(q65, q65, q65, 16, 65, None) == "topk 65 > 64"
    assert triton_unsupported_reason(q, q, q, 16, 65, None) is None
    assert triton_unsupported_reason(q, q, q, 16, 0, None) == "topk 0 is not an int >= 1"
    assert triton_unsupported_reason(q_(length=40), q, q, 16, 3, None) == "Lq=40 > Lk=32"
    assert (
        triton_unsupported_reason(q_(heads=3), q, q, 16, 3, None)
        == "query heads (3) are not a multiple of key heads (2)"
    )
    assert triton_unsupported_reason(q, q, q, 16, 3, torch.zeros(1, 1, 32, 32)) == "attn_mask is not a boolean tensor"
    bad_mask = torch.ones(1, 1, 5, 32, dtype=torch.bool)
    assert (
        triton_unsupported_reason(q, q, q, 16, 3, bad_mask)
        == "attn_mask shape (1, 1, 5, 32) does not broadcast to [1, 2, 32, 32]"
    )
    meta = q.to("meta")
    assert (
        triton_unsupported_reason(meta, meta, meta, 16, 3, None)
        == "device type 'meta' is not supported by the Triton kernels"
    )
    with pytest.raises(ValueError, match="topk 65 > 64"):
        moba_forward_triton(q65, q65, q65, 16, 65, 0.125)
    # The routing of CPU tensors themselves: the launcher's own check, never moved to MOBA_TEST_DEVICE.
    cpu_reason = kernel_forward.triton_unsupported_reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cpu_reason(q, q, q, 16, 3, None) == "CPU tensors need TRITON_INTERPRET=1"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernel_support, "triton_available", lambda: False)
    assert cpu_reason(q, q, q, 16, 3, None) == "triton is not installed"


def test_package_imports_without_triton() -> None:
    # A child process where `import triton` fails: the package imports, reports why, and raises only when called.
    code = """
import sys
sys.modules["triton"] = None
import torch
import moba_compile.kernels as K
q = torch.zeros(1, 2, 32, 64, dtype=torch.float16)
assert K.triton_unsupported_reason(q, q, q, 16, 3, None) == "triton is not installed"
try:
    K.moba_forward_triton(q, q, q, 16, 3, 0.125)
except RuntimeError as exc:
    assert "triton" in str(exc)
else:
    raise AssertionError("no error without triton")
try:
    from moba_compile.kernels import moba_backward_triton  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("without triton, importing moba_backward_triton must raise ImportError (ops falls back)")
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_empty_query() -> None:
    q = torch.zeros(1, 2, 0, 64, dtype=torch.float16)
    k = torch.randn(1, 2, 32, 64).to(torch.float16)
    out, lse = moba_forward_triton(q, k, k, 16, 3, 0.125)
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)


@settings(deadline=None, derandomize=True, database=None, max_examples=10)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    chunk=st.sampled_from([16, 32]),
    lk=st.integers(1, 160),
    lq_frac=st.floats(0.0, 1.0),
    topk=st.integers(1, 6),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    d=st.sampled_from([16, 32]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(b=1, hkv=1, group=1, chunk=16, lk=1, lq_frac=1.0, topk=1, dtype=torch.float16, d=16, masked=False, seed=0)
@example(b=1, hkv=2, group=2, chunk=16, lk=33, lq_frac=0.0, topk=6, dtype=torch.bfloat16, d=32, masked=True, seed=1)
def test_hypothesis_shapes(b, hkv, group, chunk, lk, lq_frac, topk, dtype, d, masked, seed) -> None:
    lq = max(1, round(lq_frac * lk))
    case = kernel_case(
        b, lq, hkv * group, hkv, chunk, topk, dtype, lk=lk, d=d, mask="random_b1_empty" if masked else None
    )
    q, k, v, mask = make_inputs(case, seed=seed)
    check_gate(q, k, chunk, topk)
    check_forward(q, k, v, chunk, topk, mask)
