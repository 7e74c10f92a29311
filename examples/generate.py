"""Long-prompt generation with MoBA versus dense attention: prefill and decode tokens per second.

The same model (a transformers causal LM built from a config, or a local checkpoint) runs twice: once with
``attn_implementation="moba"`` (``moba_compile.hf.register`` with a policy, and ``MobaCache`` so that decode steps
score cached chunk means), once with dense SDPA. Greedy decoding; the script reports prefill and decode throughput of
both and how many generated tokens agree (random weights make agreement a weak signal; on a trained checkpoint it is
the quality check).

Run (CPU, small):

    python examples/generate.py --model tiny-llama --prompt-len 1024 --new-tokens 16 \\
        --policy examples/policies/scaling_law.toml

On a GPU, e.g. a 1B-parameter config at 128K: ``--model path/to/config.json --prompt-len 131072 --dtype bfloat16``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

import moba_compile
import moba_compile.hf
from moba_compile.hf.models import CliError, build_hf_model

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


@dataclass
class Run:
    """Throughput and tokens of one generation."""

    name: str
    prefill_s: float
    decode_s: float
    tokens: torch.Tensor

    def rates(self, batch: int, prompt_len: int) -> tuple[float, float]:
        new = self.tokens.shape[1]
        return batch * prompt_len / self.prefill_s, batch * max(new - 1, 1) / max(self.decode_s, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, cache, name: str, progress: bool) -> Run:
    """Prefill ``ids`` once, then decode ``new_tokens`` greedily, timing the two phases apart.

    Args:
        model: a transformers causal LM. ids: ``[B, L]`` prompt token ids on the model's device.
        new_tokens: tokens to generate (>= 1). cache: a transformers cache object, filled in place (passed as
            ``cache=``, or ``past_key_values=`` on transformers versions before the rename).
        name: label for the progress bar. progress: show a tqdm bar when tqdm is installed.

    Returns:
        :class:`Run` with the prefill and decode wall times and the generated tokens ``[B, new_tokens]``.

    Example:
        >>> run = greedy(model, ids, 8, DynamicCache(), "dense", progress=False)  # doctest: +SKIP
    """
    device = ids.device
    with_cache = {moba_compile.hf.cache_keyword(): cache}
    _sync(device)
    start = time.perf_counter()
    out = model(ids, **with_cache, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill = time.perf_counter() - start
    tokens = [nxt]
    steps = range(new_tokens - 1)
    if progress and tqdm is not None:
        steps = tqdm(steps, desc=f"{name} decode", leave=False)
    start = time.perf_counter()
    for _ in steps:
        out = model(nxt, **with_cache, use_cache=True)  # the cache object is updated in place
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
    _sync(device)
    return Run(name, prefill, time.perf_counter() - start, torch.cat(tokens, dim=1))


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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.new_tokens < 1 or args.prompt_len < 1:
        parser.error("--prompt-len and --new-tokens must be >= 1")
    try:
        # The policy first: a bad one is reported in one line before minutes of model loading, not as a traceback.
        policy = moba_compile.load_policy(args.policy)
        model, what = build_hf_model(args.model, dtype=getattr(torch, args.dtype), load_weights=True)
    except (CliError, moba_compile.PolicyError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    from transformers import DynamicCache

    device = torch.device(args.device)
    model.to(device)
    attention = moba_compile.hf.register(policy, name="moba")
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=gen).to(device)
    print(f"{what}; prompt {args.batch} x {args.prompt_len}, {args.new_tokens} new tokens, policy {args.policy}")
    runs = []
    for name, impl, cache in (
        ("moba", "moba", moba_compile.hf.MobaCache()),
        ("dense", "sdpa", DynamicCache()),
    ):
        model.set_attn_implementation(impl)
        runs.append(greedy(model, ids, args.new_tokens, cache, name, not args.no_progress))
    print(attention.report())
    print(f"{'attention':<10}{'prefill tok/s':>16}{'decode tok/s':>16}{'prefill s':>12}{'decode s':>12}")
    for run in runs:
        pre, dec = run.rates(args.batch, args.prompt_len)
        print(f"{run.name:<10}{pre:>16.1f}{dec:>16.1f}{run.prefill_s:>12.3f}{run.decode_s:>12.3f}")
    moba, dense = runs
    (mp, md), (dp, dd) = moba.rates(args.batch, args.prompt_len), dense.rates(args.batch, args.prompt_len)
    agree = (moba.tokens == dense.tokens).float().mean().item()
    print(f"MoBA / dense: prefill {mp / dp:.2f}x, decode {md / dd:.2f}x; generated tokens agreeing: {agree:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
