"""Time the Triton forward's launch configurations on the GPU: the data behind ``forward._fwd_config``'s choices.

For each shape it times ``moba_forward_triton`` under every candidate configuration, with the per-kernel breakdown
(so the own-chunk and key-major kernels can be chosen separately from one sweep), and checks each output against the
first configuration's (a configuration that miscompiles is reported, not picked). Dense causal SDPA's forward is timed
in the same run for scale. Results go to one JSON file.

    python -m benchmarks.tune_forward --out-dir /tmp/out
    python -m benchmarks.tune_forward --shapes 8K-C512-K3 --configs 128,64,8,3/64,64,4,3

A configuration is ``block_m,block_n,warps,stages[,sp_block_m,sp_block_n,sp_warps,sp_stages[,sp_prefetch]]`` (the
fields of ``forward._FwdConfig``): four values set both kernels' tiles, eight set the own-chunk then the key-major
kernel's, a ninth (0/1) has the key-major kernel load the rows' running state before its key loop.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from benchmarks.attention import kernel_breakdown
from benchmarks.common import run_tiling_sweep, time_ms

# (name, B, H, L, chunk, topk[, mask]); mask "pad": a Hugging Face-style left-padding key mask (the first eighth of
# the keys masked for every query), which sends the launcher to its masked tiles.
SHAPES = {
    "8K-C512-K3": (1, 32, 8192, 512, 3),
    "32K-C2048-K3": (1, 32, 32768, 2048, 3),
    "FM-8K-C128-K8": (2, 16, 8192, 128, 8),
    "FM-32K-C128-K8": (2, 16, 32768, 128, 8),
    "64K-C4096-K12-H8": (1, 8, 65536, 4096, 12),
    "8K-C512-K3-pad": (1, 32, 8192, 512, 3, "pad"),
    "32K-C2048-K3-pad": (1, 32, 32768, 2048, 3, "pad"),
}
CONFIGS = [
    "128,64,8,3",
    "128,128,8,2",
    "128,32,8,3",
    "128,64,8,2",
    "128,64,8,4",
    "128,64,4,3",
    "64,64,4,3",
    "64,128,4,2",
    "64,128,4,3",
    "64,64,4,2",
    "64,32,4,3",
    "64,64,8,3",
]


def parse_tiling(text: str) -> Any:
    """A ``forward._FwdConfig`` from ``"m,n,w,s"`` (both kernels), ``"m,n,w,s,m,n,w,s"`` (own chunk, key-major) or
    the same with a ninth value, ``sp_prefetch``."""
    from moba_compile.kernels import forward

    values = [int(x) for x in text.split(",")]
    if len(values) not in (4, 8, 9):
        raise SystemExit(f"--configs: {text!r} needs 4, 8 or 9 comma-separated ints")
    return forward._FwdConfig(*values)  # absent key-major fields are 0: the own-chunk kernel's tiles


def padding_mask(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``[B, 1, 1, L]`` boolean key mask with the first ``L // 8`` keys masked (True = may attend), as a left-padded
    Hugging Face batch gives; the causal part stays the launcher's own."""
    return (torch.arange(length, device=device) >= length // 8).expand(batch, 1, 1, length)


def sweep_shape(shape: str, configs: list[str], device: torch.device, rep: int) -> dict[str, Any]:
    """Every configuration on one shape, timed and checked against the first configuration's output."""
    from moba_compile.kernels import forward

    b, h, n, chunk, topk, *rest = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, 128, device=device, generator=g, dtype=torch.bfloat16) for _ in range(3))
    scale = 1 / math.sqrt(128)
    mask = padding_mask(b, n, device) if rest == ["pad"] else None
    entry: dict[str, Any] = {"B": b, "H": h, "L": n, "chunk": chunk, "topk": topk, "mask": rest[0] if rest else None}
    entry["rows"] = []
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    entry["dense_forward_ms"] = time_ms(dense, device, 25, rep)
    ref = None
    for text in configs:
        cfg = parse_tiling(text)
        original = forward._fwd_config
        forward._fwd_config = lambda *a, _cfg=cfg, **kw: _cfg
        row: dict[str, Any] = {"config": text}
        try:

            def run() -> Any:
                return forward.moba_forward_triton(q, k, v, chunk, topk, scale, mask)

            out, lse = run()
            ref = (out, lse) if ref is None else ref
            row["out_rel_diff"] = ((out.float() - ref[0].float()).abs().max() / ref[0].float().abs().max()).item()
            live = torch.isfinite(ref[1])  # rows with no allowed key (masked padding) have lse = -inf on both sides
            row["lse_max_diff"] = (lse[live] - ref[1][live]).abs().max().item() if live.any() else 0.0
            row["empty_rows_equal"] = bool(torch.equal(torch.isinf(lse), ~live))
            row["forward_ms"] = time_ms(run, device, 25, rep)
            row["kernels_ms"] = kernel_breakdown(run, device)
        except Exception as exc:  # a configuration that does not compile (shared memory, registers) is data too
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            forward._fwd_config = original
        entry["rows"].append(row)
        kernels = {name[:18]: ms for name, ms in row.get("kernels_ms", {}).items() if "fwd_kernel" in name}
        print(
            f"{shape} {text:>24}: fwd={row.get('forward_ms', float('nan')):.4g} ms "
            + " ".join(f"{name}={ms:.4g}" for name, ms in kernels.items())
            + f" diff={row.get('out_rel_diff', float('nan')):.2g} {row.get('error', '')}",
            flush=True,
        )
    print(f"{shape}: dense forward {entry['dense_forward_ms']:.3f} ms", flush=True)
    return entry


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; returns the exit code."""

    def default() -> Any:
        from moba_compile.kernels import forward

        return forward._fwd_config(128, 128, torch.bfloat16, False)

    return run_tiling_sweep(
        argv, doc=__doc__, name="tune_forward", shapes=SHAPES, configs=CONFIGS, rep=100, default=default,
        sweep=sweep_shape,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
