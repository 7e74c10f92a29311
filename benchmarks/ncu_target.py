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
    """Parse ``--shape B,H,L,CHUNK,TOPK`` (and ``--head-dim``), run the launchers twice, profile the second run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", required=True, help="B,H,L,CHUNK,TOPK")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--deterministic", action="store_true")
    args = parser.parse_args()
    from moba_compile.kernels import moba_backward_triton, moba_forward_triton

    b, h, n, c, k = (int(x) for x in args.shape.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, key, val, d_out = (
        torch.randn(b, h, n, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4)
    )
    scale = 1.0 / math.sqrt(args.head_dim)
    for step in range(2):
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        out, lse = moba_forward_triton(q, key, val, c, k, scale)
        moba_backward_triton(d_out, q, key, val, out, lse, c, k, scale, deterministic=args.deterministic or None)
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
