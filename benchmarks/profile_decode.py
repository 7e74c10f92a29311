"""Profile decode steps of the end-to-end model (``attn_implementation="moba"`` with ``MobaCache``) on the GPU.

Prints the op-level and kernel-level time table of a few decode steps after a prefill, and which ``moba::attention``
paths ran (``ops.CALLS``): the diagnostic for a decode step slower than the kernel benchmark predicts.

    python -m benchmarks.profile_decode --context 131072 --steps 4
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.end_to_end import MODEL, POLICY, build, next_token


def main(argv: list[str] | None = None) -> int:
    """Prefill ``--context`` random tokens, then profile ``--steps`` greedy decode steps; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=25, help="table rows")
    parser.add_argument("--impl", choices=("moba", "sdpa"), default="moba", help="attention (sdpa: the dense model)")
    args = parser.parse_args(argv)
    from transformers import DynamicCache

    import moba_compile.hf
    from moba_compile import ops

    device = torch.device("cuda")
    model = build(MODEL, torch.bfloat16, device)
    moba_compile.hf.register(POLICY, name="moba")
    model.set_attn_implementation(args.impl)
    ids = torch.randint(0, MODEL["vocab_size"], (1, args.context), device=device)
    cache = moba_compile.hf.MobaCache() if args.impl == "moba" else DynamicCache()
    with torch.no_grad():
        nxt = next_token(model, ids, cache)
        for _ in range(2):  # warm-up steps: the mean tracks are built, the decode kernels compiled
            nxt = next_token(model, nxt, cache)
        torch.cuda.synchronize()
        ops.CALLS.clear()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                nxt = next_token(model, nxt, cache)
            torch.cuda.synchronize()
    print(f"{args.impl}: moba::attention paths:", dict(ops.CALLS))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
