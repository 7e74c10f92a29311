"""Context parallelism on 2 GPUs of one host (NCCL): the Triton kernels over a sequence sharded across ranks equal one
GPU on the whole sequence; so do the dense layers, on flash pairs in bf16/fp16 (head-tail balanced and not; checked to
have run) and on SDPA in fp32; the training example agrees with one process in bf16.

Skipped with fewer than 2 GPUs. Run on the 2-GPU machine with::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TRITON_INTERPRET=0 PYTHONPATH=. \\
        python -m pytest tests/gpu/test_cuda_context_parallel.py -q

One ``torchrun --nproc-per-node 2`` launch of this file (its ``__main__`` part) saves each rank's output shard and
gradients; the test recomputes the single-GPU result in the pytest process and compares.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# bf16, GQA 8/2, head dim 128; 16K tokens in chunks of 512, top-3: rank 1's rows select chunks on both ranks.
CASES = {
    "bf16-L16384-C512-K3": dict(B=1, HQ=8, HKV=2, L=16384, D=128, C=512, K=3, dtype=torch.bfloat16),
    "fp16-L8192-C256-K4": dict(B=2, HQ=4, HKV=4, L=8192, D=64, C=256, K=4, dtype=torch.float16),
}

# The dense layers' op (a policy's dense layers): the 1.2B model's heads (16/4 of 128) in bf16 on flash pairs, head-tail
# balanced (the default) and not; fp16 with a head dim of 64 and no GQA; fp32, which CUDA's flash does not take (SDPA
# with a lower-right mask). "calls": what moba_compile.ops.CALLS must count on every rank for one forward + backward.
_BALANCED = {"cp_dense:balanced": 1, "cp_dense:flash": 2, "cp_dense_backward:flash": 2}
DENSE = {
    "dense-bf16-L16384-16/4x128": dict(B=1, HQ=16, HKV=4, L=16384, D=128, dtype=torch.bfloat16, calls=_BALANCED),
    "dense-bf16-L16384-16/4x128-unbalanced": dict(
        B=1,
        HQ=16,
        HKV=4,
        L=16384,
        D=128,
        dtype=torch.bfloat16,
        balance=False,
        calls={"cp_dense:flash": 1, "cp_dense_backward:flash": 1},
    ),
    "dense-fp16-L8192-4/4x64": dict(B=2, HQ=4, HKV=4, L=8192, D=64, dtype=torch.float16, calls=_BALANCED),
    "dense-fp32-L4096-8/2x64": dict(B=1, HQ=8, HKV=2, L=4096, D=64, dtype=torch.float32, calls={"cp_dense:sdpa": 1}),
}


def _inputs(case: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, hq, hkv, length, d = case["B"], case["HQ"], case["HKV"], case["L"], case["D"]
    shapes = ((b, hq, length, d), (b, hkv, length, d), (b, hkv, length, d), (b, hq, length, d))
    return tuple(torch.randn(s, generator=gen).to(device, case["dtype"]) for s in shapes)


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from moba_compile import context_parallel as cp
    from moba_compile.ops import CALLS

    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    mesh = init_device_mesh("cuda", (WORLD,), mesh_dim_names=("cp",))
    result = {}
    for name, case in CASES.items():
        q, k, v, grad = (cp.shard_sequence(t, mesh, dim=2) for t in _inputs(case, torch.device("cuda")))
        q, k, v = (t.contiguous().requires_grad_() for t in (q, k, v))
        o = cp.context_parallel_moba_attention(
            q, k, v, mesh_or_group=mesh, chunk_size=case["C"], topk=case["K"], impl="triton"
        )
        o.backward(grad.contiguous())
        result[name] = {n: t.detach().cpu() for n, t in (("out", o), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))}
    for name, case in DENSE.items():
        q, k, v, grad = (cp.shard_sequence(t, mesh, dim=2) for t in _inputs(case, torch.device("cuda")))
        q, k, v = (t.contiguous().requires_grad_() for t in (q, k, v))
        calls = dict(CALLS)
        o = cp.context_parallel_dense_attention(q, k, v, mesh_or_group=mesh, balance=case.get("balance", True))
        o.backward(grad.contiguous())
        torch.cuda.synchronize()
        used = {k: n - calls.get(k, 0) for k, n in CALLS.items() if n != calls.get(k, 0)}
        parts = (("out", o), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))
        result[name] = {**{n: t.detach().cpu() for n, t in parts}, "calls": used}
    torch.save(result, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < WORLD, reason="needs 2 CUDA GPUs"
)


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **NCCL_ENV, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "0"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540, check=False)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("cp_gpu")
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), __file__, str(out)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6))


@pytest.mark.parametrize("name", list(CASES))
def test_triton_context_parallel_matches_one_gpu(ranks: list[dict[str, Any]], name: str) -> None:
    from moba_compile import moba_attention

    case = CASES[name]
    q, k, v, grad = _inputs(case, torch.device("cuda"))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    o = moba_attention(q, k, v, chunk_size=case["C"], topk=case["K"], impl="triton")
    o.backward(grad)
    single = {"out": o, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for part, full in single.items():
        for r, expected in enumerate(full.detach().cpu().chunk(WORLD, dim=2)):
            got = ranks[r][name][part]
            # Same kernels on the same rows: outputs and dQ agree to low-precision rounding (dQ uses atomics); dK/dV
            # add a bf16/fp16 reduce-scatter of the ranks' partial sums, one more rounding of the input dtype.
            budget = 2e-2 if part in ("dk", "dv") else 1e-2
            assert _rel(got, expected) <= budget, f"{name} {part} rank {r}: {_rel(got, expected):.2e}"


@pytest.mark.parametrize("name", list(DENSE))
def test_dense_context_parallel_matches_one_gpu(ranks: list[dict[str, Any]], name: str) -> None:
    case = DENSE[name]
    q, k, v, grad = _inputs(case, torch.device("cuda"))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    # One GPU: causal SDPA on the whole sequence (flash for bf16/fp16, the memory-efficient kernel for fp32).
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    o.backward(grad)
    single = {"out": o, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    low = case["dtype"] != torch.float32
    for part, full in single.items():
        for r, expected in enumerate(full.detach().cpu().chunk(WORLD, dim=2)):
            got = ranks[r][name][part]
            assert got.dtype == expected.dtype
            # 16-bit: both round outputs and gradients to the input dtype (the pair also its parts' dq and the merged
            # output), and dK/dV add a reduce-scatter of the ranks' partial sums. fp32: summation order only.
            budget = (2e-2 if part in ("dk", "dv") else 1e-2) if low else 1e-3
            assert _rel(got, expected) <= budget, f"{name} {part} rank {r}: {_rel(got, expected):.2e}"
    for r in range(WORLD):
        assert ranks[r][name]["calls"] == case["calls"], f"rank {r}: {ranks[r][name]['calls']}"


def test_flash_merge_matches_lower_right_sdpa_on_one_gpu() -> None:
    from torch.nn.attention.bias import causal_lower_right

    from moba_compile.flash_merge import causal_flash_attention, flash_unsupported_reason

    # 2048 queries over 6144 keys (the last rank of 3), GQA 8/2, keys in the all-gather's layout ([L, B, H, D]
    # memory viewed as [B, H, L, D]): what context parallelism hands the pair.
    gen = torch.Generator(device="cpu").manual_seed(1)
    q = torch.randn(1, 8, 2048, 128, generator=gen).to("cuda", torch.bfloat16)
    k, v = (torch.randn(6144, 1, 2, 128, generator=gen).to("cuda", torch.bfloat16).permute(1, 2, 0, 3) for _ in "kv")
    grad = torch.randn(1, 8, 2048, 128, generator=gen).to("cuda", torch.bfloat16)
    assert flash_unsupported_reason(q, k, v) is None
    results = []
    for fn in (
        lambda q, k, v: causal_flash_attention(q, k, v),
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=causal_lower_right(2048, 6144)
        ),
    ):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad)
        results.append([out.detach(), *(t.grad for t in leaves)])
    for part, got, expected in zip(("out", "dq", "dk", "dv"), *results):
        assert _rel(got, expected) <= 1e-2, f"{part}: {_rel(got, expected):.2e}"


def test_example_bf16_matches_one_process() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD)]
    args = ["examples/train_context_parallel.py", "--device", "cuda", "--dtype", "bfloat16", "--seq-len", "8192"]
    args += ["--chunk-size", "512", "--topk", "3", "--steps", "3", "--compile"]
    proc = _run(cmd + args)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "context parallel matches one process" in proc.stdout


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
