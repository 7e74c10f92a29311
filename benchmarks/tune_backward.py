"""Time the Triton backward's launch configurations on the GPU: the data behind ``backward._bwd_config``'s choices.

For each shape it times ``moba_backward_triton`` in both modes (dQ by atomics; deterministic, dQ by separate kernels)
under every candidate configuration, checks each result against the current default's (so a configuration that
miscompiles is reported, not picked), and prints the per-kernel breakdown of the default configuration. Dense SDPA's
backward is timed in the same run for scale. Results go to one JSON file.

    python -m benchmarks.tune_backward --out-dir /tmp/out
    python -m benchmarks.tune_backward --shapes 8K-C512-K3 --configs 32,64,8,2/64,64,8,2

A configuration is ``kv_block_m,kv_block_n,kv_warps,kv_stages[,dq_block_m,dq_block_n,dq_warps,dq_stages]`` (the fields
of ``backward._BwdConfig``); missing dQ fields keep the default's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from benchmarks.attention import kernel_breakdown
from benchmarks.common import run_tiling_sweep, time_ms

# (name, B, H, L, chunk, topk)
SHAPES = {
    "8K-C512-K3": (1, 32, 8192, 512, 3),
    "32K-C2048-K3": (1, 32, 32768, 2048, 3),
    "FM-8K-C128-K8": (2, 16, 8192, 128, 8),
    "64K-C4096-K12-H8": (1, 8, 65536, 4096, 12),
    # Long chunk lists: the spec shape where the backward is slower than dense (Nsight: the dK/dV kernel's spills).
    "128K-C4096-K12": (1, 32, 131072, 4096, 12),
    "FM-64K-C128-K8": (2, 16, 65536, 128, 8),
}
CONFIGS = [
    "32,64,8,2",
    "32,64,8,3",
    "32,64,4,2",
    "64,64,8,2",
    "32,128,8,2",
    "64,32,4,2",
    "16,64,4,2",
    "32,64,8,2,64,64,4,2",
    "32,64,8,2,128,32,8,2",
    "32,64,8,2,128,64,8,3",
    "32,64,8,2,64,128,8,2",
]


def parse_config(text: str, default: Any) -> Any:
    """A ``_BwdConfig`` from ``"m,n,w,s[,m,n,w,s]"``; absent dQ fields keep ``default``'s."""
    values = [int(x) for x in text.split(",")]
    if len(values) not in (4, 8):
        raise SystemExit(f"--configs: {text!r} needs 4 or 8 comma-separated ints")
    fields = [f.name for f in dataclasses.fields(default)]
    return dataclasses.replace(default, **dict(zip(fields, values)))


def sweep_shape(shape: str, configs: list[str], base_config: Any, device: torch.device, rep: int) -> dict[str, Any]:
    """Every configuration on one shape: both modes timed, checked against the first configuration's gradients."""
    from moba_compile.kernels import backward, moba_forward_triton

    b, h, n, chunk, topk = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(b, h, n, 128, device=device, generator=g, dtype=torch.bfloat16) for _ in range(4))
    scale = 1 / math.sqrt(128)
    out, lse = moba_forward_triton(q, k, v, chunk, topk, scale)
    entry: dict[str, Any] = {"B": b, "H": h, "L": n, "chunk": chunk, "topk": topk, "rows": []}
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    dense_out = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
    entry["dense_backward_ms"] = time_ms(
        lambda: torch.autograd.grad(dense_out, (qd, kd, vd), do, retain_graph=True), device, 25, rep
    )
    ref = None
    for text in configs:
        cfg = parse_config(text, base_config)
        original = backward._bwd_config
        backward._bwd_config = lambda *a, _cfg=cfg, **kw: _cfg
        row: dict[str, Any] = {"config": text}
        try:
            for det in (False, True):

                def run(det: bool = det) -> Any:
                    return backward.moba_backward_triton(do, q, k, v, out, lse, chunk, topk, scale, deterministic=det)

                grads = run()
                ref = grads if ref is None else ref
                key = "det" if det else "atomic"
                row[f"{key}_rel_diff"] = max(
                    ((a.float() - r.float()).abs().max() / r.float().abs().max()).item() for a, r in zip(grads, ref)
                )
                row[f"{key}_ms"] = time_ms(run, device, 25, rep)
                if text == configs[0]:
                    row[f"{key}_kernels_ms"] = kernel_breakdown(run, device)
        except Exception as exc:  # a configuration that does not compile (shared memory, registers) is data too
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            backward._bwd_config = original
        entry["rows"].append(row)
        shown = {k2: v2 for k2, v2 in row.items() if k2 != "config" and not k2.endswith("kernels_ms")}
        print(
            f"{shape} {text:>24}: "
            + ", ".join(f"{k2}={v2:.4g}" if isinstance(v2, float) else f"{k2}={v2}" for k2, v2 in shown.items()),
            flush=True,
        )
        for key in ("atomic_kernels_ms", "det_kernels_ms"):
            if key in row:
                print(f"    {key}: " + ", ".join(f"{name[:40]}={ms:.2f}" for name, ms in list(row[key].items())[:8]))
    print(f"{shape}: dense backward {entry['dense_backward_ms']:.3f} ms", flush=True)
    return entry


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; returns the exit code."""

    def default() -> Any:
        from moba_compile.kernels import backward

        return backward._bwd_config(128, 128, torch.bfloat16, False)

    def sweep(shape: str, configs: list[str], device: torch.device, rep: int) -> dict[str, Any]:
        return sweep_shape(shape, configs, default(), device, rep)

    return run_tiling_sweep(
        argv, doc=__doc__, name="tune_backward", shapes=SHAPES, configs=CONFIGS, rep=200, default=default, sweep=sweep
    )


if __name__ == "__main__":
    raise SystemExit(main())
