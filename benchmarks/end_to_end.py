"""End-to-end benchmark: a Llama-like model of about 1B parameters (random bf16 weights), MoBA versus dense SDPA.

Measures, in one run on the GPU: prefill time at 32K, 128K and 512K tokens, and decode tokens/s at 128K and 512K
context, for the same model with ``attn_implementation="moba"`` (``moba_compile.hf.register`` with the policy chunk
4096, top-k 12, last 3 layers dense; ``MobaCache`` for decode) and with dense SDPA. Results go to
``benchmarks/results/end_to_end-<gpu>-<date>.json`` (GPU name, torch, triton, transformers versions, every shape).

Targets (issue "MoBA decode with a KV cache", H100, bf16): prefill at 512K at least 2.5x faster than dense; decode at
512K at least 2x more tokens/s than dense. At 128K this policy is still 59% dense, so expect little there.

Decode is measured two ways for both models: eagerly over a dynamic cache (``MobaCache`` / ``DynamicCache``), and on
each one's fastest path (issue 16): transformers' ``StaticCache`` with the decode step compiled once and replayed
(``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``: CUDA graphs; MoBA's decode steps run the
graph-safe static-cache op). The graph rows also give the time a step must take to read the weights and the KV bytes
it needs (``graph_bound_ms``, at the rate of a read-only probe measured in the same run; MoBA layers counted with
every selected chunk read once per query head, an upper bound on their bytes).

The graph rows compare MoBA with two dense baselines of the same model: dense SDPA (``dense_graph_*``; on a static
cache transformers hands it a boolean mask over the whole buffer) and the fastest exact dense decode the library has
(``dense_splitk_graph_*``): an all-dense policy whose decode steps run ``moba::dense_decode``'s split-K kernels, the
path the policy's dense layers take by default (``dense_decode = "split_k"``). ``*_dense_decode`` fields say which
path the dense layers' decode steps ran (from the attention's report: ``split_k``, or ``sdpa`` and why).

Decode contexts are filled with random keys and values through ``Cache.update`` (:func:`fill_cache`), not by a
prefill: a step's cost does not depend on how its cache was filled, and the dense prefills that would fill it cost
minutes each at 512K-1M (batch included). ``--profile-prefill N`` profiles one prefill of each model at ``N`` tokens
(kernel time by kind: attention, matmul, other; and the host gap). ``--tag`` names runs split across processes.

``--dense-compiled`` adds two dense prefill baselines through ``torch.compile(backend="moba")`` with every layer
dense: ``dense_compiled_masked_s`` (``dense_sdpa = "as_is"``: SDPA as transformers hands it under torch.compile, on
torch 2.11 a boolean mask and repeated key/value, so a masked kernel) and ``dense_compiled_flash_s``
(``dense_sdpa = "flash_when_causal"``: flash wherever the mask is exactly causal). The eager dense rows above need
neither: eager transformers passes no mask there (``is_causal=True`` on unrepeated key/value). The compiled model
builds an ``[L, L]`` boolean mask (16 GiB at 128K) and the masked kernel an additive bias from it, so these rows are
taken up to ``--dense-compiled-max`` tokens (65536) and skipped, with the reason, above.

    python -m benchmarks.end_to_end                 # GPU
    python -m benchmarks.end_to_end --dry-run       # the plan (parameters, memory), any machine
    python -m benchmarks.end_to_end --smoke         # a tiny config through the whole script on the CPU (not saved)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.common import environment

POLICY = {"chunk_size": 4096, "topk": 12, "dense_last": 3}
PREFILL_LENGTHS = (32 * 1024, 128 * 1024, 512 * 1024)
DECODE_CONTEXTS = (128 * 1024, 512 * 1024)
# About 1.2B parameters: 16 layers, hidden 2048, 16 query heads of 128, 4 key/value heads (GQA), MLP 8192.
MODEL = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    max_position_embeddings=1 << 21,  # above the 1M decode context plus its new tokens
    rope_theta=10_000_000.0,
)
SMOKE_MODEL = dict(
    MODEL,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
)


def build(config: dict, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The Llama-like model with random weights (seed 0), in eval mode, on ``device``.

    Example:
        >>> model = build(SMOKE_MODEL, torch.float32, torch.device("cpu"))  # doctest: +SKIP
    """
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**config)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_prefill(model, ids: torch.Tensor, cache_factory, repeats: int) -> float:
    """Median seconds of one prefill (``logits_to_keep=1``: only the last position's logits)."""
    from moba_compile.hf import cache_keyword

    times = []
    for _ in range(repeats):
        cache = cache_factory()
        _sync(ids.device)
        start = time.perf_counter()
        model(ids, **{cache_keyword(): cache}, use_cache=True, logits_to_keep=1)
        _sync(ids.device)
        times.append(time.perf_counter() - start)
        del cache
    return sorted(times)[(len(times) - 1) // 2]  # the lower median: with 2 repeats, the faster one


def next_token(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """One cached forward of ``ids`` (only the last position's logits) and its greedy next token ``[B, 1]``."""
    from moba_compile.hf import cache_keyword  # cache= on transformers 5.24, past_key_values= before

    out = model(ids, **{cache_keyword(): cache}, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def fill_cache(cache, config: dict, batch: int, context: int, device: torch.device, dtype: torch.dtype):
    """Write ``context`` random keys and values (standard normal, seeded) into every layer of ``cache`` through the
    ``Cache.update`` API, as a prefill would; returns ``cache``.

    Why not a real prefill: a decode step's cost depends on the cache's length and on which chunks its gate selects,
    not on how the cache was filled, while the dense prefill that would fill it costs minutes at 1M tokens (and 5 of
    them per context, batch included). Prefill is measured in its own rows. MoBA's chunk means are computed from
    these keys by the first (untimed) step, exactly as after a prefill.
    """
    layers, hkv, d = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    gen = torch.Generator(device=device).manual_seed(1)
    for layer in range(layers):
        k = torch.randn((batch, hkv, context, d), generator=gen, device=device, dtype=dtype)
        v = torch.randn((batch, hkv, context, d), generator=gen, device=device, dtype=dtype)
        cache.update(k, v, layer)
        del k, v
    return cache


@torch.no_grad()
def time_graph_decode(
    model, token: torch.Tensor, context: int, steps: int, config: dict, profile_steps: int = 0
) -> tuple[float, dict | None]:
    """Tokens per second of ``steps`` greedy decode steps over a ``StaticCache`` of ``context`` filled positions (see
    :func:`fill_cache`), the step compiled once and replayed.

    The first step after the fill runs eagerly (as ``generate`` runs its prefill; it sets up MoBA's chunk-means
    buffers); 3 untimed steps compile, record and replay the captured step. On CUDA ``mode="reduce-overhead"``
    (Inductor, CUDA graphs); on the CPU (``--smoke``) ``aot_eager``. With ``profile_steps``, that many more replays
    run under ``torch.profiler`` and their :func:`kernel_breakdown` (per step) is returned beside the rate.
    """
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    device = token.device
    # Room for every step this function runs: 1 eager + 3 untimed + the timed and the profiled ones. (A replay past
    # max_cache_len indexes outside the buffer: transformers' index_copy_ fails a device-side assert.)
    cache = StaticCache(config=model.config, max_cache_len=context + 1 + 3 + steps + profile_steps + 4)
    fill_cache(cache, config, token.shape[0], context, device, model.dtype)
    if device.type == "cuda":
        step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    else:
        step = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
    nxt = next_token(model, token, cache)

    def one(token: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs were consumed
        return next_token(step, token, cache)

    for _ in range(3):
        nxt = one(nxt)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        nxt = one(nxt)
    _sync(device)
    rate = token.shape[0] * steps / (time.perf_counter() - start)
    if not profile_steps:
        return rate, None
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        for _ in range(profile_steps):
            nxt = one(nxt)
        _sync(device)
        wall = time.perf_counter() - start
    breakdown = kernel_breakdown(prof, wall, cuda)
    per_step = {k: v / profile_steps for k, v in breakdown.items() if isinstance(v, float)}
    per_step["by_kind_ms"] = {k: v / profile_steps for k, v in breakdown["by_kind_ms"].items()}
    per_step["top"] = [dict(t, ms=t["ms"] / profile_steps) for t in breakdown["top"]]
    return rate, {"steps": profile_steps, **per_step}


def dense_decode_path(attention) -> str:
    """Which path the one-query decode steps of the dense layers ran, from a ``moba_compile.hf`` attention's report:
    ``"split_k"``, ``"sdpa (<why>)"`` (the split-K kernels did not take the step, or the policy's ``"sdpa"``), several
    of them comma-separated, or ``"none"`` (no dense decode step recorded)."""
    from moba_compile.decisions import REASONS

    split_k = REASONS["dense_split_k"].split("{")[0]
    fallback = REASONS["dense_split_k_not"].split("{")[0]
    paths = set()
    for site in attention.report().sites:
        if site.decision != "dense" or site.form != "kv-cache":
            continue
        if split_k in site.reason:
            paths.add("split_k")
        elif fallback in site.reason:
            paths.add(f"sdpa ({site.reason.split(fallback, 1)[1].split('): ')[0]})")
        elif REASONS["dense_decode_sdpa"] in site.reason:
            paths.add("sdpa (dense_decode = 'sdpa')")
    return ", ".join(sorted(paths)) or "none"


def step_bytes(config: dict, params: int, policy: dict, context: int, batch: int, moba: bool) -> float:
    """Bytes one decode step must read at ``context`` keys: the weights (bf16), and per layer its KV cache (dense) or,
    for a MoBA layer, the chunk means plus ``topk`` chunks per query head (no GQA sharing: an upper bound)."""
    layers, hkv, hq, d = (config[k] for k in ("num_hidden_layers", "num_key_value_heads", "num_attention_heads",
                                              "head_dim"))  # fmt: skip
    c, k, dense_last = policy["chunk_size"], policy["topk"], policy["dense_last"]
    dense_kv = batch * context * hkv * d * 2 * 2
    moba_kv = batch * (hkv * (context // c) * d * 4 + hq * min(k * c, context) * d * 2 * 2)
    n_moba = layers - dense_last if moba else 0
    return params * 2 + n_moba * min(moba_kv, dense_kv) + (layers - n_moba) * dense_kv


@torch.no_grad()
def time_decode(model, token: torch.Tensor, cache, steps: int) -> float:
    """Tokens per second of ``steps`` greedy decode steps from ``token`` ``[B, 1]`` over a filled ``cache`` (two
    untimed steps first: the first sets up MoBA's chunk means)."""
    nxt = next_token(model, token, cache)
    nxt = next_token(model, nxt, cache)  # warm-up step
    _sync(token.device)
    start = time.perf_counter()
    for _ in range(steps):
        nxt = next_token(model, nxt, cache)
    _sync(token.device)
    return token.shape[0] * steps / (time.perf_counter() - start)


@torch.no_grad()
def time_compiled_dense_prefill(model, ids: torch.Tensor, dense_sdpa: str, repeats: int) -> tuple[float, dict]:
    """Median seconds of a prefill of ``model`` compiled through the ``moba`` backend with every layer dense and the
    policy's ``dense_sdpa`` (after an untimed call that compiles), and the ``moba::dense_attention`` executions of the
    timed calls by branch (``ops.CALLS``; none under ``"as_is"``)."""
    import warnings

    from transformers import DynamicCache

    import moba_compile
    from moba_compile import ops

    policy = {"version": 1, "rules": [{"module": "re:.*", "mode": "dense"}], "dense_sdpa": dense_sdpa}
    torch._dynamo.reset()  # each baseline compiles its own graphs
    compiled = torch.compile(model, backend="moba", options={"policy": policy})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moba_compile.MobaCompileWarning)  # "converts none": all dense on purpose
        time_prefill(compiled, ids, DynamicCache, 1)
        before = {k: n for k, n in ops.CALLS.items() if k.startswith("dense_attention")}
        seconds = time_prefill(compiled, ids, DynamicCache, repeats)
    ran = {k: n - before.get(k, 0) for k, n in ops.CALLS.items() if k.startswith("dense_attention")}
    return seconds, {k: n for k, n in ran.items() if n}


_ATTENTION_NAMES = ("moba", "attention", "attn", "flash", "fmha", "sdpa", "cudnn", "_fwd_kernel", "gate", "chunk_mean")
_MATMUL_NAMES = ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "matmul", "mm_", "aten::mm", "aten::addmm", "linear")


def _kind_of(name: str) -> str:
    low = name.lower()
    if any(k in low for k in _ATTENTION_NAMES):
        return "attention"
    if any(k in low for k in _MATMUL_NAMES):
        return "matmul"
    return "other"


@torch.no_grad()
def profile_prefill(model, ids: torch.Tensor, cache_factory, top: int = 15) -> dict:
    """One prefill of ``ids`` under ``torch.profiler`` (after an untimed one): its wall time, the summed GPU kernel
    time by kind (attention incl. gate and chunk means, matmul, other), the gap (wall minus kernel time: host work and
    idle GPU), and the ``top`` kernels by total time. On the CPU (``--smoke``) the ops' self CPU time instead.

    The kinds are matched on kernel names (``_ATTENTION_NAMES``, ``_MATMUL_NAMES``); anything unmatched is "other":
    norms, RoPE, activations, copies, mask building, casts, which is what issue 16 asks to remove.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = ids.device.type == "cuda"
    time_prefill(model, ids, cache_factory, 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        wall = time_prefill(model, ids, cache_factory, 1)
    return {"tokens": ids.shape[1], **kernel_breakdown(prof, wall, cuda, top)}


def kernel_breakdown(prof, wall_s: float, cuda: bool, top: int = 15) -> dict:
    """The profiled region's wall time (``wall_s``, seconds), its summed GPU kernel time by kind (attention incl.
    gate and chunk means, matmul, other), the gap (wall minus kernel time: host work and idle GPU) and the ``top``
    kernels by total time, all in ms; on the CPU the ops' self CPU time instead of kernels."""
    from torch.autograd import DeviceType

    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        if cuda:
            if evt.device_type != DeviceType.CUDA:
                continue
            us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
        else:
            us = evt.self_cpu_time_total
        if us > 0:
            totals[evt.key] = totals.get(evt.key, 0.0) + us
    by_kind = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
    for name, us in totals.items():
        by_kind[_kind_of(name)] += us / 1e3
    busy_ms = sum(by_kind.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return {
        "wall_ms": wall_s * 1e3,
        "kernel_ms": busy_ms,
        "by_kind_ms": by_kind,
        "gap_ms": wall_s * 1e3 - busy_ms,
        "top": [{"name": name[:120], "ms": us / 1e3, "kind": _kind_of(name)} for name, us in ranked],
    }


def _cpu_read_rate(n_bytes: int) -> dict[str, float]:
    """The read-only probe on the CPU (``--smoke``): a sum over ``n_bytes`` of fp32, best of 5."""
    x = torch.ones(n_bytes // 4)
    best = min(_timed(x.sum) for _ in range(5))
    return {"read_probe_ms": best * 1e3, "read_probe_bytes": float(n_bytes), "read_gbps": n_bytes / best / 1e9}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _versions() -> dict:
    """GPU name and torch/triton/transformers versions (the shared :func:`benchmarks.common.environment` record)."""
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    gpu = env["gpu"] or platform.processor() or "cpu"
    return {"gpu": gpu, "torch": env["torch"], "triton": env["triton"], "transformers": transformers.__version__}


def plot(paths: list[Path], out: Path) -> Path | None:
    """Draw the prefill rows (seconds against tokens, log-log) and the graph-captured decode rows (tokens/s per
    context and batch: MoBA, dense SDPA and, where measured, the split-K dense decode) of the result files ``paths``
    into one PNG at ``out``; None when matplotlib is missing.

    Only measured rows are drawn; a row whose graph decode failed is left out (its error stays in its JSON).

    Example:
        >>> plot(sorted(Path("benchmarks/results").glob("end_to_end-nvidia-h200-20261130-*.json")),
        ...      Path("/tmp/e2e.png"))  # doctest: +SKIP
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for p in paths for r in json.loads(p.read_text())["rows"]]
    meta = json.loads(paths[0].read_text()) if paths else {}
    prefill = sorted((r for r in rows if r["kind"] == "prefill"), key=lambda r: r["tokens"])
    decode = sorted(
        (r for r in rows if r["kind"] == "decode" and r.get("graph_speedup")), key=lambda r: (r["batch"], r["context"])
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if prefill:
        n = [r["tokens"] for r in prefill]
        left.loglog(n, [r["moba_s"] for r in prefill], "o-", label="MoBA (chunk 4096, top-12, last 3 dense)")
        left.loglog(n, [r["dense_s"] for r in prefill], "s-", label="dense SDPA")
        for r in prefill:
            left.annotate(
                f"{r['speedup']:.2f}x", (r["tokens"], r["moba_s"]), textcoords="offset points", xytext=(4, -12)
            )
        left.set(xlabel="prompt tokens", ylabel="prefill seconds", title="prefill, batch 1")
        left.legend()
    if decode:
        labels = [f"{r['context'] // 1024}K b{r['batch']}" for r in decode]
        x = range(len(decode))
        right.bar([i - 0.27 for i in x], [r["moba_graph_tok_s"] for r in decode], 0.27, label="MoBA")
        right.bar([i for i in x], [r["dense_graph_tok_s"] for r in decode], 0.27, label="dense SDPA")
        # The best dense baseline (split-K dense decode), where the row measured it (rows before issue 16 did not).
        best = [(i, r["dense_splitk_graph_tok_s"]) for i, r in zip(x, decode) if r.get("dense_splitk_graph_tok_s")]
        if best:
            right.bar([i + 0.27 for i, _ in best], [t for _, t in best], 0.27, label="dense split-K")
        right.set_xticks(list(x), labels)
        right.set(ylabel="tokens/s", title="decode, static cache + CUDA graphs")
        right.legend()
    fig.suptitle(
        f"end to end, {meta.get('gpu', '?')}, torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or its dry run / smoke mode) and print a table; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--smoke", action="store_true", help="tiny model and lengths on the CPU; nothing saved")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--prefill", default=None, help="comma-separated prefill lengths (default 32768,131072,524288)")
    parser.add_argument("--decode", default=None, help="comma-separated decode contexts (default 131072,524288)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per decode step (prefill runs batch 1)")
    parser.add_argument("--no-graph", action="store_true", help="skip the static-cache, graph-captured decode rows")
    parser.add_argument(
        "--dense-compiled",
        action="store_true",
        help="also time the dense prefill compiled through backend='moba' with dense_sdpa as_is (masked) and "
        "flash_when_causal",
    )
    parser.add_argument(
        "--plot-from", nargs="+", type=Path, default=None, help="draw the PNG of these result JSONs (no run) and exit"
    )
    parser.add_argument(
        "--plot-out", type=Path, default=None, help="the PNG's path (default: --out/end_to_end-plot.png)"
    )
    parser.add_argument(
        "--split-k",
        action="store_true",
        help="also time the MoBA model's captured decode step with dense_decode = 'split_k' set explicitly (the "
        "default since issue 16, so the same path as 'moba'; kept for the fields of earlier runs)",
    )
    parser.add_argument(
        "--sdpa-dense-decode",
        action="store_true",
        help="also time the MoBA model's captured decode step with dense_decode = 'sdpa' (its dense layers on SDPA's "
        "masked call: the default before issue 16)",
    )
    parser.add_argument("--tag", default="", help="suffix of the JSON's name, for runs split across processes")
    parser.add_argument(
        "--profile-prefill",
        type=int,
        default=0,
        help="also profile one MoBA and one dense prefill of this many tokens (torch.profiler; the GPU kernels with "
        "the largest total time, and the share that is neither attention nor matmul)",
    )
    parser.add_argument(
        "--profile-decode", type=int, default=0, help="profile this many replays of each graph-captured decode step"
    )
    parser.add_argument("--dense-compiled-max", type=int, default=65536, help="longest prefill for --dense-compiled")
    args = parser.parse_args(argv)
    if args.plot_from:
        drawn = plot(args.plot_from, args.plot_out or Path(args.out) / "end_to_end-plot.png")
        print(f"wrote {drawn}" if drawn else "matplotlib is not installed: no plot")
        return 0
    config = SMOKE_MODEL if args.smoke else MODEL
    prefill = (512, 1024) if args.smoke else PREFILL_LENGTHS
    decode = (1024,) if args.smoke else DECODE_CONTEXTS
    if args.prefill is not None:
        prefill = tuple(int(x) for x in args.prefill.split(",") if x)
    if args.decode is not None:
        decode = tuple(int(x) for x in args.decode.split(",") if x)
    policy = {"chunk_size": 64, "topk": 3, "dense_last": 1} if args.smoke else POLICY
    params = config["vocab_size"] * config["hidden_size"] * 2 + config["num_hidden_layers"] * (
        config["hidden_size"]
        * config["head_dim"]
        * (2 * config["num_attention_heads"] + 2 * config["num_key_value_heads"])
        + 3 * config["hidden_size"] * config["intermediate_size"]
    )
    kv_bytes = lambda n: 2 * config["num_hidden_layers"] * n * config["num_key_value_heads"] * config["head_dim"] * 2  # noqa: E731
    print(f"model: {params / 1e9:.2f}B parameters; policy {policy}")
    for n in sorted(set(prefill) | set(decode)):
        print(f"  {n:>7} tokens: KV cache {kv_bytes(n) / 2**30:.1f} GiB (bf16)")
    if args.dry_run:
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run or --smoke on this machine")
        return 2
    from transformers import DynamicCache

    import moba_compile.hf

    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = build(config, dtype, device)
    attention = moba_compile.hf.register(policy, name="moba")
    variants = {"moba": ("moba", moba_compile.hf.MobaCache), "dense": ("sdpa", DynamicCache)}
    # The best dense baseline: every layer dense by the policy, so every decode step runs moba::dense_decode's
    # split-K kernels (exact dense attention) where they take it; "dense" is the same model on transformers' SDPA.
    attentions = {
        "moba": attention,
        "dense_splitk": moba_compile.hf.register(
            {**policy, "dense_last": config["num_hidden_layers"], "dense_decode": "split_k"}, name="dense_splitk"
        ),
    }
    graph_variants = [("moba", "moba"), ("dense", "sdpa"), ("dense_splitk", "dense_splitk")]
    if args.split_k:
        # The same MoBA model with dense_decode = 'split_k' set explicitly (the default: the fields of earlier runs).
        attentions["moba_splitk"] = moba_compile.hf.register({**policy, "dense_decode": "split_k"}, name="moba_splitk")
        graph_variants.append(("moba_splitk", "moba_splitk"))
    if args.sdpa_dense_decode:
        # The same MoBA model with its dense layers' decode steps on SDPA's masked call (the default before issue 16).
        attentions["moba_sdpa"] = moba_compile.hf.register({**policy, "dense_decode": "sdpa"}, name="moba_sdpa")
        graph_variants.append(("moba_sdpa", "moba_sdpa"))
    rows = []
    gen = torch.Generator().manual_seed(0)
    meta = _versions()
    date = datetime.date.today().isoformat()

    def save(done: list[dict]) -> Path:
        """Write the rows measured so far (after each one: a run cut short keeps what it measured)."""
        record = {**meta, "date": date, "model": config, "params": params, "policy": policy, "rows": done}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"-{args.tag}" if args.tag else ""
        path = out / f"end_to_end-{meta['gpu'].replace(' ', '_')}-{date}{tag}.json"
        path.write_text(json.dumps(record, indent=2))
        return path

    for n in prefill:
        ids = torch.randint(0, config["vocab_size"], (1, n), generator=gen).to(device)
        row = {"kind": "prefill", "tokens": n}
        for name, (impl, cache) in variants.items():
            model.set_attn_implementation(impl)
            # Warm-up, untimed: every kernel specialisation the timed run needs compiled and loaded. 48K tokens give
            # the gate its full K-1 = 11 slots at chunk 4096 (the long runs' specialisation); shorter runs warm up at n.
            time_prefill(model, ids[:, : min(n, 12 * policy["chunk_size"])], cache, 1)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            row[f"{name}_s"] = time_prefill(model, ids, cache, args.repeats)
            if device.type == "cuda":
                row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["speedup"] = row["dense_s"] / row["moba_s"]
        if args.dense_compiled and n > args.dense_compiled_max:
            row["dense_compiled_skipped"] = f"{n} tokens > --dense-compiled-max {args.dense_compiled_max}"
        elif args.dense_compiled:
            model.set_attn_implementation("sdpa")
            for mode, key in (("as_is", "dense_compiled_masked"), ("flash_when_causal", "dense_compiled_flash")):
                row[f"{key}_s"], row[f"{key}_ran"] = time_compiled_dense_prefill(model, ids, mode, args.repeats)
            row["speedup_vs_compiled_masked"] = row["dense_compiled_masked_s"] / row["moba_s"]
            row["speedup_vs_compiled_flash"] = row["dense_compiled_flash_s"] / row["moba_s"]
        rows.append(row)
        if not args.smoke:
            save(rows)
        print(f"prefill {n:>7}: moba {row['moba_s']:.3f} s, dense {row['dense_s']:.3f} s, {row['speedup']:.2f}x")
        if "dense_compiled_flash_s" in row:
            print(
                f"  dense compiled (backend='moba', all dense): masked {row['dense_compiled_masked_s']:.3f} s, "
                f"flash causal {row['dense_compiled_flash_s']:.3f} s ({row['dense_compiled_flash_ran'] or 'no op ran'})"
            )
    if args.profile_prefill:
        n = args.profile_prefill
        ids = torch.randint(0, config["vocab_size"], (1, n), generator=gen).to(device)
        row = {"kind": "prefill_profile", "tokens": n}
        for name, (impl, cache) in variants.items():
            model.set_attn_implementation(impl)
            row[name] = profile_prefill(model, ids, cache)
            p = row[name]
            print(
                f"prefill profile {name} {n}: wall {p['wall_ms']:.1f} ms, kernels {p['kernel_ms']:.1f} ms "
                + ", ".join(f"{k} {v:.1f}" for k, v in p["by_kind_ms"].items())
                + f", gap {p['gap_ms']:.1f} ms"
            )
            for t in p["top"][:8]:
                print(f"    {t['ms']:9.2f} ms  {t['kind']:<9} {t['name'][:90]}")
        rows.append(row)
        if not args.smoke:
            save(rows)
    if not args.no_graph:
        from benchmarks.decode import read_bandwidth

        probe = 1 << 24 if args.smoke else 4 << 30
        meta.update(read_bandwidth(device, probe, 25, 100) if device.type == "cuda" else _cpu_read_rate(probe))
    for n in decode:
        token = torch.randint(0, config["vocab_size"], (args.batch, 1), generator=gen).to(device)
        row = {"kind": "decode", "context": n, "steps": args.decode_steps, "batch": args.batch, "fill": "random"}

        def filled(factory, n=n):
            return fill_cache(factory(), config, args.batch, n, device, dtype)

        for name, (impl, cache) in variants.items():
            model.set_attn_implementation(impl)
            attention.reset_report()
            row[f"{name}_tok_s"] = time_decode(model, token, filled(cache), args.decode_steps)
        row["moba_dense_decode"] = dense_decode_path(attention)  # the eager dynamic-cache row's dense layers
        # The MoBA model's dense layers through cuDNN's SDPA as well (the library leaves cuDNN out of dense decode
        # layers by default, see moba_compile.hf): the effect of that choice, measured in the same run.
        attention.skip_cudnn_in_decode = False
        model.set_attn_implementation("moba")
        row["moba_cudnn_tok_s"] = time_decode(model, token, filled(moba_compile.hf.MobaCache), args.decode_steps)
        attention.skip_cudnn_in_decode = True
        row["speedup"] = row["moba_tok_s"] / row["dense_tok_s"]
        if not args.no_graph:
            for name, impl in graph_variants:
                model.set_attn_implementation(impl)
                torch._dynamo.reset()  # each model compiles its own step
                if name in attentions:
                    attentions[name].reset_report()
                try:
                    row[f"{name}_graph_tok_s"], prof = time_graph_decode(
                        model, token, n, args.decode_steps, config, args.profile_decode
                    )
                    if prof is not None:
                        row[f"{name}_graph_profile"] = prof
                        print(
                            f"  {name} graph step profile (per step): wall {prof['wall_ms']:.2f} ms, kernels "
                            f"{prof['kernel_ms']:.2f} ms ("
                            + ", ".join(f"{k} {v:.2f}" for k, v in prof["by_kind_ms"].items())
                            + ")"
                        )
                        for t in prof["top"][:8]:
                            print(f"    {t['ms']:8.3f} ms  {t['kind']:<9} {t['name'][:90]}")
                except Exception as exc:  # noqa: BLE001 - recorded, never papered over
                    row[f"{name}_graph_tok_s"] = None
                    row.setdefault("errors", {})[f"{name}_graph"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                if name in attentions:
                    row[f"{name}_graph_dense_decode"] = dense_decode_path(attentions[name])
                rate = meta["read_gbps"] * 1e9  # bytes per second
                byt = step_bytes(config, params, policy, n, args.batch, name.startswith("moba"))
                row[f"{name}_graph_bytes"] = byt
                row[f"{name}_graph_bound_ms"] = byt / rate * 1e3
                tok_s = row[f"{name}_graph_tok_s"]
                if tok_s:
                    step_ms = args.batch / tok_s * 1e3
                    row[f"{name}_graph_ms"] = step_ms
                    row[f"{name}_graph_ratio_to_bound"] = step_ms / row[f"{name}_graph_bound_ms"]
            if row.get("moba_graph_tok_s") and row.get("dense_graph_tok_s"):
                row["graph_speedup"] = row["moba_graph_tok_s"] / row["dense_graph_tok_s"]
            if row.get("moba_splitk_graph_tok_s") and row.get("dense_graph_tok_s"):
                row["splitk_graph_speedup"] = row["moba_splitk_graph_tok_s"] / row["dense_graph_tok_s"]
            if row.get("moba_sdpa_graph_tok_s") and row.get("dense_graph_tok_s"):
                row["sdpa_dense_decode_graph_speedup"] = row["moba_sdpa_graph_tok_s"] / row["dense_graph_tok_s"]
            if row.get("moba_graph_tok_s") and row.get("dense_splitk_graph_tok_s"):
                # MoBA against the fastest exact dense decode of the same model (issue 16: dense on its fastest path).
                row["graph_speedup_vs_best_dense"] = row["moba_graph_tok_s"] / row["dense_splitk_graph_tok_s"]
            if row.get("dense_splitk_graph_tok_s") and row.get("dense_graph_tok_s"):
                row["best_dense_vs_sdpa"] = row["dense_splitk_graph_tok_s"] / row["dense_graph_tok_s"]
        rows.append(row)
        if not args.smoke:
            save(rows)
        print(
            f"decode {n:>7}: moba {row['moba_tok_s']:.1f} tok/s, dense {row['dense_tok_s']:.1f} tok/s, "
            f"{row['speedup']:.2f}x"
        )
        if "graph_speedup" in row:
            print(
                f"  static cache, compiled step (CUDA graphs on CUDA), batch {args.batch}: "
                f"moba {row['moba_graph_tok_s']:.1f} tok/s "
                f"({row['moba_graph_ratio_to_bound']:.2f}x its read bound), dense {row['dense_graph_tok_s']:.1f} "
                f"tok/s ({row['dense_graph_ratio_to_bound']:.2f}x), {row['graph_speedup']:.2f}x"
            )
        if "graph_speedup_vs_best_dense" in row:
            print(
                f"  best dense (all layers dense, dense_decode = 'split_k': {row['dense_splitk_graph_dense_decode']}): "
                f"{row['dense_splitk_graph_tok_s']:.1f} tok/s ({row['dense_splitk_graph_ratio_to_bound']:.2f}x its "
                f"read bound, {row['best_dense_vs_sdpa']:.2f}x dense SDPA); moba "
                f"{row['graph_speedup_vs_best_dense']:.2f}x best dense"
            )
        if "moba_graph_dense_decode" in row:
            print(f"  moba's dense layers decoded with: {row['moba_graph_dense_decode']}")
        if "sdpa_dense_decode_graph_speedup" in row:
            print(
                f"  moba with dense_decode = 'sdpa': {row['moba_sdpa_graph_tok_s']:.1f} tok/s "
                f"({row['moba_sdpa_graph_ratio_to_bound']:.2f}x its read bound), "
                f"{row['sdpa_dense_decode_graph_speedup']:.2f}x dense"
            )
        if "splitk_graph_speedup" in row:
            print(
                f"  moba with dense_decode = 'split_k': {row['moba_splitk_graph_tok_s']:.1f} tok/s "
                f"({row['moba_splitk_graph_ratio_to_bound']:.2f}x its read bound), "
                f"{row['splitk_graph_speedup']:.2f}x dense"
            )
        for field, err in row.get("errors", {}).items():
            print(f"  {field}: {err}")
    if args.smoke:
        print("smoke run: numbers are not benchmark results and are not saved")
        return 0
    print(f"wrote {save(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
