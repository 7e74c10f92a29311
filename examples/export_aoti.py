"""Export a causal LM, rewrite its attention to MoBA with a policy file, compile it with AOTInductor, load and run it.

Steps (each printed):

1. ``torch.export.export`` of a transformers causal LM (a preset built from a config, or a local checkpoint), the
   sequence length dynamic (``torch.export.Dim``);
2. ``moba_compile.export.apply`` with the policy: the report says which layers run MoBA;
3. ``torch._inductor.aoti_compile_and_package``: one ``.pt2`` file (on CUDA the MoBA calls run the Triton kernels, on
   the CPU the op's reference implementation);
4. ``torch._inductor.aoti_load_package`` (after ``import moba_compile``, which registers the ``moba::`` ops the
   package calls), then greedy decoding with the package, re-running the whole sequence per token (the exported model
   has no KV cache), compared token by token with the same model run eagerly with MoBA attention
   (``attn_implementation="moba"``), and the first step's logits compared with the rewritten program run eagerly.

Run (CPU, small; compiling the package takes about a minute on two cores):

    python examples/export_aoti.py --model tiny-llama --prompt-len 1100 --new-tokens 4 \\
        --policy examples/policies/scaling_law.toml

On a GPU: ``--device cuda --prompt-len 8192``; ``--package model.pt2`` keeps the package.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

import moba_compile
import moba_compile.export
import moba_compile.hf
from moba_compile.hf.models import CliError, build_hf_model


@torch.no_grad()
def greedy(forward, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_tokens`` greedy tokens, each from a forward of the whole sequence so far; also the first step's logits.

    Args:
        forward: ``forward(ids) -> logits [B, L, vocab]``.
        ids: ``[B, L]`` prompt token ids.
        new_tokens: how many tokens to generate.

    Returns:
        ``(tokens [B, new_tokens], first logits [B, L, vocab])``.
    """
    tokens, first = [], None
    for _ in range(new_tokens):
        logits = forward(ids)
        first = logits if first is None else first
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        ids = torch.cat([ids, token], dim=1)
    return torch.cat(tokens, dim=1), first


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, export, rewrite, package, load and run; print what each step gave.

    Returns:
        0 when the package's greedy tokens equal the eager MoBA model's; 1 when they differ; 2 for a bad policy or
        model argument (a one-line message on stderr).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="preset name, config.json, or checkpoint directory")
    parser.add_argument("--policy", default=None, help="policy file (default: the built-in default policy)")
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--package", default=None, help="where to write the .pt2 (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.new_tokens < 1 or args.prompt_len < 2:
        parser.error("--prompt-len must be >= 2 and --new-tokens >= 1")
    try:
        # The policy first: a bad one is reported in one line before the model is built, not as a traceback.
        policy = moba_compile.load_policy(args.policy)
        model, what = build_hf_model(args.model, dtype=getattr(torch, args.dtype), load_weights=True)
    except (CliError, moba_compile.PolicyError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    model.to(device)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_len), generator=gen).to(device)
    print(f"{what}; prompt {args.prompt_len} tokens, {args.new_tokens} new, policy {args.policy}, device {device}")

    # 1-2. Export (the sequence length dynamic) and rewrite. use_cache=False: no KV cache in the exported graph.
    # Dim.DYNAMIC rather than a named Dim("seq", max=...): torch 2.11 cannot prove a stride guard of transformers'
    # attention for every length of a named range and refuses the export (docs/export.md).
    seq = torch.export.Dim.DYNAMIC
    start = time.perf_counter()
    program, report = moba_compile.export.export(
        model, (ids,), {"use_cache": False}, dynamic_shapes={"input_ids": {1: seq}, "use_cache": None}, policy=policy
    )
    print(f"exported and rewritten in {time.perf_counter() - start:.1f}s")
    print(report)

    # 3. Package ahead of time.
    with tempfile.TemporaryDirectory() as tmp:
        path = args.package or os.path.join(tmp, "moba_model.pt2")
        start = time.perf_counter()
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(program, package_path=path)
        print(f"AOTInductor package {path}: compiled in {time.perf_counter() - start:.1f}s")

        # 4. Load and run. `import moba_compile` (above) registered the moba:: ops the package calls.
        runner = torch._inductor.aoti_load_package(path)
        packaged, packaged_first = greedy(lambda x: runner(x, use_cache=False).logits, ids, args.new_tokens)

    rewritten = program.module()
    _, program_first = greedy(lambda x: rewritten(x, use_cache=False).logits, ids, 1)
    moba_compile.hf.register(policy, name="moba")
    model.set_attn_implementation("moba")
    eager, _ = greedy(lambda x: model(x, use_cache=False).logits, ids, args.new_tokens)
    diff = (packaged_first.float() - program_first.float()).abs().max().item()
    print(f"package vs rewritten program (eager): max |logits difference| {diff:.2e}")
    print(f"package tokens:    {packaged[0].tolist()}")
    print(f"eager MoBA tokens: {eager[0].tolist()}")
    same = torch.equal(packaged, eager)
    print("greedy tokens: " + ("the same" if same else "DIFFERENT"))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
