"""MoBA decode benchmark: one decode step of the Triton kernel against dense SDPA decode and the read-bandwidth bound.

Usage (a CUDA GPU is needed for real numbers)::

    python -m benchmarks.decode                      # B=1, Hq=32, Hkv=8, D=128, chunk 4096, top-12, 128K..1M, bf16
    python -m benchmarks.decode --contexts 131072,1048576 --rep 200
    python -m benchmarks.decode --dry-run            # print the plan (shapes, bytes, memory); no GPU needed
    python -m benchmarks.decode --compile-check      # compile every decode kernel for sm_90 without a GPU:
                                                     # registers, spills, shared memory
    python -m benchmarks.decode --smoke              # tiny shapes on the CPU through the Triton interpreter: checks
                                                     # the script end to end; its timings mean nothing, nothing saved

Per context length ``Lk`` (the query sits at position ``Lk - 1``), in one process:

- ``moba_ms``: :func:`moba_decode_triton` with the chunk means precomputed (what a KV cache keeps), gate included;
- ``moba_static_ms``: the static-cache form of the same step (:func:`moba_decode_static_triton`, the length a device
  tensor); ``moba_static_graph_ms`` (CUDA): one graph-safe step (means update + ``ops.static_decode``) captured in a
  CUDA graph, replayed (checked equal to the eager step first);
- ``gate_ms``: the gate alone (:func:`decode_select_chunks_triton` with the means);
- ``moba_no_means_ms``: the step with ``means=None`` (the means recomputed: an O(Lk) read, for reference);
- ``dense_ms``: ``F.scaled_dot_product_attention`` with ``Lq = 1`` over the whole cache, ``enable_gqa=True``, with
  PyTorch's default backend choice; ``dense_<backend>_ms`` per SDPA backend that accepts the call; ``dense_best_ms``
  the fastest of them (the baseline of ``speedup_vs_dense``, so the speed-up is never flattered by a slow backend);
- ``moba_bytes``: what the step must read, from this run's actual selection: the earlier chunks' means (fp32), the
  union over each GQA group of its heads' selected chunks (keys + values), the own chunk, the query;
  ``moba_bytes_per_head`` counts the selected chunks per query head instead (a kernel without GQA sharing);
- ``read_gbps``: a read-only probe, a sum over a multi-GB fp32 tensor (``--probe-gib``, default 4): bytes read /
  time, the rate a read-only kernel can reach; ``bound_ms`` = ``moba_bytes`` at that rate; ``ratio_to_bound =
  moba_ms / bound_ms``. The device-to-device copy of earlier runs is still measured and recorded (``copy_read_gbps``,
  bytes read / time, and ``copy_traffic_gbps``, read + written) but bounds nothing: half a copy's traffic is not a
  read rate (on the H200 it made the bound ~1.6x too loose, and reported the kernel at 0.61x "of the bound").

Targets (for the record): at 1M tokens the MoBA step >= 4x faster than dense SDPA decode, and within 1.3x of
``bound_ms``. Random inputs make the gate's choices nearly independent across the heads of a group, so the union
of a group's chunks is near its maximum (``G * (K - 1)``) and this is the hard case for GQA sharing.

Timings are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). Results: a table on
stdout, ``benchmarks/results/decode-<gpu>-<date>.json`` (GPU, torch/triton/CUDA versions, every shape and number;
``null`` plus an ``errors`` entry where a measurement failed or was skipped), and a PNG next to it when matplotlib
is installed. Nothing is estimated in place of a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    RESULTS_DIR,
    GiB,
    bench_device,
    compile_variants,
    environment,
    field_recorder,
    fmt_or_dash,
    print_compile_records,
    release,
    require_compiled_kernels,
    results_path,
    time_ms,
)

DEFAULT_CONTEXTS = (131072, 262144, 524288, 1048576)


@dataclass(frozen=True)
class DecodeConfig:
    """One decode shape: the query at position ``context - 1`` over a cache of ``context`` keys."""

    batch: int
    heads_q: int
    heads_kv: int
    head_dim: int
    context: int
    chunk_size: int
    topk: int

    @property
    def name(self) -> str:
        n = self.context
        size = f"{n // 1024}K" if n % 1024 == 0 else str(n)
        return (
            f"B{self.batch}-Hq{self.heads_q}-Hkv{self.heads_kv}-D{self.head_dim}-L{size}-C{self.chunk_size}"
            f"-K{self.topk}"
        )

    @property
    def n_prev(self) -> int:
        """Chunks strictly before the query's own chunk."""
        return (self.context - 1) // self.chunk_size

    @property
    def own_len(self) -> int:
        return self.context - self.n_prev * self.chunk_size


# --------------------------------------------------------------------------------------------------------------------
# Byte accounting
# --------------------------------------------------------------------------------------------------------------------
def step_bytes(cfg: DecodeConfig, sel: torch.Tensor | None, elt: int) -> dict[str, int]:
    """Bytes one MoBA decode step must read, from the gate's selection ``sel int [B, Hq, K-1]`` (``-1`` unused).

    ``None`` for ``sel`` assumes the worst case for GQA sharing: every group's heads choose disjoint chunks.
    """
    b, hkv, d, c = cfg.batch, cfg.heads_kv, cfg.head_dim, cfg.chunk_size
    group = cfg.heads_q // hkv
    km1 = min(cfg.topk - 1, cfg.n_prev)
    chunk_kv = c * 2 * d * elt  # keys + values of one chunk of one key head
    if sel is None:
        union = b * hkv * min(cfg.n_prev, group * km1)
        per_head = b * cfg.heads_q * km1
    else:
        s = sel.long().view(b, hkv, -1).cpu()
        union = sum(len({int(x) for x in s[i, h].tolist() if x >= 0}) for i in range(b) for h in range(hkv))
        per_head = int((sel >= 0).sum())
    means = b * hkv * cfg.n_prev * d * 4
    own = b * hkv * cfg.own_len * 2 * d * elt
    query = b * cfg.heads_q * d * elt
    return {
        "selected_chunks_union": union,
        "selected_chunks_per_head": per_head,
        "means_bytes": means,
        "own_bytes": own,
        "selected_bytes": union * chunk_kv,
        "moba_bytes": means + own + query + union * chunk_kv,
        "moba_bytes_per_head": means + own + query + per_head * chunk_kv,
        "dense_bytes": b * hkv * cfg.context * 2 * d * elt + query,
    }


def cache_gib(cfg: DecodeConfig, elt: int) -> float:
    """GiB of the key/value cache of one configuration."""
    return cfg.batch * cfg.heads_kv * cfg.context * 2 * cfg.head_dim * elt / GiB


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------
def read_bandwidth(device: torch.device, n_bytes: int, warmup: int, rep: int) -> dict[str, float]:
    """A read-only probe: ``torch.sum`` over ``n_bytes`` of fp32 (one read of every byte, a scalar written):
    ``{"read_probe_ms", "read_probe_bytes", "read_gbps"}`` (GB = 1e9). The bound of a decode step, which reads its
    keys, values and means and writes a few KB."""
    x = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    x.fill_(1.0)
    ms = time_ms(lambda: x.sum(), device, warmup, rep)
    return {"read_probe_ms": ms, "read_probe_bytes": float(x.numel() * 4), "read_gbps": x.numel() * 4 / ms / 1e6}


def copy_bandwidth(device: torch.device, n_bytes: int, warmup: int, rep: int) -> dict[str, float]:
    """A device-to-device copy of ``n_bytes``: ``{"copy_ms", "copy_read_gbps", "copy_traffic_gbps"}`` (GB = 1e9)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup, rep)
    return {"copy_ms": ms, "copy_read_gbps": n_bytes / ms / 1e6, "copy_traffic_gbps": 2 * n_bytes / ms / 1e6}


# --------------------------------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------------------------------
def _sdpa_backends() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def _static_step_ms(q, key, val, means, c, k, scale, device, args) -> float:
    """The static-cache kernel (length a device tensor, the whole cache as its buffer): the same work as moba_ms."""
    from moba_compile.kernels.decode import moba_decode_static_triton

    length = torch.full((key.shape[0],), key.shape[2], dtype=torch.int64, device=device)
    step = lambda: moba_decode_static_triton(q, key, val, means, length, c, k, scale)  # noqa: E731
    return time_ms(step, device, args.warmup, args.rep)


def _static_graph_ms(q, key, val, means, c, k, scale, device, args) -> float:
    """One graph-safe decode step as a captured CUDA graph replays it: the means update for the step's key
    (``ops.update_static_chunk_means_``, a gather of one chunk and its mean) plus ``ops.static_decode``. Checked
    against the same calls run eagerly before it is timed."""
    from moba_compile import ops

    length = torch.full((key.shape[0],), key.shape[2], dtype=torch.int64, device=device)
    buf = means.clone()

    def body() -> torch.Tensor:
        ops.update_static_chunk_means_(buf, key, length, new_tokens=1, chunk_size=c, impl="triton")
        return ops.static_decode(
            q, key, val, chunk_means=buf, length=length, chunk_size=c, topk=k, scale=scale, impl="triton"
        )

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # Triton compiles and autotunes outside the capture
        eager = [body() for _ in range(3)][-1]
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = body()
    graph.replay()
    torch.cuda.synchronize(device)
    if not torch.equal(captured, eager):
        raise RuntimeError("the captured step's output differs from the eager step's")
    return time_ms(graph.replay, device, args.warmup, args.rep)


def run_config(cfg: DecodeConfig, args: argparse.Namespace, device: torch.device, bw: dict[str, float]) -> dict:
    """Measure one configuration; failures (OOM, compile errors) are recorded in ``errors``, never papered over."""
    from torch.nn.attention import sdpa_kernel

    from moba_compile import reference
    from moba_compile.kernels import decode as dk
    from moba_compile.kernels.decode import decode_chunk_means, decode_select_chunks_triton, moba_decode_triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    elt = 2
    row: dict[str, Any] = {**asdict(cfg), "name": cfg.name, "dtype": args.dtype, "errors": {}}
    b, hq, hkv, d, lk, c, k = (cfg.batch, cfg.heads_q, cfg.heads_kv, cfg.head_dim, cfg.context, cfg.chunk_size,
                               cfg.topk)  # fmt: skip
    need = cache_gib(cfg, elt) * 1.3 + 0.5  # cache + means + partials + the SDPA workspace, with headroom
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] / GiB
        if need > free:
            row["errors"]["all"] = f"skipped: needs ~{need:.1f} GiB, {free:.1f} GiB free"
            return row
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype, generator=gen)
    key = torch.randn(b, hkv, lk, d, device=device, dtype=dtype, generator=gen)
    val = torch.randn(b, hkv, lk, d, device=device, dtype=dtype, generator=gen)
    scale = 1.0 / math.sqrt(d)

    record = field_recorder(row, None)

    held: dict[str, torch.Tensor] = {}

    def make_means() -> float:
        held["means"] = decode_chunk_means(key, c)
        return time_ms(lambda: decode_chunk_means(key, c), device, args.warmup, args.rep)

    record("means_all_chunks_ms", make_means)
    means = held.get("means")

    def gate() -> float:
        held["sel"] = decode_select_chunks_triton(q, key, c, k, means=means)
        return time_ms(lambda: decode_select_chunks_triton(q, key, c, k, means=means), device, args.warmup, args.rep)

    if means is not None:
        record("gate_ms", gate)
        step = lambda: moba_decode_triton(q, key, val, c, k, scale, means=means)  # noqa: E731
        record("moba_ms", lambda: time_ms(step, device, args.warmup, args.rep))
        record("moba_static_ms", lambda: _static_step_ms(q, key, val, means, c, k, scale, device, args))
        if device.type == "cuda":
            record("moba_static_graph_ms", lambda: _static_graph_ms(q, key, val, means, c, k, scale, device, args))
    no_means = lambda: moba_decode_triton(q, key, val, c, k, scale)  # noqa: E731
    record("moba_no_means_ms", lambda: time_ms(no_means, device, args.warmup, args.rep))

    dense = lambda: F.scaled_dot_product_attention(q, key, val, scale=scale, enable_gqa=True)  # noqa: E731
    record("dense_ms", lambda: time_ms(dense, device, args.warmup, args.rep))
    dense_times = [row["dense_ms"]] if row.get("dense_ms") else []
    if device.type == "cuda":
        for name, backend in _sdpa_backends().items():

            def one(backend: Any = backend) -> float:
                with sdpa_kernel(backend):
                    dense()
                    return time_ms(dense, device, args.warmup, args.rep)

            record(f"dense_{name}_ms", one)
            if row.get(f"dense_{name}_ms"):
                dense_times.append(row[f"dense_{name}_ms"])
    row["dense_best_ms"] = min(dense_times) if dense_times else None

    # Bytes and bounds from this run's selection (the worst case for GQA sharing if the gate failed, and said so).
    row.update(step_bytes(cfg, held.get("sel"), elt))
    row["bytes_from"] = "gate selection of this run" if "sel" in held else "worst case: no selection was measured"
    # The launch plan the step ran with (what the launchers chose for this device), for reading the numbers.
    _, gb, block_g = dk._rows(hq // hkv)
    km1 = min(k - 1, cfg.n_prev)
    row["attn_plan"] = asdict(dk._attn_plan(b * hkv * gb * ((hq // hkv // gb) * km1 + 1), c, d, d, dtype, device))
    row["gate_plan"] = asdict(dk._gate_plan(b * hkv * gb, block_g, cfg.n_prev, km1, device)) if km1 else None
    row.update(bw)
    rate = bw["read_gbps"] * 1e6  # bytes per ms, of the read-only probe
    row["bound_ms"] = row["moba_bytes"] / rate
    row["dense_bound_ms"] = row["dense_bytes"] / rate
    moba = row.get("moba_ms")
    row["ratio_to_bound"] = moba / row["bound_ms"] if moba else None
    row["speedup_vs_dense"] = row["dense_best_ms"] / moba if moba and row["dense_best_ms"] else None
    row["achieved_read_gbps"] = row["moba_bytes"] / moba / 1e6 if moba else None

    # Correctness spot check against the reference (it materialises fp32 copies of the cache: short contexts only).
    if lk <= args.check_max_len and moba:

        def check() -> dict[str, Any]:
            out, lse = moba_decode_triton(q, key, val, c, k, scale, means=means)
            ref_out, ref_lse = reference.moba_attention_forward(q, key, val, chunk_size=c, topk=k, scale=scale)
            ref_sel = reference.select_chunks(q, key, chunk_size=c, topk=k)[:, :, 0]
            same = (held["sel"].long().sort(-1).values == ref_sel.sort(-1).values).all(-1)
            return {
                "max_abs_err_vs_reference": (out.float() - ref_out.float()).abs().max().item(),
                "max_lse_err_vs_reference": (lse - ref_lse).abs().max().item(),
                "gate_rows_equal_fraction": same.float().mean().item(),
            }

        record("check", check)
    held.clear()
    release(device)  # the cache tensors die with this frame
    return row


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------
def print_table(rows: list[dict[str, Any]]) -> None:
    """The results as a fixed-width table on stdout."""
    head = (
        f"{'config':<40} {'moba':>8} {'static':>8} {'graph':>8} {'gate':>7} {'noMeans':>8} {'dense':>8} {'bound':>7} "
        f"{'moba/bnd':>8} "
        f"{'dense/moba':>10} {'MB read':>8} {'chunks':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = [
            fmt_or_dash(r.get("moba_ms")).rjust(8),
            fmt_or_dash(r.get("moba_static_ms")).rjust(8),
            fmt_or_dash(r.get("moba_static_graph_ms")).rjust(8),
            fmt_or_dash(r.get("gate_ms")).rjust(7),
            fmt_or_dash(r.get("moba_no_means_ms")).rjust(8),
            fmt_or_dash(r.get("dense_best_ms")).rjust(8),
            fmt_or_dash(r.get("bound_ms")).rjust(7),
            fmt_or_dash(r.get("ratio_to_bound"), ".2f").rjust(8),
            fmt_or_dash(r.get("speedup_vs_dense"), ".2f").rjust(10),
            fmt_or_dash(r["moba_bytes"] / 1e6 if r.get("moba_bytes") else None, ".1f").rjust(8),
            str(r.get("selected_chunks_union", "-")).rjust(7),
        ]
        print(f"{r['name']:<40} " + " ".join(cells))
        for field, err in r.get("errors", {}).items():
            print(f"    {field}: {err}")
    print(
        "ms are medians; static = the static-cache kernel (length on the device); graph = a captured CUDA graph of "
        "the static step with its means update; dense = fastest SDPA backend (Lq=1, enable_gqa); bound = bytes the "
        "step must read at the read-only probe's rate; chunks = selected chunks read (union per GQA group, summed)"
    )


def write_results(rows: list[dict[str, Any]], env: dict[str, Any], out_dir: Path, plot_png: bool) -> Path:
    """Write the JSON (and a PNG when asked and matplotlib is available); returns the JSON path."""
    path = results_path(out_dir, "decode", env)
    payload = {
        "benchmark": "moba decode step (benchmarks/decode.py)",
        "timing": "median of triton.testing.do_bench (CUDA events, L2 flushed), milliseconds",
        "bytes": "moba_bytes = means (fp32) + union per GQA group of selected chunks (K+V) + own chunk + query",
        "bound": "bound_ms = moba_bytes / (bytes read per ms of a read-only probe, torch.sum over read_probe_bytes "
        "of fp32, in the same run); the copy's rates are recorded, not used",
        "targets": {"speedup_vs_dense_at_1M": ">= 4", "ratio_to_bound": "<= 1.3"},
        "environment": env,
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2, default=str))
    if plot_png:
        plot(rows, env, path.with_suffix(".png"))
    return path


def plot(rows: list[dict[str, Any]], env: dict[str, Any], path: Path) -> None:
    """Step time against context: MoBA, gate, dense SDPA and the read-bandwidth bound (log-log). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    for field in ("moba_ms", "gate_ms", "dense_best_ms", "bound_ms", "moba_no_means_ms"):
        pts = [(r["context"], r[field]) for r in rows if r.get(field)]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=field.removesuffix("_ms"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (keys in the cache)")
    ax.set_ylabel("ms per decode step")
    if rows:
        r0 = rows[0]
        ax.set_title(
            f"MoBA decode B={r0['batch']} Hq={r0['heads_q']} Hkv={r0['heads_kv']} D={r0['head_dim']} "
            f"C={r0['chunk_size']} K={r0['topk']}"
        )
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.suptitle(f"{env.get('gpu') or env.get('device')} - torch {env['torch']} - triton {env.get('triton')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (no GPU needed)
# --------------------------------------------------------------------------------------------------------------------
_DIV16 = {"sqb", "sqh", "skb", "skh", "skn", "svb", "svh", "svn", "smb", "smc", "C", "PIECE"}


def compile_check(arch: int = 90, prefix: str | None = None) -> list[dict[str, Any]]:
    """Compile every decode kernel at the launchers' CUDA configurations for ``sm_<arch>``.

    Runs on a machine without a GPU (Triton's bundled compiler and ptxas); must not run under TRITON_INTERPRET.
    ``prefix`` keeps only the variants whose name starts with it (e.g. ``"dense_"``, the dense decode's kernels).
    Returns one record per variant: name, config, shared memory, registers, spill bytes (``None`` without ptxas).
    """
    require_compiled_kernels()
    from moba_compile.kernels import decode as dk

    cpu = torch.device("cpu")  # the plans only read the device to count SMs; 132 is the H100's
    variants: list[tuple[str, Any, dict[str, str], dict[str, Any], int, int]] = []
    for d in (64, 128):
        variants.append((f"means-D{d}", dk._decode_means_kernel, {"k_ptr": "*bf16", "means_ptr": "*fp32"},
                         {"HEAD_D": d, "BLOCK_N": 64, "skd": 1}, 4, 2))  # fmt: skip
    for group, km1 in ((4, 11), (8, 63), (1, 1), (64, 11)):
        _, _, block_g = dk._rows(group)
        g = dk._gate_plan(8, block_g, 4096, km1, cpu)
        # Group routing (GROUP) only where a group has several heads; its split and static forms share the code.
        modes = ((True, False, False), (False, False, False), (True, True, False))
        modes += ((True, False, True), (False, True, True)) if group > 1 else ()
        for final, dev_len, grouped in modes:
            consts = {"HEAD_D": 128, "BLOCK_G": block_g, "BLOCK_C": g.block_c, "TOP": g.top, "FINAL": final,
                      "DEV_LEN": dev_len, "GROUP": grouped, "sqd": 1, "smd": 1}  # fmt: skip
            ptrs = {"q_ptr": "*bf16", "means_ptr": "*fp32", "out_ptr": "*i32" if final else "*i64",
                    "len_ptr": "*i64"}  # fmt: skip
            tag = ("final" if final else "split") + ("-static" if dev_len else "") + ("-group" if grouped else "")
            variants.append((f"gate-G{group}-K{km1 + 1}-{tag}", dk._decode_gate_kernel, ptrs, consts, g.num_warps, 1))
        merge_ptrs = {"cand_ptr": "*i64", "sel_ptr": "*i32"}
        merge_consts = {"BLOCK_G": block_g, "TOP": g.top}
        variants.append(
            (f"gate_merge-G{group}-K{km1 + 1}", dk._decode_gate_merge_kernel, merge_ptrs, merge_consts, 4, 1)
        )
    for dtype in ("bf16", "fp16", "fp32"):
        tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        for d in (64, 128):
            for group, km1 in ((4, 11), (8, 63)):
                for has_mask, mask_heads, dev_len in (
                    (False, False, False), (True, False, False), (True, True, False), (False, False, True),
                    (True, False, True),
                ):  # fmt: skip
                    if dtype != "bf16" and (group != 4 or has_mask or dev_len):
                        continue
                    _, _, block_g = dk._rows(group)
                    plan = dk._attn_plan(8 * (group * km1 + 1), 4096, d, d, tdtype, cpu)
                    consts = {"HEAD_D": d, "HEAD_DV": d, "BLOCK_G": block_g, "BLOCK_N": plan.block_n,
                              "TOPP": max(2, dk.next_pow2(km1)), "HAS_MASK": has_mask, "MASK_HEADS": mask_heads,
                              "UPCAST": False, "DOT_PREC": dk.dot_precision(tdtype), "DEV_LEN": dev_len,
                              "SHARED": False, "sqd": 1, "skd": 1, "svd": 1}  # fmt: skip
                    ptrs = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "mask_ptr": "*u8",
                            "po_ptr": "*fp32", "plse_ptr": "*fp32", "len_ptr": "*i64"}  # fmt: skip
                    tag = ("headmask" if mask_heads else "mask") if has_mask else "nomask"
                    tag += "-static" if dev_len else ""
                    name = f"attn-{dtype}-D{d}-G{group}-K{km1 + 1}-{tag}"
                    variants.append((name, dk._decode_attn_kernel, ptrs, consts, plan.num_warps, plan.num_stages))
                    if not mask_heads:  # dense decode (moba::dense_decode): one work item per chunk for the group
                        shared = {**consts, "SHARED": True}
                        variants.append((f"dense_{name}", dk._decode_attn_kernel, ptrs, shared, plan.num_warps,
                                         plan.num_stages))  # fmt: skip
    for dv in (64, 128):
        for dev_len in (False, True):
            variants.append((f"combine-Dv{dv}" + ("-static" if dev_len else ""), dk._decode_combine_kernel,
                             {"po_ptr": "*fp32", "plse_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32",
                              "len_ptr": "*i64"},
                             {"HEAD_DV": dv, "BLOCK_F": 64, "DEV_LEN": dev_len}, 4, 1))  # fmt: skip
    for d in (64, 128):  # the static cache's means update: the completed chunks averaged in place, one launch
        variants.append((f"static_means-D{d}", dk._static_step_means_kernel,
                         {"k_ptr": "*bf16", "len_ptr": "*i64", "means_ptr": "*fp32"},
                         {"HEAD_D": d, "BLOCK_N": 64, "skd": 1, "smd": 1}, dk.MEANS_NUM_WARPS,
                         dk.MEANS_NUM_STAGES))  # fmt: skip
    for final in (True, False):  # a static cache's length from the step's mask (one block, or blocks + merge)
        variants.append((f"static_length-{'final' if final else 'blocks'}", dk._static_length_kernel,
                         {"mask_ptr": "*u8", "part_ptr": "*i64" if final else "*i32", "out_ptr": "*i64"},
                         {"BLOCK": dk._LENGTH_BLOCK, "FINAL": final, "smn": 1}, 4, 1))  # fmt: skip
    variants.append(("static_length_merge", dk._static_length_merge_kernel, {"part_ptr": "*i32", "out_ptr": "*i64"},
                     {"BLOCK": dk._LENGTH_MERGE_BLOCK}, 4, 1))  # fmt: skip
    if prefix is not None:
        variants = [v for v in variants if v[0].startswith(prefix)]
    return compile_variants(variants, arch, _DIV16, error_chars=400)


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------
def _contexts(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        mult = {"K": 1024, "M": 1 << 20}.get(part[-1:], 1)
        out.append(int(part[:-1] if mult > 1 else part) * mult)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.decode",
        description="Benchmark one MoBA decode step (Triton) against dense SDPA decode and the read-bandwidth bound.",
    )
    p.add_argument("--contexts", type=_contexts, default=list(DEFAULT_CONTEXTS), help="e.g. 128K,256K,1M")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads-q", type=int, default=32)
    p.add_argument("--heads-kv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--topk", type=int, default=12, help="chunks per query, own chunk included")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--probe-gib", type=float, default=4.0, help="size of the read-only bandwidth probe, GiB")
    p.add_argument("--copy-gib", type=float, default=2.0, help="size of the (recorded, not used) copy probe, GiB")
    p.add_argument("--check-max-len", type=int, default=262144, help="compare with the reference up to this context")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup budget, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measurement budget, ms")
    p.add_argument("--out-dir", type=Path, default=None, help=f"where to write JSON/PNG (default {RESULTS_DIR})")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--dry-run", action="store_true", help="print the plan (shapes, bytes, memory) and exit; no GPU")
    p.add_argument(
        "--compile-check",
        action="store_true",
        help="compile every decode kernel for sm_90 (H100) without a GPU, print registers/spills; exit 1 on failure",
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU via TRITON_INTERPRET=1; writes only to --out-dir"
    )
    return p.parse_args(argv)


def select_configs(args: argparse.Namespace) -> list[DecodeConfig]:
    """The configurations to run (``--smoke``: tiny CPU shapes)."""
    if args.smoke:
        return [DecodeConfig(1, 4, 2, 64, n, 16, 3) for n in (100, 257)]
    return [
        DecodeConfig(args.batch, args.heads_q, args.heads_kv, args.head_dim, n, args.chunk_size, args.topk)
        for n in args.contexts
    ]


def dry_run(configs: list[DecodeConfig]) -> None:
    """Print shapes, worst-case bytes per step and cache sizes; measures nothing."""
    print(f"{'config':<40} {'prev chunks':>11} {'cache GiB':>9} {'MoBA MB (max)':>13} {'dense MB':>9} {'ratio':>6}")
    for cfg in configs:
        byt = step_bytes(cfg, None, 2)
        print(
            f"{cfg.name:<40} {cfg.n_prev:>11} {cache_gib(cfg, 2):>9.2f} {byt['moba_bytes'] / 1e6:>13.1f} "
            f"{byt['dense_bytes'] / 1e6:>9.1f} {byt['dense_bytes'] / byt['moba_bytes']:>6.2f}"
        )
    print("dry run: nothing measured. 'MoBA MB (max)' assumes a group's heads choose disjoint chunks (no sharing);")
    print("the run counts the bytes of its actual selection.")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code."""
    args = parse_args(argv)
    configs = select_configs(args)
    if args.dry_run:
        dry_run(configs)
        return 0
    if args.compile_check:
        return print_compile_records(compile_check(), 38)
    device = bench_device(args)
    if device is None:
        return 2
    copy_bytes = 1 << 24 if args.smoke else int(args.copy_gib * GiB)
    probe_bytes = 1 << 24 if args.smoke else int(args.probe_gib * GiB)
    env = environment(device)
    bw = read_bandwidth(device, probe_bytes, args.warmup, args.rep)
    bw.update(copy_bandwidth(device, copy_bytes, args.warmup, args.rep))
    env.update(bw)
    rows = [run_config(cfg, args, device, bw) for cfg in configs]
    print(
        f"read probe: {bw['read_gbps']:.0f} GB/s (sum over {bw['read_probe_bytes'] / GiB:.2f} GiB; the bound); copy: "
        f"{bw['copy_read_gbps']:.0f} GB/s read, {bw['copy_traffic_gbps']:.0f} GB/s read+write (recorded) "
        f"on {env.get('gpu') or env.get('device')}"
    )
    print_table(rows)
    out_dir = args.out_dir if args.out_dir is not None else (None if args.smoke else RESULTS_DIR)
    if out_dir is not None:
        path = write_results(rows, env, out_dir, not args.no_plot)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
