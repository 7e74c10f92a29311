"""Time the fused gate's launch configurations on the GPU: the data behind ``gating._gate_config``'s choice.

For each shape it times the gate kernel alone (``gating._launch_gate`` on precomputed chunk means, slot-major output,
as the forward and the backward call it) under every candidate configuration, and compares each selection with the
first configuration's (the gate is exact, so a configuration whose selection differs beyond near-ties in fp32 is
reported, not picked). Dense causal SDPA's forward is timed in the same run for scale. Results go to one JSON file.

    python -m benchmarks.tune_gate --out-dir /tmp/out
    python -m benchmarks.tune_gate --shapes FM-8K-C128-K8 --configs 64,64,4,2/128,64,8,2

A configuration is ``block_m,block_c,warps,stages`` (the fields of ``gating._GateConfig`` but ``top``, which the
launcher derives from ``K``). As in the launcher, ``block_c`` is cut to the chunk count (rounded up to a power of two,
at least 16 and ``top``); each row records the tiles that ran (``effective``). The first H200 run (2026-12-01) did not
cut it: its rows for the spec shapes (16-32 chunks) scored padding, and none of them is the launcher's tiling there.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import run_tiling_sweep, time_ms

# (B, H, L, chunk, topk)
SHAPES = {
    "FM-8K-C128-K8": (2, 16, 8192, 128, 8),
    "FM-32K-C128-K8": (2, 16, 32768, 128, 8),
    "FM-128K-C128-K8": (2, 16, 131072, 128, 8),
    "32K-C2048-K3": (1, 32, 32768, 2048, 3),
    "128K-C4096-K12": (1, 32, 131072, 4096, 12),
}
CONFIGS = [
    "64,64,4,2",
    "64,64,8,2",
    "64,64,8,1",
    "64,64,8,3",
    "128,64,8,2",
    "128,64,8,1",
    "64,32,4,2",
    "64,32,8,2",
    "128,32,8,2",
    "64,128,8,2",
    "128,128,8,2",
    "64,64,4,3",
    "32,64,4,2",
]


def parse_gate_config(text: str, top: int, n_chunks: int) -> Any:
    """A ``gating._GateConfig`` from ``"block_m,block_c,warps,stages"``, the launcher's ``top`` and the chunk count
    (``block_c`` cut to it as the launcher cuts its own)."""
    from moba_compile.kernels import gating

    values = [int(x) for x in text.split(",")]
    if len(values) != 4:
        raise SystemExit(f"--configs: {text!r} needs 4 comma-separated ints")
    block_m, block_c, warps, stages = values
    block_c = max(16, top, min(block_c, gating.next_pow2(n_chunks)))
    return gating._GateConfig(block_m, block_c, top, warps, stages)


def sweep_shape(shape: str, configs: list[str], device: torch.device, rep: int) -> dict[str, Any]:
    """Every configuration on one shape, timed and checked against the first configuration's selection."""
    from moba_compile.kernels import gating

    b, h, n, chunk, topk = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, 128, device=device, generator=g, dtype=torch.bfloat16) for _ in range(3))
    km1 = min(topk - 1, (n - 1) // chunk)
    means = gating.chunk_means_triton(k, chunk)
    entry: dict[str, Any] = {"B": b, "H": h, "L": n, "chunk": chunk, "topk": topk, "rows": []}
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    entry["dense_forward_ms"] = time_ms(dense, device, 25, rep)
    top = gating._gate_config(128, means.shape[2], km1).top
    ref = None
    for text in configs:
        cfg = parse_gate_config(text, top, means.shape[2])
        original = gating._gate_config
        gating._gate_config = lambda *a, _cfg=cfg, **kw: _cfg
        row: dict[str, Any] = {
            "config": text,
            "effective": f"{cfg.block_m},{cfg.block_c},{cfg.num_warps},{cfg.num_stages}",
        }
        try:

            def run() -> Any:
                return gating._launch_gate(q, means, chunk, km1, n, slot_major=True)

            sel = run()
            ref = sel if ref is None else ref
            # Rows (over all heads) whose chosen chunk list is identical to the first configuration's.
            row["rows_equal_fraction"] = (sel == ref).all(0).double().mean().item()
            row["gate_ms"] = time_ms(run, device, 25, rep)
        except Exception as exc:  # a configuration that does not compile (shared memory, registers) is data too
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            gating._gate_config = original
        entry["rows"].append(row)
        print(
            f"{shape} {text:>12} ({row['effective']}): gate={row.get('gate_ms', float('nan')):.4g} ms "
            f"equal={row.get('rows_equal_fraction', float('nan')):.6f} {row.get('error', '')}",
            flush=True,
        )
    print(f"{shape}: dense forward {entry['dense_forward_ms']:.3f} ms", flush=True)
    return entry


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; returns the exit code."""

    def default() -> Any:
        from moba_compile.kernels import gating

        return gating._gate_config(128, 64, 7)

    return run_tiling_sweep(
        argv, doc=__doc__, name="tune_gate", shapes=SHAPES, configs=CONFIGS, rep=100, default=default,
        sweep=sweep_shape,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
