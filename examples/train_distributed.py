"""Train the ``examples/train.py`` model with MoBA attention under DDP or FSDP2, and check it against one process.

Run from the repository root with torchrun (NCCL on CUDA, one GPU per process; gloo on the CPU):

    torchrun --nproc-per-node 2 examples/train_distributed.py --mode ddp --steps 3 --seq-len 128 --batch 4
    torchrun --nproc-per-node 2 examples/train_distributed.py --mode fsdp2 --steps 3 --seq-len 128 --batch 4
    python examples/train_distributed.py --mode single --batch 16 --seq-len 8192 --save-losses training.json ...
    torchrun --nproc-per-node 8 examples/train_distributed.py --mode fsdp2 --batch 16 --seq-len 8192 \
        --reference training.json ...

The options are those of ``examples/train.py`` (``--steps``, ``--seq-len``, ``--lr``, ``--policy``, ``--model``,
``--dtype``, ``--device``, ``--compiler``, ``--seed``, ...), except that ``--batch`` is the global batch. Every step
trains on a fixed global batch of ``--batch`` sequences (a pure function of ``(--seed, step)``, the batches of
``examples/train.py``); rank ``r`` of ``W`` takes rows ``[r * B / W, (r + 1) * B / W)``. Each rank's loss is the mean
over its rows and both wrappers average gradients over ranks, so a step equals one step of a single process on the
whole global batch (up to the order of floating-point sums). The logged loss of a step is the average over ranks.

- ``--mode ddp``: the model is compiled whole (``model.compile(backend="moba", options=...)``, so Dynamo sees every
  layer in one graph with its module path), then wrapped in ``torch.nn.parallel.DistributedDataParallel``.
  ``--dtype bfloat16`` runs the forward under ``torch.autocast``.
- ``--mode fsdp2``: every decoder layer is compiled on its own and sharded with ``torch.distributed.fsdp.fully_shard``,
  then the root is sharded; the embedding, final norm, LM head and loss run eagerly. FSDP2's hooks are excluded from
  Dynamo, so compiling the whole sharded model would break the graph at every layer, and a layer's graph carries module
  paths relative to the layer (``self_attn``): the backend could not tell which layer it is. So the layers are
  compiled by ``moba_compile.compile_blocks``, which gives each layer the decision the policy makes for its full path
  (``model.layers.N.self_attn``); layers with the same decision share one backend, hence one compiled graph.
  Transformers models are called with ``use_cache=False`` here: a KV cache in a layer's inputs would make Dynamo
  compile every layer anew. ``--dtype bfloat16`` uses FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16,
  reduce_dtype=float32)`` instead of autocast.
- ``--mode single``: no distribution: one process trains the global batch (the reference); with ``--save-losses FILE``
  its per-step losses are written to a JSON file for a later ``--reference FILE``.

At the end, rank 0 compares the per-step losses with a single-process run of the same global batch: by default it
trains one itself, after the distributed run (the process group is gone by then; the other ranks have exited), with
``torch.compile`` of the whole model as in ``examples/train.py``; with ``--reference FILE`` it reads the losses of an
earlier ``--mode single`` run (same model, policy, steps, lengths, batch, learning rate, seed, dtype and byte offset
required). Tolerance: ``|distributed - single| <= rtol * |single|`` at every step, ``rtol`` 1e-4 in float32 (gradient
all-reduce and per-shard means sum in another order than one process; observed on the CPU: below 2e-7) and 5e-3 in
bfloat16 (where the reference runs autocast and FSDP2 its own mixed precision; observed on the CPU: 2e-4), or
``--rtol``. Every rank also checks that the MoBA op ran (``moba_compile.ops.CALLS`` grew for ``attention`` and
``attention_backward``).

Exit status: 0 when the losses agree; 1 when they differ beyond the tolerance, a loss is not finite, or the MoBA op did
not run; 2 on a user error (bad argument, missing file, malformed policy, not started by torchrun).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # `torchrun examples/train_distributed.py` from a checkout
    sys.path.insert(0, str(_REPO))

import moba_compile  # noqa: E402
from examples import _training as training  # noqa: E402
from examples.reproduce import corpus as corpus_mod  # noqa: E402
from moba_compile.backend import collect_reports  # noqa: E402
from moba_compile.cli import CliError  # noqa: E402

__all__ = [
    "MODES",
    "RTOL",
    "compare_losses",
    "main",
    "run_reference",
    "setup_fsdp2",
    "train_distributed",
]

MODES = ("ddp", "fsdp2", "single")
#: Default relative tolerance of the loss comparison per ``--dtype`` (see the module docstring).
RTOL = {"float32": 1e-4, "bfloat16": 5e-3}
_LOSSES_FORMAT = 1


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a causal LM with MoBA attention under DDP or FSDP2 (torchrun) and compare the per-step "
        "losses with a single process on the same global batch."
    )
    parser.add_argument("--mode", choices=MODES, required=True, help="ddp, fsdp2, or single (no distribution)")
    training.add_common_args(parser, batch_help="global batch: sequences per step over all ranks (%(default)s)")
    parser.set_defaults(batch=4, steps=5, seq_len=256)
    parser.add_argument("--reference", metavar="FILE", help="compare with the losses a --mode single run saved")
    parser.add_argument("--save-losses", metavar="FILE", help="write this run's per-step losses (JSON)")
    parser.add_argument("--rtol", type=float, default=None, help="relative tolerance (1e-4 float32, 5e-3 bfloat16)")
    args = parser.parse_args(argv)
    training.check_common_args(parser, args)
    if args.rtol is None:
        args.rtol = RTOL[args.dtype]
    if args.rtol < 0:
        parser.error(f"--rtol must be >= 0, got {args.rtol}")
    if args.mode == "single" and args.reference:
        parser.error("--reference compares a distributed run; --mode single is the reference")
    return args


def _settings(args: argparse.Namespace, policy: moba_compile.Policy) -> dict[str, Any]:
    """What must agree between a distributed run and the single-process run it is compared with."""
    return {
        "model": args.model,
        "policy": policy.to_dict(),
        "steps": args.steps,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "dtype": args.dtype,
        "byte_offset": args.byte_offset,
    }


def _moba_ran(before: tuple[int, int], where: str) -> bool:
    fwd, bwd = (after - prior for after, prior in zip(training.moba_counts(), before))
    if fwd and bwd:
        return True
    print(
        f"FAILED ({where}): moba_compile.ops.CALLS grew by attention x{fwd}, attention_backward x{bwd}: the MoBA op "
        "did not run forward and backward (does the policy convert any layer?)",
        file=sys.stderr,
    )
    return False


def run_reference(
    args: argparse.Namespace,
    lm: training.CausalLM,
    policy: moba_compile.Policy,
    corpus: corpus_mod.Corpus,
    device: torch.device,
) -> tuple[list[float], bool]:
    """Train the single-process reference: the whole model compiled as in ``examples/train.py``, the global batch.

    Args:
        args: the parsed command line. lm: a freshly built model (the same initial weights as the distributed run's).
        policy: the training policy. corpus: the training corpus. device: where to train.

    Returns:
        ``(losses, moba_ran)``: the per-step losses, and whether the MoBA op ran forward and backward.
    """
    torch._dynamo.reset()  # nothing compiled for the distributed run is reused
    lm.module.to(device)
    fn = torch.compile(lm.module, backend="moba", options={"policy": policy, "compiler": args.compiler})
    optimizer = training.make_optimizer(lm.module, args.lr)
    before = training.moba_counts()
    with collect_reports() as reports:
        log = training.train_steps(lm, fn, optimizer, corpus, args, steps=args.steps, tag="single", device=device)
    training.print_reports(reports, "per-layer decisions of the single-process run (backend report):")
    return log.losses, _moba_ran(before, "single-process run")


def setup_fsdp2(lm: training.CausalLM, device: torch.device, world: int, dtype: torch.dtype) -> None:
    """Shard ``lm`` with FSDP2: ``fully_shard`` on every decoder layer, then on the root module.

    Args:
        lm: the model (layers already compiled by :func:`moba_compile.compile_blocks`), on ``device``.
        device: this rank's device (its type names the device mesh). world: the number of ranks.
        dtype: ``torch.bfloat16`` for FSDP2 mixed precision (parameters all-gathered and computed in bfloat16,
            gradients reduced in float32, float32 sharded weights); ``torch.float32`` for none.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
    kwargs: dict[str, Any] = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    for block in lm.blocks:
        fully_shard(block, **kwargs)
    fully_shard(lm.module, **kwargs)


def compare_losses(distributed: list[float], reference: list[float], rtol: float) -> bool:
    """Print the per-step losses side by side and say whether they agree within ``rtol``.

    Args:
        distributed: the distributed run's losses. reference: the single-process run's. rtol: the relative tolerance.

    Returns:
        True when both have the same length, every loss is finite and ``|d - s| <= rtol * |s|`` at every step.
    """
    print(f"{'step':>4}  {'distributed':>12}  {'single':>12}  {'rel. diff':>10}")
    ok = len(distributed) == len(reference)
    worst = 0.0
    for step, (d, s) in enumerate(zip(distributed, reference), start=1):
        rel = abs(d - s) / abs(s) if s else abs(d - s)
        finite = math.isfinite(d) and math.isfinite(s)
        ok = ok and finite and rel <= rtol
        worst = max(worst, rel) if finite else math.inf
        print(f"{step:>4}  {d:>12.6f}  {s:>12.6f}  {rel:>10.2e}")
    verdict = "agree" if ok else "DIFFER"
    print(f"losses {verdict}: max relative difference {worst:.2e}, tolerance {rtol:.0e} ({len(distributed)} steps)")
    return ok


def _save_losses(path: str, settings: dict[str, Any], losses: list[float], mode: str, world: int) -> None:
    data = {"format": _LOSSES_FORMAT, "mode": mode, "world_size": world, "settings": settings, "losses": losses}
    Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _load_reference(path: str, settings: dict[str, Any]) -> list[float]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CliError(f"{path}: cannot read the reference losses: {err}") from None
    if not isinstance(data, dict) or data.get("format") != _LOSSES_FORMAT or "losses" not in data:
        raise CliError(f"{path}: not a losses file written by --save-losses")
    if data.get("settings") != settings:
        theirs = data.get("settings") or {}
        changed = sorted(k for k in set(settings) | set(theirs) if settings.get(k) != theirs.get(k))
        raise CliError(f"{path}: recorded with other settings ({', '.join(changed)}); rerun --mode single")
    return [float(x) for x in data["losses"]]


def _single_main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    try:
        lm, policy = training.build(args)
    except (CliError, moba_compile.PolicyError) as err:
        return training.user_error(err)
    corpus = corpus_mod.load_corpus()
    training.describe(lm, policy)
    print(
        f"single process on {device}, compiler: {args.compiler}, dtype: {args.dtype}, "
        f"batch {args.batch} x {args.seq_len} tokens"
    )
    losses, ran = run_reference(args, lm, policy, corpus, device)
    if args.save_losses:
        _save_losses(args.save_losses, _settings(args, policy), losses, "single", 1)
        print(f"losses written to {args.save_losses}")
    finite = all(math.isfinite(x) for x in losses)
    if not finite:
        print("FAILED: a loss is not finite", file=sys.stderr)
    return 0 if ran and finite else 1


def _rank_device(args: argparse.Namespace, local_rank: int) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    return device


def train_distributed(
    args: argparse.Namespace,
    lm: training.CausalLM,
    policy: moba_compile.Policy,
    corpus: corpus_mod.Corpus,
    device: torch.device,
    rank: int,
    world: int,
) -> tuple[list[float], bool]:
    """This rank's part of the DDP or FSDP2 run, from ``init_process_group`` to ``destroy_process_group``.

    Args:
        args: the parsed command line (``mode`` ``"ddp"`` or ``"fsdp2"``). lm: the model, on ``device``.
        policy: the training policy (``num_layers`` set). corpus: the training corpus. device: this rank's device.
        rank, world: this rank and the number of ranks.

    Returns:
        ``(losses, moba_ran)``: the per-step losses averaged over ranks, and whether the MoBA op ran forward and
        backward on this rank.
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    lead = rank == 0
    if lead:
        training.describe(lm, policy)
        print(
            f"{args.mode} on {world} ranks ({backend}, {device.type}), compiler: {args.compiler}, dtype: {args.dtype}, "
            f"global batch {args.batch} x {args.seq_len} tokens, {args.batch // world} sequences per rank"
        )
    fn: Callable[..., Any]
    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Compile first, then wrap: Dynamo sees the plain model (every layer with its module path in one graph).
        lm.module.compile(backend="moba", options={"policy": policy, "compiler": args.compiler})
        fn = DistributedDataParallel(lm.module, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        # Compile each layer on its own, before sharding: FSDP2's hooks keep Dynamo from seeing the whole model, and
        # compile_blocks gives each layer the decision the policy makes for its full path in the whole model.
        plan = moba_compile.compile_blocks(lm.module, policy, blocks=lm.blocks_path, compiler=args.compiler)
        lm.call_kwargs = {"use_cache": False}
        setup_fsdp2(lm, device, world, training.DTYPES[args.dtype])
        fn = lm.module
        if lead:
            graphs = len({block.group for block in plan})
            print(f"per-layer decisions (each layer compiled on its own; {graphs} distinct decisions):")
            for block in plan:
                path = lm.attention_path(block.layer)
                d = policy.decide(path, block.layer, lm.num_layers)
                what = f"moba chunk {d.chunk_size} topk {d.topk}" if d.mode == "moba" else "dense"
                print(f"  {path}: {what} ({d.reason})")
    optimizer = training.make_optimizer(lm.module, args.lr)

    def average(loss: Tensor) -> Tensor:
        total = loss.clone()
        dist.all_reduce(total)  # SUM: gloo has no AVG
        return total / world

    per_rank = args.batch // world
    before = training.moba_counts()
    with collect_reports() as reports:
        log = training.train_steps(
            lm,
            fn,
            optimizer,
            corpus,
            args,
            steps=args.steps,
            tag=args.mode,
            device=device,
            rows=slice(rank * per_rank, (rank + 1) * per_rank),
            reduce_loss=average,
            verbose=lead,
            use_autocast=args.mode == "ddp",  # FSDP2 casts through its MixedPrecisionPolicy
        )
    ran = _moba_ran(before, f"rank {rank}")
    if lead:
        training.print_reports(reports, f"per-layer decisions of the {args.mode} run on rank 0 (backend report):")
    # Teardown order matters with gloo: a DDP reducer that outlives destroy_process_group() holds the last reference
    # to the process group, and its destructor then joins gloo's worker threads while holding the GIL, which a worker
    # may need (seen here: rank 0 hung at exit). So drop the wrappers first, wait for every rank, then destroy.
    del fn, optimizer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return log.losses, ran


def main(argv: list[str] | None = None) -> int:
    """Run the distributed training (or the single-process reference) and compare; return the exit status.

    Args:
        argv: the command line without the program name (default ``sys.argv[1:]``).

    Returns:
        0 when the losses agree with the reference (or a ``--mode single`` run succeeded); 1 when they differ, a
        loss is not finite, or the MoBA op did not run; 2 on a user error.
    """
    args = _parse_args(argv)
    if args.mode == "single":
        return _single_main(args)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return training.user_error(
            CliError(f"--mode {args.mode} must be started by torchrun (RANK and WORLD_SIZE are not set)")
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if args.batch % world:
        return training.user_error(
            CliError(f"--batch {args.batch} (the global batch) is not divisible by {world} ranks")
        )
    device = _rank_device(args, local_rank)
    try:
        lm, policy = training.build(args)
        reference = _load_reference(args.reference, _settings(args, policy)) if args.reference and rank == 0 else None
    except (CliError, moba_compile.PolicyError) as err:
        return training.user_error(err)
    corpus = corpus_mod.load_corpus()
    lm.module.to(device)
    losses, ran = train_distributed(args, lm, policy, corpus, device, rank, world)
    del lm
    if rank != 0:
        return 0 if ran else 1
    if args.save_losses:
        _save_losses(args.save_losses, _settings(args, policy), losses, args.mode, world)
    if reference is None:
        print("single-process reference on rank 0 (the same global batches, no distribution):")
        fresh, _ = training.build(args)  # the same initial weights: the builders are seeded
        reference, reference_ran = run_reference(args, fresh, policy, corpus, device)
        ran = ran and reference_ran
    else:
        print(f"single-process reference: {args.reference}")
    agree = compare_losses(losses, reference, args.rtol)
    return 0 if agree and ran else 1


if __name__ == "__main__":
    sys.exit(main())
