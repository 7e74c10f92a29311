"""Packed sequences (issue 17): fwd+bwd of documents packed into one row, MoBA against dense attention with the
document mask, and packed against the same documents run one by one.

One run measures, for one packed row of ``--total`` tokens cut into documents drawn from ``[--min-doc, --max-doc]``
(log-uniform, seeded; the last document takes the remainder):

- ``moba_packed``: ``ops.packed_attention`` (``cu_seqlens``) forward and forward+backward, Triton kernels;
- ``moba_unpacked_sum``: every document as its own sequence (``moba_attention`` on a contiguous copy), the sum of the
  per-document times: the target is ``moba_packed <= 1.2 x`` this;
- ``dense_mask``: SDPA with the same block-diagonal causal boolean mask ``[1, 1, T, T]`` (the form transformers' SDPA
  path runs for packed rows; its mask alone is ``T^2`` bytes, and may not fit: recorded as an error);
- ``flex_document``: FlexAttention with a document-causal block mask (compiled), the sparse dense baseline;
- ``dense_varlen_sum``: SDPA ``is_causal`` per document, summed (what a FlashAttention varlen kernel computes);
- the check: packed == unpacked (outputs and the three gradients, max abs difference, deterministic backward; the
  same keys are attended, and documents sharing a padded launch may differ in the last bit of a dK/dV sum) and, up
  to ``--check-max-len``, MoBA with ``topk`` covering every chunk against dense.

``--smoke`` runs tiny shapes on the CPU under ``TRITON_INTERPRET=1`` (no FlexAttention) so that a test exercises the
script; ``--dry-run`` prints the documents and the work. Results: ``benchmarks/results/packed-<gpu>-<date>.json``.

Example (on an H200)::

    PYTHONPATH=. python -m benchmarks.packed --total 131072 --min-doc 2048 --max-doc 65536
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, bench_device, environment, field_recorder, results_path, time_ms


def draw_documents(total: int, min_doc: int, max_doc: int, seed: int) -> list[int]:
    """Document lengths summing to ``total``: log-uniform in ``[min_doc, max_doc]``, the last one the remainder.

    Example:
        >>> lengths = draw_documents(131072, 2048, 65536, 0)
        >>> sum(lengths), min(lengths[:-1]) >= 2048, max(lengths) <= 65536
        (131072, True, True)
    """
    if not 1 <= min_doc <= max_doc or total < 1:
        raise ValueError(f"need 1 <= min_doc <= max_doc and total >= 1, got {min_doc}, {max_doc}, {total}")
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    left = total
    while left > 0:
        u = float(torch.rand((), generator=gen))
        n = int(round(math.exp(math.log(min_doc) + u * (math.log(max_doc) - math.log(min_doc)))))
        n = min(max(n, min_doc), max_doc, left)
        lengths.append(n)
        left -= n
    return lengths


def causal_pairs(lengths: list[int]) -> int:
    """Attended (row, key) pairs of dense causal attention inside each document (per head).

    Example:
        >>> causal_pairs([3, 2])
        9
    """
    return sum(n * (n + 1) // 2 for n in lengths)


def moba_pairs_bound(lengths: list[int], chunk: int, topk: int) -> int:
    """Upper bound of MoBA's attended pairs per head: a row sees its own chunk causally and ``min(topk-1, earlier)``
    whole earlier chunks of its document.

    Example:
        >>> moba_pairs_bound([5], 2, 2)  # chunks {0,1} {2,3} {4}: 3 + (3 + 2*2) + (1 + 1*2)
        13
    """
    total = 0
    for n in lengths:
        for c0 in range(0, n, chunk):
            rows = min(chunk, n - c0)
            own = rows * (rows + 1) // 2
            total += own + rows * min(topk - 1, c0 // chunk) * chunk
    return total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--smoke`` replaces the shapes by tiny CPU ones); argparse exits 2 on a bad option.

    Example:
        >>> parse_args(["--smoke"]).total
        96
    """
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.packed",
        description="Packed documents: MoBA (cu_seqlens) against dense SDPA with the document mask, FlexAttention "
        "with a document mask, and the same documents run one by one (bf16, GPU).",
    )
    p.add_argument("--total", type=int, default=131072, help="packed row length T")
    p.add_argument("--min-doc", type=int, default=2048, help="shortest document drawn")
    p.add_argument("--max-doc", type=int, default=65536, help="longest document drawn")
    p.add_argument("--seed", type=int, default=0, help="seed of the document lengths and the inputs")
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--kv-heads", type=int, default=16, help="key/value heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--no-dense-mask", action="store_true", help="skip SDPA with the [T, T] document mask")
    p.add_argument("--check-max-len", type=int, default=16384, help="dense-equivalence check up to this length")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup budget, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measurement budget, ms")
    p.add_argument("--out-dir", type=Path, default=None, help=f"where to write the JSON (default {RESULTS_DIR})")
    p.add_argument("--dry-run", action="store_true", help="print the documents and the work, measure nothing")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU via TRITON_INTERPRET=1")
    p.add_argument("--plot", type=Path, default=None, help="redraw the PNG of a saved result JSON, measure nothing")
    args = p.parse_args(argv)
    if args.smoke:
        args.total, args.min_doc, args.max_doc = 96, 8, 64
        args.heads, args.kv_heads, args.head_dim, args.chunk_size, args.topk = 2, 1, 16, 16, 2
        args.no_flex, args.check_max_len = True, 96
    return args


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Measure one packed row; every failure (out of memory, compile errors) is recorded in ``errors``, never papered
    over.

    Args:
        args: :func:`parse_args`'s result. device: CUDA, or the CPU for ``--smoke`` (fp32, interpreted Triton).

    Returns:
        The row: shapes, the documents, every ``*_ms`` column (``None`` where it failed or was skipped), the ratios
        ``packed_over_unpacked_fwd_bwd`` and ``speedup_vs_*``, the checks and the ``packed_attention`` call counts.

    Example:
        >>> row = run(parse_args(["--smoke"]), torch.device("cpu"))  # doctest: +SKIP
    """
    from moba_compile import moba_attention, ops

    lengths = draw_documents(args.total, args.min_doc, args.max_doc, args.seed)
    cu_list = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = torch.tensor(cu_list, dtype=torch.int32, device=device)
    t, h, hkv, d, c, k = args.total, args.heads, args.kv_heads, args.head_dim, args.chunk_size, args.topk
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(args.seed)
    q = torch.randn(1, h, t, d, device=device, dtype=dtype, generator=gen)
    key = torch.randn(1, hkv, t, d, device=device, dtype=dtype, generator=gen)
    val = torch.randn(1, hkv, t, d, device=device, dtype=dtype, generator=gen)
    grad = torch.randn(1, h, t, d, device=device, dtype=dtype, generator=gen)
    docs = list(zip(cu_list[:-1], cu_list[1:]))
    row: dict[str, Any] = {
        "total": t, "documents": lengths, "n_documents": len(lengths), "heads": h, "kv_heads": hkv, "head_dim": d,
        "chunk_size": c, "topk": k, "dtype": str(dtype).replace("torch.", ""),
        "causal_pairs": causal_pairs(lengths) * h, "moba_pairs_bound": moba_pairs_bound(lengths, c, k) * h,
        "errors": {},
    }  # fmt: skip
    record = field_recorder(row, device)
    gqa = h != hkv

    def leaves(*xs: torch.Tensor) -> list[torch.Tensor]:
        return [x.detach().clone().requires_grad_() for x in xs]

    def fwd_bwd(fn: Callable[..., torch.Tensor], *xs: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
        ins = leaves(*xs)

        def step() -> None:
            for x in ins:
                x.grad = None
            fn(*ins).backward(g)

        return step

    def packed(q_, k_, v_):
        return moba_attention(q_, k_, v_, chunk_size=c, topk=k, cu_seqlens=cu, impl="triton")

    # MoBA, packed.
    record("moba_packed_fwd_ms", lambda: time_ms(lambda: packed(q, key, val), device, args.warmup, args.rep))
    record(
        "moba_packed_fwd_bwd_ms", lambda: time_ms(fwd_bwd(packed, q, key, val, g=grad), device, args.warmup, args.rep)
    )

    # MoBA, the same documents one by one (contiguous copies, as separate sequences would be).
    def unpacked_sum(fwd_only: bool) -> float:
        total_ms = 0.0
        for s, e in docs:
            parts = [x[:, :, s:e].contiguous() for x in (q, key, val)]
            g = grad[:, :, s:e].contiguous()

            def one(q_, k_, v_):
                return moba_attention(q_, k_, v_, chunk_size=c, topk=k, impl="triton")

            fn = (lambda p=parts: one(*p)) if fwd_only else fwd_bwd(one, *parts, g=g)
            total_ms += time_ms(fn, device, args.warmup, args.rep)
        return total_ms

    record("moba_unpacked_sum_fwd_ms", lambda: unpacked_sum(True))
    record("moba_unpacked_sum_fwd_bwd_ms", lambda: unpacked_sum(False))

    # Dense SDPA per document (is_causal), summed: the varlen dense baseline.
    def dense_varlen_sum() -> float:
        total_ms = 0.0
        for s, e in docs:
            parts = [x[:, :, s:e].contiguous() for x in (q, key, val)]

            def one(q_, k_, v_):
                return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=gqa)

            total_ms += time_ms(fwd_bwd(one, *parts, g=grad[:, :, s:e].contiguous()), device, args.warmup, args.rep)
        return total_ms

    record("dense_varlen_sum_fwd_bwd_ms", dense_varlen_sum)

    # Dense SDPA with the block-diagonal causal mask over the packed row.
    doc_id = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    if args.no_dense_mask:
        row["dense_mask_fwd_bwd_ms"] = None
        row["errors"]["dense_mask_fwd_bwd_ms"] = "skipped: --no-dense-mask"
    else:

        def dense_mask() -> float:
            pos = torch.arange(t, device=device)
            mask = ((doc_id[:, None] == doc_id[None, :]) & (pos[None, :] <= pos[:, None]))[None, None]

            def masked(q_, k_, v_):
                return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, enable_gqa=gqa)

            return time_ms(fwd_bwd(masked, q, key, val, g=grad), device, args.warmup, args.rep)

        record("dense_mask_fwd_bwd_ms", dense_mask)

    # FlexAttention with a document-causal block mask.
    if args.no_flex:
        row["flex_document_fwd_bwd_ms"] = None
        row["errors"]["flex_document_fwd_bwd_ms"] = "skipped: --no-flex" + (" (smoke)" if args.smoke else "")
    else:

        def flex() -> float:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def document_causal(b, hh, qi, ki):
                return (doc_id[qi] == doc_id[ki]) & (ki <= qi)

            # _compile: the mask is evaluated block by block instead of as a [T, T] tensor (16 GiB of bool at 128K).
            block_mask = create_block_mask(document_causal, 1, None, t, t, device=device, _compile=True)
            compiled = torch.compile(flex_attention, dynamic=False)

            def run_flex(q_, k_, v_):
                return compiled(q_, k_, v_, block_mask=block_mask, enable_gqa=gqa)

            return time_ms(fwd_bwd(run_flex, q, key, val, g=grad), device, args.warmup, args.rep)

        record("flex_document_fwd_bwd_ms", flex)

    # Packed against unpacked: outputs and gradients.
    def check_unpacked() -> dict[str, float]:
        ins = leaves(q, key, val)
        out_p = packed(*ins)
        out_p.backward(grad)
        out_p = out_p.detach()
        diffs = {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}
        for s, e in docs:
            parts = leaves(*(x[:, :, s:e].contiguous() for x in (q, key, val)))
            o = moba_attention(*parts, chunk_size=c, topk=k, impl="triton")
            o.backward(grad[:, :, s:e].contiguous())
            diffs["out"] = max(diffs["out"], float((o.detach() - out_p[:, :, s:e]).abs().max()))
            for name, x, part in zip(("dq", "dk", "dv"), ins, parts):
                assert x.grad is not None and part.grad is not None
                diffs[name] = max(diffs[name], float((part.grad - x.grad[:, :, s:e]).abs().max()))
        return diffs

    def check_unpacked_deterministic() -> dict[str, float]:
        # The backward's deterministic mode: with the default dQ atomics even two unpacked runs differ in the last bits.
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return check_unpacked()
        finally:
            torch.use_deterministic_algorithms(False)

    record("packed_vs_unpacked_max_abs", check_unpacked_deterministic)

    # MoBA with every chunk selected is dense causal inside each document: the packed path against SDPA per document.
    if t <= args.check_max_len:

        def check_dense() -> float:
            every = -(-max(lengths) // c)
            out = moba_attention(q, key, val, chunk_size=c, topk=every, cu_seqlens=cu, impl="triton")
            want = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[:, :, s:e].float(), key[:, :, s:e].float(), val[:, :, s:e].float(), is_causal=True,
                        enable_gqa=gqa,
                    )
                    for s, e in docs
                ],
                dim=2,
            )  # fmt: skip
            return float((out.float() - want).abs().max())

        record("all_chunks_vs_dense_max_abs", check_dense)
    row["calls"] = {name: n for name, n in ops.CALLS.items() if name.startswith("packed_attention")}
    fb, un = row.get("moba_packed_fwd_bwd_ms"), row.get("moba_unpacked_sum_fwd_bwd_ms")
    row["packed_over_unpacked_fwd_bwd"] = None if not (fb and un) else fb / un
    for base in ("dense_mask_fwd_bwd_ms", "flex_document_fwd_bwd_ms", "dense_varlen_sum_fwd_bwd_ms"):
        other = row.get(base)
        row[f"speedup_vs_{base[:-3]}"] = None if not (fb and other) else other / fb
    return row


def print_row(row: dict[str, Any]) -> None:
    """Print one measured row (times, ratios, checks, errors) on stdout.

    Example:
        >>> print_row(run(parse_args(["--smoke"]), torch.device("cpu")))  # doctest: +SKIP
    """
    print(
        f"T={row['total']} docs={row['n_documents']} H={row['heads']}/{row['kv_heads']} D={row['head_dim']} "
        f"C={row['chunk_size']} K={row['topk']} {row['dtype']}"
    )
    for field in sorted(f for f in row if f.endswith("_ms") or f.startswith(("packed_over", "speedup", "all_chunks"))):
        value = row[field]
        print(f"  {field:<36} {value if value is None else round(value, 4)}")
    print(f"  {'packed_vs_unpacked_max_abs':<36} {row.get('packed_vs_unpacked_max_abs')}")
    for field, error in row["errors"].items():
        print(f"  error {field}: {error}")


_PLOTTED = (
    ("moba_packed_fwd_bwd_ms", "MoBA packed (cu_seqlens)"),
    ("moba_unpacked_sum_fwd_bwd_ms", "MoBA per document, summed"),
    ("dense_varlen_sum_fwd_bwd_ms", "dense causal per document, summed"),
    ("flex_document_fwd_bwd_ms", "FlexAttention, document mask"),
    ("dense_mask_fwd_bwd_ms", "dense SDPA, [T, T] document mask"),
)


def plot(row: dict[str, Any], env: dict[str, Any], path: Path) -> bool:
    """Forward+backward time of each variant of one measured row (horizontal bars, log scale); needs matplotlib.

    Returns whether a PNG was written (``False`` without matplotlib or without any measured variant).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    bars = [(label, row[field]) for field, label in _PLOTTED if row.get(field)]
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(10, 3.8))
    labels, values = zip(*bars, strict=True)
    ax.barh(
        range(len(values)), values, color=["tab:blue", "tab:cyan", "tab:gray", "tab:orange", "tab:red"][: len(values)]
    )
    ax.set_yticks(range(len(values)), labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 1.5, max(values) * 3)  # room for the labels
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f} ms", va="center")
    ax.set_xlabel("forward + backward, ms (log scale)")
    ax.set_title(
        f"{row['n_documents']} documents packed into T={row['total']}, H={row['heads']}/{row['kv_heads']} "
        f"D={row['head_dim']} C={row['chunk_size']} K={row['topk']} {row['dtype']}",
        fontsize=10,
    )
    fig.suptitle(f"{env.get('gpu')} - torch {env.get('torch')} - triton {env.get('triton')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code (0, or 2 without a CUDA GPU for a real run).

    ``--plot RESULT.json`` only redraws the PNG of a saved result next to it (no GPU needed).

    Example:
        >>> main(["--dry-run"])  # doctest: +SKIP
    """
    args = parse_args(argv)
    if args.plot is not None:
        saved = json.loads(args.plot.read_text())
        png = args.plot.with_suffix(".png")
        if plot(saved["rows"][0], saved["environment"], png):
            print(f"wrote {png}")
        return 0
    if args.dry_run:
        lengths = draw_documents(args.total, args.min_doc, args.max_doc, args.seed)
        dense, moba = causal_pairs(lengths), moba_pairs_bound(lengths, args.chunk_size, args.topk)
        print(f"documents ({len(lengths)}): {lengths}")
        print(
            f"attended pairs per head: dense document-causal {dense:.3e}, MoBA at most {moba:.3e} ({moba / dense:.3f})"
        )
        print(f"dense SDPA's [T, T] boolean mask: {args.total**2 / 2**30:.1f} GiB")
        return 0
    device = bench_device(args)
    if device is None:
        return 2
    env = environment(device)
    row = run(args, device)
    print_row(row)
    out_dir = args.out_dir if args.out_dir is not None else (None if args.smoke else RESULTS_DIR)
    if out_dir is not None:
        path = results_path(out_dir, "packed", env)
        path.write_text(json.dumps({"environment": env, "rows": [row]}, indent=1) + "\n")
        print(f"wrote {path}")
        if plot(row, env, path.with_suffix(".png")):
            print(f"wrote {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
