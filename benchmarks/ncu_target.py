"""One MoBA forward + backward at a shape, with the CUDA profiler range around the second call: the target for Nsight
Compute (``ncu --profile-from-start off``), so compilation and warm-up launches stay out of the profile.

    ncu --profile-from-start off --clock-control none --kernel-name regex:_bwd_dkdv --section WarpStateStats \
        python -m benchmarks.ncu_target --shape 1,32,32768,2048,3
"""

from __future__ import annotations

import argparse
import math

import torch


def main() -> None:
    """Parse ``--shape B,H,L,CHUNK,TOPK`` (and ``--head-dim``, ``--kv-heads``, ``--forward-only``), run the launchers
    twice, profile the second run; ``--timeline`` instead prints the second run's GPU kernels by total time
    (torch.profiler), the per-kernel split of one call that Nsight Compute's one-launch reports do not give."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", required=True, help="B,H,L,CHUNK,TOPK")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default: H")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--forward-only", action="store_true", help="profile the forward alone")
    parser.add_argument("--timeline", action="store_true", help="print the kernels' times instead of ncu ranges")
    args = parser.parse_args()
    from moba_compile.kernels import moba_backward_triton, moba_forward_triton

    b, h, n, c, k = (int(x) for x in args.shape.split(","))
    hkv = args.kv_heads or h
    if h % hkv:
        parser.error(f"--kv-heads {hkv} must divide H={h}")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def draw(heads: int) -> torch.Tensor:
        return torch.randn(b, heads, n, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)

    q, key, val = draw(h), draw(hkv), draw(hkv)
    d_out = None if args.forward_only else draw(h)
    scale = 1.0 / math.sqrt(args.head_dim)

    def run() -> None:
        out, lse = moba_forward_triton(q, key, val, c, k, scale)
        if not args.forward_only:
            moba_backward_triton(d_out, q, key, val, out, lse, c, k, scale, deterministic=args.deterministic or None)
        torch.cuda.synchronize()

    run()
    if args.timeline:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
        totals: dict[str, list[float]] = {}
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                totals.setdefault(event.name, []).append(event.device_time_total / 1e3)
        print(f"shape B{b} Hq{h} Hkv{hkv} L{n} C{c} K{k} D{args.head_dim}; GPU kernels, ms (total, launches, max):")
        for name, times in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {sum(times):10.3f}  {len(times):4d}  {max(times):9.3f}  {name[:90]}")
        return
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    run()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
