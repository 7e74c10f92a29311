"""Profile the MoBA forward (and optionally the backward) launchers at one shape on the GPU.

Prints, per configuration, the wall time of one call (CUDA events around back-to-back calls), the summed GPU time of
its kernels, and the kernel table: the diagnostic for a forward slower than its kernels' work predicts (a host-bound
call shows GPU time well below wall time; a slow kernel shows in the table).

    python -m benchmarks.profile_forward --shape 1,32,8192,512,3 --shape 2,16,8192,128,8 --backward
"""

from __future__ import annotations

import argparse
import math

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def _shape(text: str) -> tuple[int, int, int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 5:
        raise argparse.ArgumentTypeError(f"--shape wants B,H,N,CHUNK,TOPK, got {text!r}")
    return parts  # type: ignore[return-value]


def _wall_ms(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def profile_shape(shape: tuple[int, int, int, int, int], head_dim: int, backward: bool, reps: int, rows: int) -> None:
    """Time and profile ``moba_forward_triton`` (and ``moba_backward_triton``) at ``(B, H, N, chunk, topk)``."""
    from moba_compile.kernels import moba_backward_triton, moba_forward_triton

    b, h, n, c, k = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, key, val, d_out = (
        torch.randn(b, h, n, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4)
    )
    scale = 1.0 / math.sqrt(head_dim)
    fwd = lambda: moba_forward_triton(q, key, val, c, k, scale)  # noqa: E731
    calls = {"forward": fwd}
    if backward:
        out, lse = fwd()
        calls["backward"] = lambda: moba_backward_triton(d_out, q, key, val, out, lse, c, k, scale)
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, key, val, is_causal=True, scale=scale)  # noqa: E731
    calls["dense"] = dense
    for name, fn in calls.items():
        for _ in range(3):  # compile and warm up
            fn()
        wall = _wall_ms(fn, reps)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        # Kernel rows only: an ATen op's row repeats the device time of the kernels it launched (the first run of this
        # script printed 1.87 ms of "kernels" for a 0.90 ms dense SDPA call by summing both).
        kernels = (e for e in events if e.device_type != DeviceType.CPU)
        gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / reps
        label = f"B{b} H{h} N{n} C{c} K{k} D{head_dim} {name}"
        print(f"== {label}: wall {wall:.3f} ms/call, GPU kernels {gpu_ms:.3f} ms/call")
        print(events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))


def main(argv: list[str] | None = None) -> int:
    """Profile each ``--shape``; returns the exit code (1 without CUDA)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=_shape, action="append", required=True, help="B,H,N,CHUNK,TOPK (repeatable)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--backward", action="store_true", help="profile the backward launcher too")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=14, help="kernel table rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_forward needs a CUDA GPU")
        return 1
    for shape in args.shape:
        profile_shape(shape, args.head_dim, args.backward, args.reps, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
