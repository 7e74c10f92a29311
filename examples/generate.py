"""Long-prompt generation with MoBA versus dense attention: prefill and decode tokens per second, warm-up apart.

The same model (a transformers causal LM built from a config, or a local checkpoint) runs twice: once with
``attn_implementation="moba"`` (``moba_compile.hf.register`` with a policy), once with dense SDPA. Each run first
warms up on the same shapes (a prefill and a few decode steps: Triton compilation and autotuning, ``torch.compile``,
CUDA-graph recording), reported apart, then times a fresh prefill and the decode loop. Greedy decoding; the script
reports both runs' steady-state throughput and how many generated tokens agree (random weights make agreement a weak
signal; on a trained checkpoint it is the quality check).

Caches (``--cache``):

- ``dynamic`` (default): MoBA decodes over ``moba_compile.hf.MobaCache`` (a ``DynamicCache`` keeping chunk means),
  dense over ``DynamicCache``. Each step is a new shape, so it runs eagerly.
- ``static``: transformers' ``StaticCache`` of ``prompt + new tokens`` slots for both; MoBA decode steps run the
  graph-safe static-cache op (the length read on the device). With ``--compile`` the decode step is compiled once
  (``torch.compile(model.forward, mode="reduce-overhead")`` on CUDA: CUDA graphs; ``aot_eager`` on the CPU) and
  replayed every step: the fast path, as ``generate(..., compile_config=...)`` runs it.

Run (CPU, small):

    python examples/generate.py --model tiny-llama --prompt-len 1024 --new-tokens 16 \\
        --policy examples/policies/scaling_law.toml

On a GPU, e.g. a 1B-parameter config at 128K with the static cache and graph capture:
``--model path/to/config.json --prompt-len 131072 --dtype bfloat16 --cache static --compile``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

import moba_compile
import moba_compile.hf
from moba_compile.hf.models import CliError, build_hf_model

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional: a plain line per few steps instead
    tqdm = None


@dataclass
class Run:
    """Throughput and tokens of one generation: ``warmup_s`` is the warm-up pass (compilation, autotuning) before
    the timed prefill and decode, on the same shapes."""

    name: str
    prefill_s: float
    decode_s: float
    tokens: torch.Tensor
    warmup_s: float = 0.0

    def rates(self, batch: int, prompt_len: int) -> tuple[float, float]:
        """``(prefill tokens/s, decode tokens/s)`` of the timed pass (the first new token comes from the prefill)."""
        new = self.tokens.shape[1]
        return batch * prompt_len / self.prefill_s, batch * max(new - 1, 1) / max(self.decode_s, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(steps: Iterable[int], label: str, total: int, show: bool) -> Iterator[int]:
    """``steps`` with a progress bar: tqdm when installed, else a plain line every tenth of the way (stderr)."""
    if not show:
        yield from steps
        return
    if tqdm is not None:
        yield from tqdm(steps, desc=label, total=total, leave=False)
        return
    every = max(1, total // 10)
    for i in steps:
        if i % every == 0 or i == total - 1:
            print(f"{label}: step {i + 1}/{total}", file=sys.stderr, flush=True)
        yield i


def make_cache(kind: str, attention: str, model: torch.nn.Module, max_len: int) -> Any:
    """A fresh cache: ``StaticCache`` of ``max_len`` slots, ``MobaCache`` (MoBA, dynamic) or ``DynamicCache``."""
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return moba_compile.hf.MobaCache() if attention == "moba" else DynamicCache()


def decode_step(model: torch.nn.Module, compile_step: bool, device: torch.device) -> Callable[..., Any]:
    """The function a decode step calls: the model's forward, or that forward compiled once for every step.

    On CUDA ``mode="reduce-overhead"`` captures the step in a CUDA graph (the static cache's buffers have fixed
    addresses, and MoBA's static-cache op reads the length on the device); on the CPU ``aot_eager`` traces the same
    graph without Inductor's compile time.
    """
    if not compile_step:
        return model
    if device.type == "cuda":
        return torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    return torch.compile(model.forward, backend="aot_eager", fullgraph=True)


@torch.no_grad()
def greedy(
    model: torch.nn.Module,
    step: Callable[..., Any],
    ids: torch.Tensor,
    new_tokens: int,
    cache: Any,
    label: str,
    progress: bool,
    prefill_chunk: int | None = None,
) -> tuple[float, float, torch.Tensor]:
    """Prefill ``ids`` (eagerly), then decode ``new_tokens - 1`` more greedily through ``step``, timed apart.

    Args:
        model: a transformers causal LM. step: what decode steps call (:func:`decode_step`).
        ids: ``[B, L]`` prompt token ids on the model's device. new_tokens: tokens to generate (>= 1).
        cache: a transformers cache object, filled in place (passed as ``cache=``, or ``past_key_values=`` on
            transformers versions before the rename: :func:`moba_compile.hf.cache_keyword`).
        label: the progress bar's label. progress: show progress.
        prefill_chunk: prefill the prompt in pieces of this many tokens through the same cache (a chunked prefill:
            a prompt longer than one forward's activation memory; MoBA's result is the same, the cache keeping the
            earlier pieces' keys and chunk means), or in one forward (``None``).

    Returns:
        ``(prefill seconds, decode seconds, generated tokens [B, new_tokens])``.

    Example:
        >>> greedy(model, model, ids, 8, DynamicCache(), "dense", progress=False)  # doctest: +SKIP
    """
    device = ids.device
    with_cache = {moba_compile.hf.cache_keyword(): cache}
    _sync(device)
    start = time.perf_counter()
    for start_pos in range(0, ids.shape[1], prefill_chunk or ids.shape[1]):
        piece = ids[:, start_pos : start_pos + (prefill_chunk or ids.shape[1])]
        # transformers derives positions and the mask from the cache's length (cache_position), so each piece
        # continues where the previous one ended.
        out = model(piece, **with_cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill = time.perf_counter() - start
    tokens = [nxt]
    start = time.perf_counter()
    for _ in _progress(range(new_tokens - 1), label, new_tokens - 1, progress):
        if device.type == "cuda" and step is not model:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed: reuse its memory
        out = step(nxt, **with_cache, use_cache=True)  # the cache object is updated in place
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
    _sync(device)
    return prefill, time.perf_counter() - start, torch.cat(tokens, dim=1)


def timed_run(name: str, model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace, progress: bool) -> Run:
    """Warm up (a prefill and a few decode steps on the same shapes), then time a fresh generation: one :class:`Run`.

    The warm-up pays the one-off costs a user sees on a first call (Triton compilation and autotuning,
    ``torch.compile``, CUDA-graph recording, cuDNN plans); the timed pass then runs on a fresh cache (a static one is
    reset in place, so a captured graph replays over the same buffers).
    """
    step = decode_step(model, args.compile, ids.device)
    max_len = ids.shape[1] + args.new_tokens
    cache = make_cache(args.cache, name, model, max_len)
    warm_tokens = min(args.new_tokens, 4)  # decode steps 1-3 compile, record and replay the captured step
    _sync(ids.device)
    start = time.perf_counter()
    greedy(model, step, ids, warm_tokens, cache, f"{name} warm-up", progress, args.prefill_chunk)
    warmup = time.perf_counter() - start
    if args.cache == "static":
        cache.reset()  # the same buffers (their addresses are in the captured graph), zeroed
    else:
        cache = make_cache(args.cache, name, model, max_len)
    prefill, decode, tokens = greedy(
        model, step, ids, args.new_tokens, cache, f"{name} decode", progress, args.prefill_chunk
    )
    return Run(name, prefill, decode, tokens, warmup)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run MoBA and dense generation, print the comparison.

    Returns:
        The exit status: 0, or 2 for a bad policy (file, key) or model argument, with a one-line message on stderr.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="preset name, config.json, or checkpoint directory")
    parser.add_argument("--policy", default=None, help="policy file (default: the built-in default policy)")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--cache",
        default="dynamic",
        choices=["dynamic", "static"],
        help="KV cache: dynamic (MobaCache for MoBA) or transformers' StaticCache (graph-safe MoBA decode)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step once (CUDA: mode='reduce-overhead', i.e. CUDA graphs); needs --cache static",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="prefill the prompt in pieces of this many tokens through the same cache (long prompts)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.new_tokens < 1 or args.prompt_len < 1:
        parser.error("--prompt-len and --new-tokens must be >= 1")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        parser.error(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.compile and args.cache != "static":
        parser.error("--compile needs --cache static: a dynamic cache changes the decode step's shapes every token")
    try:
        # The policy first: a bad one is reported in one line before minutes of model loading, not as a traceback.
        policy = moba_compile.load_policy(args.policy)
        model, what = build_hf_model(args.model, dtype=getattr(torch, args.dtype), load_weights=True)
    except (CliError, moba_compile.PolicyError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    model.to(device).eval()
    attention = moba_compile.hf.register(policy, name="moba")
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=gen).to(device)
    mode = f"{args.cache} cache" + (", compiled decode step" if args.compile else "")
    print(f"{what}; prompt {args.batch} x {args.prompt_len}, {args.new_tokens} new tokens, policy {args.policy}")
    print(f"{mode}; warm-up (compilation, autotuning) timed apart from the steady-state rates")
    if device.type == "cuda" and not args.compile:
        print("note: --cache static --compile captures each decode step in a CUDA graph (docs/generation.md)")
    runs = []
    for name, impl in (("moba", "moba"), ("dense", "sdpa")):
        model.set_attn_implementation(impl)
        if name == "moba":
            attention.reset_report()  # the report lists the timed run's decisions (the warm-up's are the same)
        runs.append(timed_run(name, model, ids, args, not args.no_progress))
        torch._dynamo.reset()  # the dense run compiles its own step
    print(attention.report())
    print(
        f"{'attention':<10}{'prefill tok/s':>16}{'decode tok/s':>16}{'prefill s':>12}{'decode s':>12}{'warm-up s':>12}"
    )
    for run in runs:
        pre, dec = run.rates(args.batch, args.prompt_len)
        print(f"{run.name:<10}{pre:>16.1f}{dec:>16.1f}{run.prefill_s:>12.3f}{run.decode_s:>12.3f}{run.warmup_s:>12.3f}")
    moba, dense = runs
    (mp, md), (dp, dd) = moba.rates(args.batch, args.prompt_len), dense.rates(args.batch, args.prompt_len)
    agree = (moba.tokens == dense.tokens).float().mean().item()
    print(
        f"MoBA / dense: prefill {mp / dp:.2f}x, decode {md / dd:.2f}x (steady state, after the warm-up); "
        f"generated tokens agreeing: {agree:.0%}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
