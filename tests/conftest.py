"""Shared helpers for the MoBA reference and op tests: seeded inputs, masks, dense oracles and named tolerances.

Test modules import the helpers directly (``from conftest import ...``); pytest puts ``tests/`` on ``sys.path`` the same
way it does for ``tests/naive.py``.
"""

from __future__ import annotations

import os

# Triton decides at import whether its kernels run interpreted, and torch._inductor (used by other test modules)
# imports it early: set the flag here, before any test module is imported, so the interpreted kernel tests (which use
# CPU tensors) pass in any order. impl="auto" still picks the reference on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")


def _threads_per_xdist_worker() -> int | None:
    """The CPUs each pytest-xdist worker may use (``None`` outside xdist): the machine's CPUs divided among workers.

    Every worker's torch (and OpenMP) otherwise starts one thread per CPU, so ``-n 2`` on two cores runs four busy
    threads, and more while a test's subprocess (a torchrun with two ranks) runs beside the other worker. OpenMP
    threads spin while they wait for each other, so oversubscribed they mostly wait: on CI's two cores two concurrent
    ``benchmarks.end_to_end --smoke`` runs took 37-47 s with two threads each and 22-26 s with one.
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, int(workers)))


# Set before torch is imported (its thread pool reads it once), and inherited by the processes tests start (examples,
# benchmarks, torchrun ranks). A value the caller set is kept.
_THREADS = _threads_per_xdist_worker() if "OMP_NUM_THREADS" not in os.environ else None
if _THREADS is not None:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)

import math  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from moba_compile.kernels import launch as kernel_launch  # noqa: E402

if _THREADS is not None:  # in case a plugin imported torch before this file: its pool is sized already
    torch.set_num_threads(_THREADS)

# tests/gpu holds checks that need a CUDA GPU (compiled kernels at large shapes, whole models on CUDA); on a machine
# without one there is nothing of them to run, so they are not collected (run them with TRITON_INTERPRET=0 on a GPU).
collect_ignore = [] if torch.cuda.is_available() else ["gpu"]

# The files that take longest on two cores with cold Inductor and Triton caches (the whole-suite run of .ci/run, timed
# with --durations), longest first; every other file (each under ~4 s) follows in collection order.
# `--dist loadfile` gives each file to one worker, from a queue that pytest-xdist orders by number of tests by default:
# that put the few-test, long files (subprocess runs of the examples and benchmarks, torchrun) at the end, so one of
# them often ran alone after the other worker had finished. Longest first, the short files fill in at the end instead;
# a long file missing here (test_reproduce_large.py was, at ~30 s) can still end a run alone, so a new long file
# belongs in this list. Only the order of whole files changes (tests within a file run in their order), and only under
# pytest-xdist.
_LONGEST_FILES_FIRST = (
    "test_train_examples.py",
    "test_generate_example.py",
    "test_kernels_backward.py",
    "test_pass_dense_flash.py",
    "test_hf.py",
    "test_kernels_compile.py",
    "test_cli_examples.py",
    "test_pass_regions.py",
    "test_backend.py",
    "test_pass_static_cache.py",
    "test_hf_models.py",
    "test_reproduce_smoke.py",
    "test_context_parallel.py",
    "test_benchmarks.py",
    "test_reproduce_large.py",
    "test_kernels_forward.py",
    "test_forward_residual.py",
    "test_export_example.py",
    "test_kernels_dense_decode.py",
    "test_packed.py",
    "test_packed_train.py",
    "test_routing_group.py",
    "test_kernels_decode.py",
    "test_pass_layers.py",
    "test_export.py",
    "test_hf_static_cache.py",
    "test_pass_modes.py",
    "test_packed_hf.py",
    "test_hf_dense_decode.py",
    "test_reproduce_mid.py",
    "test_pass_identity.py",
    "test_static_decode.py",
    "test_kernels_static_decode.py",
    "test_ops.py",
    "test_reproduce_convert.py",
    "test_packed_bench.py",
    "test_op_inference_mode.py",
    "test_pass_torch_modules.py",
    "test_pass_warnings.py",
    "test_hf_exactness.py",
)


def pytest_configure(config: pytest.Config) -> None:
    # Keep the queue in collection order (pytest_collection_modifyitems below) instead of xdist's by-count order.
    if getattr(config.option, "dist", "no") == "loadfile" and hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # a plain run keeps pytest's order
        return
    rank = {name: i for i, name in enumerate(_LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order and the rest's kept


# Modules whose kernels run with poisoned buffers (kernel_launch.POISON_BUFFERS): the kernel and op tests.
_POISONED_MODULES = ("test_kernels_", "test_op_", "test_ops")


@pytest.fixture(autouse=True)
def _poison_kernel_buffers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer a Triton launcher allocates starts as NaN / the largest integer in the kernel and op tests, so an
    output (or scratch entry) no kernel wrote fails the test instead of passing on the allocator's leftovers."""
    if request.module.__name__.startswith(_POISONED_MODULES):
        monkeypatch.setattr(kernel_launch, "POISON_BUFFERS", True)


# Float64 comparisons of two correct implementations that only sum in different orders (blocked matmuls vs per-row
# loops, fused SDPA vs explicit softmax): observed differences are ~1e-15 on O(1) values. 1e-10 leaves five orders of
# magnitude of headroom and is still ~8 orders below the O(1e-2) change that one wrongly included or excluded key makes.
F64 = {"rtol": 1e-10, "atol": 1e-10}


def low_precision_atol(dtype: torch.dtype, reference: Tensor) -> float:
    """Error budget of a bf16/fp16 result against the float64 reference computed on the *same* (already rounded) inputs.

    The reference path accumulates in fp32 and rounds once to ``dtype`` at the end, so the dominant error is that final
    rounding: at most half an ulp, i.e. ``eps / 2 * |x| <= eps / 2 * max|ref|``. fp32 accumulation adds ~``Lk * 2**-24``
    relative, far below ``eps / 2`` for the short test sequences. Budget: ``eps * max|ref|``, twice the rounding bound.
    """
    return torch.finfo(dtype).eps * float(reference.detach().abs().max())


DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass(frozen=True)
class Case:
    """One MoBA call's shapes and parameters: the one test case class of every test module.

    ``form`` says who built it and how it names itself. ``"reference"`` (reference and op tests, built directly as
    ``Case(b, lq, lk, hq, hkv, c, k)``; inputs drawn in float64 by :meth:`inputs`): ids like
    ``B2-Lq37-Lk37-Hq4-Hkv2-C5-K3``. ``"prefill"`` / ``"decode"`` (Triton kernel tests, built by :func:`kernel_case` /
    :func:`decode_case` with a ``dtype`` and head dim 64; inputs from ``kernel_cases``): ids like
    ``B1-Lq64-Hq4-Hkv2-C16-K3-bf16`` / ``B2-Lk100-Hq4-Hkv2-C16-K3-fp16``. ``mask`` names a :func:`make_mask` kind.
    """

    b: int
    lq: int
    lk: int | None  # None (kernel prefill cases only): Lk = Lq
    hq: int
    hkv: int
    c: int
    k: int
    d: int = 8
    dv: int | None = None
    scale: float | None = None
    mask: str = "none"
    seed: int = 0
    dtype: torch.dtype | None = None  # the kernel cases' input dtype (reference cases take it in inputs())
    strided: bool = False  # kernel cases: q/k/v (and dO) as transposed [B, L, H, D] views
    form: str = "reference"

    @property
    def len_k(self) -> int:
        """The key length (``lq`` when ``lk`` is None)."""
        return self.lq if self.lk is None else self.lk

    @property
    def id(self) -> str:
        if self.form != "reference":
            head = [f"B{self.b}"] + ([f"Lq{self.lq}"] if self.form == "prefill" else [])
            head += [f"Lk{self.lk}"] if self.lk is not None else []
            return case_id([*head, f"Hq{self.hq}", f"Hkv{self.hkv}"], self)
        parts = [f"B{self.b}-Lq{self.lq}-Lk{self.lk}-Hq{self.hq}-Hkv{self.hkv}-C{self.c}-K{self.k}"]
        if self.d != 8 or self.dv is not None:
            parts.append(f"D{self.d}-Dv{self.dv if self.dv is not None else self.d}")
        if self.scale is not None:
            parts.append(f"s{self.scale}")
        if self.mask != "none":
            parts.append(f"mask_{self.mask}")
        return "-".join(parts)

    def with_(self, **kw) -> Case:
        return replace(self, **kw)

    def inputs(self, dtype: torch.dtype = torch.float64, requires_grad: bool = False):
        """``(q, k, v, mask)`` for this case: seeded normal q/k/v (drawn in float64, then cast) and the named mask."""
        q, k, v = rand_qkv(
            self.seed, self.b, self.hq, self.hkv, self.lq, self.len_k, self.d, self.dv, dtype=dtype, requires_grad=False
        )
        mask = make_mask(self.mask, self.b, self.hq, self.lq, self.len_k, self.seed)
        if requires_grad:
            q, k, v = (t.requires_grad_() for t in (q, k, v))
        return q, k, v, mask

    def params(self) -> dict:
        return {"chunk_size": self.c, "topk": self.k, "scale": self.scale}


def kernel_case(
    b: int,
    lq: int,
    hq: int,
    hkv: int,
    c: int,
    k: int,
    dtype: torch.dtype,
    *,
    lk: int | None = None,
    d: int = 64,
    dv: int | None = None,
    mask: str | None = None,
    strided: bool = False,
) -> Case:
    """A prefill (or chunked-prefill, ``lk > lq``) case of the Triton kernel tests; ``lk=None`` means ``Lk = Lq``."""
    return Case(b, lq, lk, hq, hkv, c, k, d=d, dv=dv, mask=mask or "none", dtype=dtype, strided=strided, form="prefill")


def decode_case(
    b: int,
    lk: int,
    hq: int,
    hkv: int,
    c: int,
    k: int,
    dtype: torch.dtype,
    *,
    d: int = 64,
    dv: int | None = None,
    mask: str | None = None,
    strided: bool = False,
) -> Case:
    """A decode case (one query row at position ``lk - 1``) of the Triton decode kernel tests."""
    return Case(b, 1, lk, hq, hkv, c, k, d=d, dv=dv, mask=mask or "none", dtype=dtype, strided=strided, form="decode")


def case_id(head: list[str], case: Case) -> str:
    """A kernel case's readable pytest id: ``head`` (the shape), then head dims, chunk, top-k, dtype, mask, layout."""
    parts = list(head)
    if case.d != 64:
        parts.append(f"D{case.d}")
    if case.dv is not None:
        parts.append(f"Dv{case.dv}")
    parts += [f"C{case.c}", f"K{case.k}", DTYPE_NAMES[case.dtype]]
    if case.mask != "none":
        parts.append(f"mask-{case.mask}")
    if case.strided:
        parts.append("strided")
    return "-".join(parts)


def rand_qkv(
    seed: int,
    b: int,
    hq: int,
    hkv: int,
    lq: int,
    lk: int,
    d: int,
    dv: int | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    requires_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded ``q [b, hq, lq, d]``, ``k [b, hkv, lk, d]``, ``v [b, hkv, lk, dv]``; same values for every dtype."""
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, lk, dv, generator=gen, dtype=torch.float64).to(dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v


def bottom_right_causal(lq: int, lk: int) -> Tensor:
    """Bool ``[lq, lk]``: query row ``i`` (position ``lk - lq + i``) may see keys ``<=`` its position."""
    rows = torch.arange(lq)[:, None] + (lk - lq)
    return torch.arange(lk)[None, :] <= rows


def make_mask(
    kind: str, b: int, hq: int, lq: int, lk: int, seed: int = 0, *, generator: torch.Generator | None = None
) -> Tensor | None:
    """Named boolean masks (True = may attend), all broadcastable to ``[b, hq, lq, lk]``: the one mask factory.

    Random kinds draw from ``generator`` (the kernel tests pass the one that drew q/k/v), else from a generator seeded
    ``10_000 + seed``.

    ``random``: i.i.d. keep-probability 0.7 per (batch, head, row, key); ``random_b1``: shared over heads;
    ``left_pad``/``right_pad``: ``[b, 1, 1, lk]`` padding masks hiding a different number of keys per batch element (the
    first element unpadded); ``empty_rows``: random with some rows fully masked; ``causal_pad``: bottom-right causal AND
    left padding (the form Hugging Face builds); ``all_false``: nothing may attend (``[b, 1, 1, lk]``).
    Kernel tests: ``random_b1_empty``: ``[b, 1, lq, lk]`` keep-probability 0.7 with every ``lq // 3``-th row fully
    masked; ``random_heads``: ``[b, hq, lq, lk]`` keep-probability 0.5; ``random_heads_p06``: the same at 0.6;
    ``pad_first5``: ``[b, 1, 1, lk]``, the first 5 keys of batch 0 hidden; ``left_pad_spread``: ``[b, 1, 1, lk]`` left
    padding of ``i * lk // (b + 1)`` keys for batch ``i``; ``left_pad_spread_empty``: the same with batch 0 fully
    masked.
    """
    if kind == "none":
        return None
    gen = generator if generator is not None else torch.Generator().manual_seed(10_000 + seed)
    if kind == "random":
        return torch.rand(b, hq, lq, lk, generator=gen) < 0.7
    if kind == "random_b1":
        return torch.rand(b, 1, lq, lk, generator=gen) < 0.7
    if kind in ("left_pad", "right_pad", "causal_pad"):
        pads = [(i * max(1, lk // 3)) % lk for i in range(b)]  # 0, lk//3, 2*lk//3, ... keys hidden per element
        pos = torch.arange(lk)
        rows = []
        for pad in pads:
            rows.append(pos >= pad if kind != "right_pad" else pos < lk - pad)
        mask = torch.stack(rows)[:, None, None, :]
        if kind == "causal_pad":
            mask = mask & bottom_right_causal(lq, lk)
        return mask
    if kind == "empty_rows":
        mask = torch.rand(b, hq, lq, lk, generator=gen) < 0.7
        mask[..., :: max(1, lq // 3), :] = False
        return mask
    if kind == "all_false":
        return torch.zeros(b, 1, 1, lk, dtype=torch.bool)
    if kind == "random_b1_empty":
        mask = torch.rand(b, 1, lq, lk, generator=gen) > 0.3
        mask[:, :, :: max(1, lq // 3)] = False  # fully masked rows: out = 0, lse = -inf, zero gradients
        return mask
    if kind in ("random_heads", "random_heads_p06"):
        return torch.rand(b, hq, lq, lk, generator=gen) > (0.5 if kind == "random_heads" else 0.4)
    if kind == "pad_first5":
        mask = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        mask[0, ..., :5] = False
        return mask
    if kind in ("left_pad_spread", "left_pad_spread_empty"):  # Hugging Face style left padding, per batch element
        pos = torch.arange(lk)
        mask = torch.stack([pos >= (i * lk) // (b + 1) for i in range(b)])[:, None, None, :]
        if kind == "left_pad_spread_empty":
            mask[0] = False  # a row with no key at all: out = 0, lse = -inf
        return mask
    raise ValueError(f"unknown mask kind {kind!r}")


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float | None = None, *, dtype: torch.dtype | None = None
) -> Tensor:
    """Explicit softmax attention over ``allowed`` (bool, broadcastable to ``[B, Hq, Lq, Lk]``); empty rows give 0.

    Differentiable; GQA by repeating key/value (fine for an oracle on small shapes). Computes in ``dtype``
    (default: the inputs').
    """
    dtype = q.dtype if dtype is None else dtype
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kr = k.to(dtype).repeat_interleave(group, dim=1)
    vr = v.to(dtype).repeat_interleave(group, dim=1)
    s = (q.to(dtype) @ kr.transpose(-1, -2)) * scale
    allowed = allowed.expand(s.shape)
    s = s.masked_fill(~allowed, -math.inf)
    row_max = s.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(s - row_max)
    denom = p.sum(-1, keepdim=True)
    return (p @ vr) / torch.where(denom > 0, denom, torch.ones_like(denom))


def own_chunk_causal(lq: int, lk: int, chunk_size: int) -> Tensor:
    """Bool ``[lq, lk]``: block-diagonal causal mask, each row sees only keys of its own chunk up to its position."""
    rows = torch.arange(lq)[:, None] + (lk - lq)
    keys = torch.arange(lk)[None, :]
    return (keys <= rows) & (keys // chunk_size == rows // chunk_size)
