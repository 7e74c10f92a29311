"""Continued training of a small causal LM with MoBA attention through ``torch.compile(backend="moba")``.

Run from the repository root (CPU is enough for the tiny settings: about 10 s, most of it compilation):

    python examples/train.py --steps 3 --seq-len 128
    python examples/train.py --model tiny-qwen2 --policy my_policy.toml --steps 200 --seq-len 4096 --dtype bfloat16
    python examples/train.py --model gpt --steps 50 --seq-len 1024
    python examples/train.py --model path/to/checkpoint_dir --byte-offset 3 --steps 100 --seq-len 8192
    python examples/train.py --pack --steps 3 --seq-len 128 --min-doc 16 --max-doc 96

What it does:

1. builds the model: ``--model`` is a tiny Hugging Face preset (``tiny-llama``, ``tiny-qwen2``, ``tiny-mistral``; the
   presets of ``moba-compile explain --hf-config``), a ``config.json`` (random weights), a local checkpoint directory
   (its weights are loaded when it has any), or ``gpt``, the byte-level GPT of ``examples/reproduce`` (4 layers,
   width 128, 4 heads, random weights);
2. loads the policy (``--policy``, default ``examples/policies/hybrid.toml``: MoBA with chunk 2048 and top-3, the last
   3 layers dense) and sets its ``num_layers`` to the model's when the file leaves it unset;
3. trains on the offline corpus of ``examples/reproduce`` (the bytes of the Python standard library's ``.py`` files,
   batches a pure function of ``(--seed, step)``) with AdamW at a constant ``--lr``, the model compiled by
   ``torch.compile(model, backend="moba", options={"policy": ..., "compiler": --compiler})``; a tqdm progress bar on
   stderr, the loss every ``--log-every`` steps and the backend's per-layer report on stdout;
4. restores the initial weights and trains ``--dense-steps`` steps on the same batches, compiled through the same
   backend with a policy that keeps every layer dense, and prints both step times (median of the steps after the
   first, which compiles) and their ratio. Two dense baselines with ``--dense-sdpa flash_when_causal`` (the default):
   SDPA as transformers runs it (on torch 2.11 a masked kernel on repeated key/value), and flash attention wherever
   the mask is exactly causal (the policy's ``dense_sdpa = "flash_when_causal"``, which the MoBA run's dense layers
   use too; docs/semantics.md, "Dense layers at full speed"); ``--dense-sdpa as_is`` runs the first only and leaves
   the MoBA run's dense layers as transformers runs them;
5. checks that the MoBA op really ran: ``moba_compile.ops.CALLS`` grew for ``attention`` and ``attention_backward``
   during the MoBA run, and did not grow during the dense run.

``--pack`` trains on packed documents instead (a Hugging Face model only): each step is one row of ``--batch *
--seq-len`` tokens holding documents of ``[--min-doc, --max-doc]`` tokens back to back (windows of the corpus), with
position ids restarting at 0 at every document, as ``DataCollatorWithFlattening`` gives them, and no label across a
document boundary. transformers then builds the block-diagonal causal mask, and MoBA runs on every document on its
own (docs/semantics.md, "Packed sequences"); the check also requires that document-aware MoBA ran
(``ops.CALLS["attention:packed:*"]``). The dense run trains on the same packed rows with SDPA and that mask.

Tokens: the corpus is bytes. A byte ``b`` becomes the token id ``b + --byte-offset`` (default 0), which needs a
vocabulary of at least ``256 + offset`` ids (the tiny presets have 512). That is not a checkpoint's own tokenizer: on a
real checkpoint, continued training on these ids teaches it a new byte-level code. ``--byte-offset 3`` maps bytes onto
the ``<0x00>``..``<0xFF>`` byte-fallback tokens of Llama-2/Mistral-style SentencePiece vocabularies, whose ids start
at 3. Hugging Face models get ``labels=input_ids`` (transformers shifts them, so the last position of each sequence
predicts nothing); the GPT predicts every next byte.

``--dtype bfloat16`` trains under ``torch.autocast`` in bfloat16 with float32 weights and optimizer states. (Call the
transformers model with its default ``use_cache``, as here: with ``use_cache=False`` under autocast, its rotary
embedding hands SDPA float32 query/key with a bfloat16 value, and the backend leaves such sites dense; see
``docs/training.md``.)

Exit status: 0 on success; 1 when the MoBA op did not run, the dense run ran it, or a loss is not finite; 2 on a bad
argument, a missing file or a malformed policy (one-line message). ``examples/train_distributed.py`` trains the same
model under DDP or FSDP2; what both share (model, options, batches, training loop, MoBA op counts) is in
``examples/_training.py``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # `python examples/train.py` from a checkout: examples.* live at the root
    sys.path.insert(0, str(_REPO))

import moba_compile  # noqa: E402
from examples import _training as training  # noqa: E402
from examples.reproduce import corpus as corpus_mod  # noqa: E402
from moba_compile.backend import collect_reports  # noqa: E402
from moba_compile.cli import CliError  # noqa: E402

__all__ = ["main"]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Continued training of a small causal LM with MoBA attention via torch.compile(backend='moba'), "
        "timed against the same model with every layer dense."
    )
    training.add_common_args(parser)
    parser.add_argument(
        "--dense-steps",
        type=int,
        default=0,
        metavar="N",
        help="steps of the all-dense timing run (min(--steps, 10)); at least 2",
    )
    parser.add_argument(
        "--dense-sdpa",
        choices=moba_compile.policy.DENSE_SDPA,
        default="flash_when_causal",
        help="the policy's dense_sdpa for the MoBA run's dense layers; flash_when_causal (default) also times the "
        "flash-causal dense baseline next to the masked one",
    )
    parser.add_argument(
        "--pack", action="store_true", help="train on packed documents (one row of batch * seq-len tokens per step)"
    )
    parser.add_argument("--min-doc", type=int, default=0, metavar="N", help="--pack: shortest document (seq-len/8)")
    parser.add_argument("--max-doc", type=int, default=0, metavar="N", help="--pack: longest document (seq-len)")
    args = parser.parse_args(argv)
    training.check_common_args(parser, args)
    if args.pack:
        args.min_doc = args.min_doc or max(1, args.seq_len // 8)
        args.max_doc = args.max_doc or args.seq_len
        if not 1 <= args.min_doc <= args.max_doc:
            parser.error(f"--min-doc and --max-doc must satisfy 1 <= min <= max, got {args.min_doc}, {args.max_doc}")
    elif args.min_doc or args.max_doc:
        parser.error("--min-doc and --max-doc need --pack")
    if args.steps < 2:
        parser.error(
            f"--steps must be >= 2 (the first step compiles; the step time is taken after it), got {args.steps}"
        )
    if args.dense_steps == 0:
        args.dense_steps = min(args.steps, 10)
    if args.dense_steps < 2:
        parser.error(f"--dense-steps must be >= 2, got {args.dense_steps}")
    return args


def _dense_branches() -> dict[str, int]:
    """The executions of ``moba::dense_attention`` so far, by branch (``ops.CALLS``: ``dense_attention:flash``, ...)."""
    return {k: n for k, n in moba_compile.ops.CALLS.items() if k.startswith("dense_attention")}


def _compile(lm: training.CausalLM, policy: moba_compile.Policy | dict[str, Any], compiler: str) -> Callable[..., Any]:
    torch._dynamo.reset()  # no graph of the other run is reused
    return torch.compile(lm.module, backend="moba", options={"policy": policy, "compiler": compiler})


def main(argv: list[str] | None = None) -> int:
    """Train with MoBA, time the all-dense baseline, check that MoBA ran; return the exit status.

    Args:
        argv: the command line without the program name (default ``sys.argv[1:]``).

    Returns:
        0 on success; 1 when the MoBA op did not run (or ran in the dense run) or a loss is not finite; 2 on a user
        error (bad model, missing file, malformed policy).
    """
    args = _parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        lm, policy = training.build(args)
    except (CliError, moba_compile.PolicyError) as err:
        return training.user_error(err)
    if args.pack and not lm.hf:
        return training.user_error(CliError("--pack needs a Hugging Face model (position ids); the GPT has none"))
    policy = dataclasses.replace(policy, dense_sdpa=args.dense_sdpa)
    corpus = corpus_mod.load_corpus()
    lm.module.to(device)
    training.describe(lm, policy)
    layout = (
        f"packed rows of {args.batch * args.seq_len} tokens (documents of {args.min_doc}-{args.max_doc})"
        if args.pack
        else f"batch {args.batch} x {args.seq_len} tokens"
    )
    print(
        f"device: {device}, compiler: {args.compiler}, dtype: {args.dtype}, {layout}, "
        f"corpus: {corpus.train.numel():,} bytes of Python {corpus.python} stdlib sources"
    )
    initial = {k: v.detach().to("cpu", copy=True) for k, v in lm.module.state_dict().items()}

    # The MoBA run.
    fn = _compile(lm, policy, args.compiler)
    optimizer = training.make_optimizer(lm.module, args.lr)
    before = training.moba_counts()
    packed_before = training.packed_counts()
    with collect_reports() as reports:
        moba = training.train_steps(lm, fn, optimizer, corpus, args, steps=args.steps, tag="moba", device=device)
    fwd, bwd = (after - prior for after, prior in zip(training.moba_counts(), before))
    packed_docs = training.packed_counts() - packed_before
    training.print_reports(reports, "per-layer decisions of the MoBA run (backend report):")
    moba_sites = [s for r in reports for s in r.moba_sites]
    longest = args.max_doc if args.pack else args.seq_len
    if moba_sites and all(longest <= s.chunk_size * s.topk for s in moba_sites):
        print(
            f"note: {args.seq_len} tokens fit in chunk_size * topk in every MoBA layer, so MoBA selects every chunk "
            "and equals dense attention here; use a longer --seq-len or a policy with a smaller chunk_size to train "
            "sparse attention"
        )

    # The dense baseline: the same initial weights and batches, every layer dense, through the same backend.
    del optimizer, fn
    lm.module.load_state_dict(initial)
    fn = _compile(lm, copy.deepcopy(training.DENSE_POLICY), args.compiler)
    optimizer = training.make_optimizer(lm.module, args.lr)
    before_dense = training.moba_counts()
    dense = training.train_steps(lm, fn, optimizer, corpus, args, steps=args.dense_steps, tag="dense", device=device)
    dense_calls = sum(after - prior for after, prior in zip(training.moba_counts(), before_dense))

    # The second dense baseline: every layer dense, flash wherever the mask is exactly causal (dense_sdpa).
    flash = None
    if args.dense_sdpa == "flash_when_causal":
        del optimizer, fn
        lm.module.load_state_dict(initial)
        fn = _compile(lm, {**copy.deepcopy(training.DENSE_POLICY), "dense_sdpa": args.dense_sdpa}, args.compiler)
        optimizer = training.make_optimizer(lm.module, args.lr)
        before_flash, branches_before = training.moba_counts(), _dense_branches()
        flash = training.train_steps(
            lm, fn, optimizer, corpus, args, steps=args.dense_steps, tag="dense-flash", device=device
        )
        dense_calls += sum(after - prior for after, prior in zip(training.moba_counts(), before_flash))
        flash_branches = {k: n - branches_before.get(k, 0) for k, n in _dense_branches().items()}

    moba_time, dense_time = moba.step_time(), dense.step_time()
    print(
        f"MoBA step time: {moba_time:.4f} s (median of {len(moba.times) - 1} steps after the first, "
        f"which compiled in {moba.times[0]:.2f} s)"
    )
    print(
        f"dense step time: {dense_time:.4f} s (median of {len(dense.times) - 1} steps after the first, "
        f"which compiled in {dense.times[0]:.2f} s; SDPA as transformers runs it)"
    )
    if flash is not None:
        flash_time = flash.step_time()
        ran = ", ".join(f"{k} x{n}" for k, n in sorted(flash_branches.items()) if n) or "none: no masked SDPA call"
        print(
            f"dense (flash causal) step time: {flash_time:.4f} s (median of {len(flash.times) - 1} steps after the "
            f"first, which compiled in {flash.times[0]:.2f} s; dense_sdpa = 'flash_when_causal', ran {ran})"
        )
    print(f"MoBA/dense step time ratio: {moba_time / dense_time:.3f}")
    if flash is not None:
        print(f"MoBA/dense (flash causal) step time ratio: {moba_time / flash_time:.3f}")
    shared = min(len(moba.losses), len(dense.losses))
    print(
        f"loss after {shared} steps: MoBA {moba.losses[shared - 1]:.4f}, dense {dense.losses[shared - 1]:.4f} "
        "(same initial weights and batches)"
    )
    print(
        f"MoBA op executions in the MoBA run: attention x{fwd}, attention_backward x{bwd} "
        f"({training.moba_implementations()})"
    )

    if args.pack:
        print(f"document-aware MoBA in the MoBA run: {packed_docs} (layer, document) forward executions")
    status = 0
    if args.pack and packed_docs == 0:
        print(
            "FAILED: --pack, but document-aware MoBA never ran (ops.CALLS['attention:packed:*'] did not grow): the "
            "packed rows' block-diagonal mask was not recognised",
            file=sys.stderr,
        )
        status = 1
    if not all(math.isfinite(x) for x in moba.losses + dense.losses):
        print("FAILED: a loss is not finite", file=sys.stderr)
        status = 1
    if fwd == 0 or bwd == 0:
        print(
            "FAILED: moba_compile.ops.CALLS did not grow for attention and attention_backward: the MoBA op never ran "
            "(the report above gives each layer's reason: a policy converting no layer, attention dropout in training "
            "mode, ...; or Dynamo fell back to eager)",
            file=sys.stderr,
        )
        status = 1
    if dense_calls:
        print(f"FAILED: the all-dense run executed the MoBA op {dense_calls} times", file=sys.stderr)
        status = 1
    if status == 0:
        print(f"OK: MoBA ran in {len(moba_sites)} of {lm.num_layers} layers, forward and backward")
    return status


if __name__ == "__main__":
    sys.exit(main())
