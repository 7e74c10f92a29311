"""Train a Hugging Face causal LM with MoBA over sequences sharded across ranks (context parallelism), and check it
against one process training the same global sequences.

Run from the repository root with torchrun (gloo on the CPU, NCCL on CUDA with one GPU per process):

    torchrun --nproc-per-node 2 examples/train_context_parallel.py --steps 3 --seq-len 256
    torchrun --nproc-per-node 2 examples/train_context_parallel.py --fsdp --compile --steps 3 --seq-len 256
    torchrun --nproc-per-node 4 examples/train_context_parallel.py --dp 2 --fsdp --steps 3   # a 2 x 2 (dp, cp) mesh
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 torchrun --nproc-per-node 2 \\
        examples/train_context_parallel.py --device cuda --dtype bfloat16 --seq-len 65536 --chunk-size 1024 --topk 4

The ranks form a ``("dp", "cp")`` DeviceMesh: ``--dp`` data-parallel replicas, each sequence sharded over the
remaining ``world / dp`` ranks. Every step trains a fixed global batch of ``--batch`` random sequences of ``--seq-len``
tokens (a pure function of ``(--seed, step)``): replica ``d`` takes rows ``[d * B / dp, (d + 1) * B / dp)``, and
inside :func:`moba_compile.context_parallel.context_parallel` each rank of its sequence group keeps the contiguous
slice of every sequence, with the GLOBAL position ids and the labels shifted before sharding. The model runs
``attn_implementation="moba"`` (policy ``--chunk-size``, ``--topk``, ``--dense-last``): MoBA layers and the
policy's dense layers gather keys and values over the group. The loss is the token mean over the whole sequence
(``context_parallel_loss``). Gradients: without ``--fsdp`` they are summed over the sequence group
(``reduce_gradients``) and averaged over replicas; with ``--fsdp`` FSDP2 shards every decoder layer and the root over
the flattened ``dp x cp`` mesh, whose reduce-scatter averages over ``dp * cp`` ranks, so the loss is multiplied by
``cp`` before ``backward`` (sum over the group, mean over replicas). ``--compile`` compiles each decoder layer with
``backend="moba"`` (the model's forward, which builds positions and masks, stays eager). The optimiser is SGD.

At the end rank 0 trains the same steps in one process (the whole sequences, no distribution, the model's own loss)
and compares every step's loss and gradient norm: ``|cp - single| <= rtol * |single|``, ``rtol`` 1e-4 in float32
(sums in another order; observed on the CPU below 1e-6) and 2e-2 in bfloat16, or ``--rtol``.

Exit status: 0 when they agree; 1 when they differ or a value is not finite; 2 on a user error (bad argument, not
started by torchrun, a sequence length the ranks or chunks do not divide).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # `torchrun examples/train_context_parallel.py` from a checkout
    sys.path.insert(0, str(_REPO))

import moba_compile.hf  # noqa: E402
from moba_compile import context_parallel as cp  # noqa: E402
from moba_compile.hf.models import CliError, build_hf_model  # noqa: E402

RTOL = {"float32": 1e-4, "bfloat16": 2e-2}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="preset, config.json or model directory (%(default)s)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per (global) sequence (%(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="global batch: sequences per step (%(default)s)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas; cp = world / dp (%(default)s)")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--dense-last", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=tuple(RTOL), default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the flattened dp x cp mesh")
    parser.add_argument("--compile", action="store_true", help="compile each decoder layer with backend='moba'")
    parser.add_argument("--rtol", type=float, default=None)
    args = parser.parse_args(argv)
    for name in ("steps", "seq_len", "batch", "dp", "chunk_size", "topk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rtol is None:
        args.rtol = RTOL[args.dtype]
    return args


def _policy(args: argparse.Namespace) -> dict[str, Any]:
    return {"chunk_size": args.chunk_size, "topk": args.topk, "dense_last": args.dense_last}


def _batch(args: argparse.Namespace, vocab: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    return torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)


def _model(args: argparse.Namespace, device: torch.device, attention: str) -> torch.nn.Module:
    model, _ = build_hf_model(args.model, dtype=getattr(torch, args.dtype))  # random weights, seeded
    model.set_attn_implementation(attention)
    return model.to(device).train()


def _grad_norm(model: torch.nn.Module) -> float:
    total = 0.0
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            total += float(g.float().pow(2).sum())
    return math.sqrt(total)


def train_context_parallel(args: argparse.Namespace) -> list[tuple[float, float]]:
    """The distributed run: per step ``(loss, gradient norm)``, the same on every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % args.dp:
        raise CliError(f"--dp {args.dp} does not divide the world size {world}")
    cp_size = world // args.dp
    if args.batch % args.dp:
        raise CliError(f"--batch {args.batch} is not divisible by --dp {args.dp}")
    device = torch.device(args.device, rank % max(torch.cuda.device_count(), 1)) if args.device == "cuda" else None
    device = device or torch.device("cpu")
    mesh = init_device_mesh(args.device, (args.dp, cp_size), mesh_dim_names=("dp", "cp"))
    moba_compile.hf.register(_policy(args), name="moba")
    model = _model(args, device, "moba")
    if args.compile:
        for layer in model.model.layers:
            layer.compile(backend="moba")
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        flat = mesh["dp", "cp"]._flatten("dp_cp")
        for layer in model.model.layers:
            fully_shard(layer, mesh=flat)
        fully_shard(model, mesh=flat)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    replica, per_replica = mesh.get_local_rank("dp"), args.batch // args.dp
    history = []
    for step in range(args.steps):
        ids = _batch(args, model.config.vocab_size, step)[replica * per_replica : (replica + 1) * per_replica]
        ids = ids.to(device)
        labels, positions = cp.shift_labels(ids), cp.global_positions(ids)
        with cp.context_parallel(mesh, buffers=[ids, positions, labels], buffer_seq_dims=[1, 1, 1]):
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
            loss = cp.context_parallel_loss(logits, labels, mesh)
            if args.fsdp:
                (loss * cp_size).backward()  # FSDP2 averages over dp * cp ranks: sum over cp, mean over dp
            else:
                loss.backward()
                cp.reduce_gradients(model, mesh)
                if args.dp > 1:
                    for p in model.parameters():
                        if p.grad is not None:
                            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, group=mesh.get_group("dp"))
        value = loss.detach().reshape(1).float()
        dist.all_reduce(value, op=dist.ReduceOp.AVG, group=mesh.get_group("dp"))
        history.append((float(value), _grad_norm(model)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step}: loss {history[-1][0]:.6f}, grad norm {history[-1][1]:.6f}", flush=True)
    return history


def train_single(args: argparse.Namespace) -> list[tuple[float, float]]:
    """One process, whole sequences, the model's own loss: the reference."""
    device = torch.device(args.device)
    moba_compile.hf.register(_policy(args), name="moba_single")
    model = _model(args, device, "moba_single")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    history = []
    for step in range(args.steps):
        ids = _batch(args, model.config.vocab_size, step).to(device)
        # Per-replica token means averaged over replicas: equal token counts make it the global token mean.
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        history.append((float(loss.detach()), _grad_norm(model)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return history


def compare(distributed: list[tuple[float, float]], single: list[tuple[float, float]], rtol: float) -> bool:
    """Print both runs step by step; True when every loss and gradient norm agrees within ``rtol``.

    Example:
        >>> compare([(1.0, 2.0)], [(1.0, 2.0)], 1e-4)
        step 0: loss cp 1.000000 single 1.000000; grad norm cp 2.000000 single 2.000000
        True
    """
    ok = True
    for step, ((lc, gc), (ls, gs)) in enumerate(zip(distributed, single)):
        good = all(math.isfinite(x) and abs(x - y) <= rtol * abs(y) for x, y in ((lc, ls), (gc, gs)))
        ok &= good
        flag = "" if good else "  <-- differs"
        print(f"step {step}: loss cp {lc:.6f} single {ls:.6f}; grad norm cp {gc:.6f} single {gs:.6f}{flag}")
    return ok and len(distributed) == len(single)


def main(argv: list[str] | None = None) -> int:
    """Run the example; returns the exit status (0 agree, 1 differ, 2 user error)."""
    args = _parse_args(argv)
    if "RANK" not in os.environ:
        print("error: start this example with torchrun (see the module docstring)", file=sys.stderr)
        return 2
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    rank = dist.get_rank()
    try:
        history = train_context_parallel(args)
    except (CliError, cp.ContextParallelError) as err:
        print(f"error: {err}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    dist.destroy_process_group()
    if rank != 0:
        return 0
    single = train_single(args)
    ok = compare(history, single, args.rtol)
    print("context parallel matches one process" if ok else "FAILED: context parallel differs from one process")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
