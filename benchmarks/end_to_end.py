"""End-to-end benchmark: a Llama-like model of about 1B parameters (random bf16 weights), MoBA versus dense SDPA.

Measures, in one run on the GPU: prefill time at 32K, 128K and 512K tokens, and decode tokens/s at 128K and 512K
context, for the same model with ``attn_implementation="moba"`` (``moba_compile.hf.register`` with the policy chunk
4096, top-k 12, last 3 layers dense; ``MobaCache`` for decode) and with dense SDPA. Results go to
``benchmarks/results/end_to_end-<gpu>-<date>.json`` (GPU name, torch, triton, transformers versions, every shape).

Targets (issue "MoBA decode with a KV cache", H100, bf16): prefill at 512K at least 2.5x faster than dense; decode at
512K at least 2x more tokens/s than dense. At 128K this policy is still 59% dense, so expect little there.

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
    max_position_embeddings=1 << 20,
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
def time_decode(model, ids: torch.Tensor, cache_factory, steps: int) -> float:
    """Tokens per second of ``steps`` greedy decode steps after a prefill of ``ids`` (prefill not timed)."""
    cache = cache_factory()
    nxt = next_token(model, ids, cache)
    nxt = next_token(model, nxt, cache)  # warm-up step
    _sync(ids.device)
    start = time.perf_counter()
    for _ in range(steps):
        nxt = next_token(model, nxt, cache)
    _sync(ids.device)
    return ids.shape[0] * steps / (time.perf_counter() - start)


def _versions() -> dict:
    """GPU name and torch/triton/transformers versions (the shared :func:`benchmarks.common.environment` record)."""
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    gpu = env["gpu"] or platform.processor() or "cpu"
    return {"gpu": gpu, "torch": env["torch"], "triton": env["triton"], "transformers": transformers.__version__}


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
    args = parser.parse_args(argv)
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
    rows = []
    gen = torch.Generator().manual_seed(0)
    meta = _versions()
    date = datetime.date.today().isoformat()

    def save(done: list[dict]) -> Path:
        """Write the rows measured so far (after each one: a run cut short keeps what it measured)."""
        record = {**meta, "date": date, "model": config, "params": params, "policy": policy, "rows": done}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"end_to_end-{meta['gpu'].replace(' ', '_')}-{date}.json"
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
        rows.append(row)
        if not args.smoke:
            save(rows)
        print(f"prefill {n:>7}: moba {row['moba_s']:.3f} s, dense {row['dense_s']:.3f} s, {row['speedup']:.2f}x")
    for n in decode:
        ids = torch.randint(0, config["vocab_size"], (1, n), generator=gen).to(device)
        row = {"kind": "decode", "context": n, "steps": args.decode_steps}
        for name, (impl, cache) in variants.items():
            model.set_attn_implementation(impl)
            row[f"{name}_tok_s"] = time_decode(model, ids, cache, args.decode_steps)
        # The MoBA model's dense layers through cuDNN's SDPA as well (the library leaves cuDNN out of dense decode
        # layers by default, see moba_compile.hf): the effect of that choice, measured in the same run.
        attention.skip_cudnn_in_decode = False
        model.set_attn_implementation("moba")
        row["moba_cudnn_tok_s"] = time_decode(model, ids, moba_compile.hf.MobaCache, args.decode_steps)
        attention.skip_cudnn_in_decode = True
        row["speedup"] = row["moba_tok_s"] / row["dense_tok_s"]
        rows.append(row)
        if not args.smoke:
            save(rows)
        print(
            f"decode {n:>7}: moba {row['moba_tok_s']:.1f} tok/s, dense {row['dense_tok_s']:.1f} tok/s, "
            f"{row['speedup']:.2f}x"
        )
    if args.smoke:
        print("smoke run: numbers are not benchmark results and are not saved")
        return 0
    print(f"wrote {save(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
