"""Run a Hugging Face transformers causal LM with MoBA attention through ``torch.compile(backend="moba")``.

Run from the repository root (transformers needed: ``pip install -e '.[hf]'``; nothing is downloaded):

    python examples/convert_hf.py tiny-llama --policy examples/policies/scaling_law.toml --seq-len 2048
    python examples/convert_hf.py path/to/config.json --policy my_policy.toml --dtype bfloat16
    python examples/convert_hf.py path/to/checkpoint_dir --policy my_policy.toml --mask-form

``CONFIG_OR_CHECKPOINT`` is a built-in tiny preset (``tiny-llama``, ``tiny-qwen2``, ``tiny-mistral``; the same as
``moba-compile explain --hf-config``), a ``config.json`` (random weights), or a local model directory (its weights are
loaded with ``from_pretrained`` when it has any, else random weights). Without moba-compile installed, prefix the
command with ``PYTHONPATH=.``.

It prints the per-layer report (``moba_compile.explain``), compiles the model with the policy, runs one prefill of
``--seq-len`` random tokens, and prints the logits' shape and their difference from the uncompiled model (dense SDPA).
With ``--mask-form`` the model is called with ``use_cache=False`` and an all-ones ``attention_mask``: transformers then
hands SDPA a boolean mask and ``repeat_kv``-repeated key/value instead of ``is_causal=True``; both forms convert.
Exit status 2 on a missing file or a bad policy, with a one-line message.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import moba_compile
from moba_compile.hf.models import CliError, build_hf_model, hf_example_inputs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: ``CONFIG_OR_CHECKPOINT --policy FILE [--seq-len N] [--dtype ...] [--mask-form] [...]``."""
    parser = argparse.ArgumentParser(description="Run a transformers causal LM with MoBA attention via torch.compile.")
    parser.add_argument(
        "model",
        metavar="CONFIG_OR_CHECKPOINT",
        help="tiny-llama, tiny-qwen2, tiny-mistral, a config.json, or a local model directory",
    )
    parser.add_argument("--policy", required=True, metavar="FILE", help="policy file (.toml or .json)")
    parser.add_argument("--seq-len", type=int, default=256, metavar="N", help="prefill length (256)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="parameter dtype (float32)")
    parser.add_argument("--mask-form", action="store_true", help="use_cache=False and an all-ones attention_mask")
    parser.add_argument(
        "--compiler",
        choices=("inductor", "aot_eager", "eager"),
        default="inductor",
        help="what compiles the rewritten graph (inductor)",
    )
    args = parser.parse_args(argv)
    if args.seq_len < 1:
        parser.error(f"--seq-len must be >= 1, got {args.seq_len}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Load, explain, compile and run the model; return the exit status (0, or 2 for a user error)."""
    args = parse_args(argv)
    try:
        policy = moba_compile.load_policy(args.policy)
        model, what = build_hf_model(args.model, dtype=DTYPES[args.dtype], load_weights=True)
    except (CliError, moba_compile.PolicyError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    inputs, kwargs = hf_example_inputs(model, seq_len=args.seq_len, mask_form=args.mask_form)
    print(f"model: {what}")

    report = moba_compile.explain(model, *inputs, policy=policy, **kwargs)
    print(report)
    print()

    compiled = torch.compile(model, backend="moba", options={"policy": policy, "compiler": args.compiler})
    start = time.perf_counter()
    with torch.no_grad():
        logits = compiled(*inputs, **kwargs).logits
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        dense = model(*inputs, **kwargs).logits  # uncompiled: dense SDPA in every layer

    diff = (logits.float() - dense.float()).abs()
    print(f"prefill of {args.seq_len} tokens, compiled with {args.compiler} and run in {elapsed:.1f} s")
    print(f"logits: {list(logits.shape)} {str(logits.dtype).replace('torch.', '')}")
    print(f"difference from the uncompiled model: max {diff.max().item():.4g}, mean {diff.mean().item():.4g}")
    if report.moba_sites and all(args.seq_len <= s.chunk_size * s.topk for s in report.moba_sites):
        print("(the sequence fits in chunk_size * topk chunks in every MoBA layer, so MoBA equals dense attention)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
