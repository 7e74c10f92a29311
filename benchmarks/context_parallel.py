"""Context-parallel training step on 2 GPUs: MoBA (moba_compile.context_parallel) against dense SDPA under upstream
context parallelism (``torch.distributed.tensor.experimental.context_parallel``), in the same run.

The model is the ~1.2B Llama of ``benchmarks.end_to_end`` (16 layers, hidden 2048, 16 query / 4 key-value heads of 128,
random bf16 weights), trained on one sequence of 256K, 512K and 1M tokens sharded over the ranks. A step is forward,
loss (token mean over all ranks; the LM head and cross-entropy run in checkpointed slices of 16K tokens, so the
logits are never whole), backward, and the sum of the replicated parameters' gradients over the ranks; every decoder
layer is checkpointed (activation recomputation), in both variants. No optimiser step (it is the same for both).

- ``moba``: ``attn_implementation="moba"`` with the policy of ``benchmarks.end_to_end`` (chunk 4096, top-k 12, last 3
  layers dense) inside ``moba_compile.context_parallel.context_parallel``: contiguous shards, keys and values
  all-gathered per layer. The policy's dense layers run on the flash kernel (earlier ranks' keys unmasked plus the
  rank's own keys causal, merged exactly by log-sum-exp) and, by default, head-tail balanced across the ranks
  (``--dense-balance off`` keeps each rank's rows on the rank); ``moba_calls`` in the JSON says which paths ran.
- ``dense``: an attention function calling ``scaled_dot_product_attention(is_causal=True)`` (key/value heads
  repeated: upstream context parallelism takes no ``enable_gqa``) inside upstream ``context_parallel`` (head-tail
  load balancing, all-gather rotation), the buffers sharded by it.

Per variant and length: step time (one untimed warm-up step at the first length or ``--warmup-tokens``, then
``--repeats`` timed steps, median),
peak memory per GPU, and the bytes each rank receives per layer per step, COMPUTED from the shapes (not measured):
MoBA gathers K and V (``Hkv`` heads) in the forward and again in the recomputation, and its backward reduce-scatters
dK and dV; dense all-gathers K and V (``Hq`` heads, repeated) in the forward and the recomputation and, in the
backward, all-gathers them again and reduce-scatters their gradients. MEASURED per length before the steps: one MoBA
layer's attention forward + backward under context parallelism, and the MoBA layer's collectives alone
(``exchange_share_of_attention``; ``--no-layer-timing`` skips it). Results go to
``benchmarks/results/context_parallel-<gpu>-<date>.json``, one row at a time (a run cut short keeps what it measured).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. \\
        torchrun --nproc-per-node 2 -m benchmarks.context_parallel            # 2 GPUs (about 8 minutes)
    PYTHONPATH=. torchrun --nproc-per-node 2 -m benchmarks.context_parallel --smoke   # CPU, gloo, tiny, not saved

On the CPU (``--smoke``) upstream context parallelism has no kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``
has no sharding strategy), so the smoke run records the dense variant's error and checks the MoBA path only.
Dense at 1M tokens is not run by default (``--dense-lengths`` adds it): at ~4x its 512K step time it would not fit the
10-minute budget of one GPU call; the JSON says so.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from benchmarks.common import environment
from benchmarks.end_to_end import MODEL, POLICY, SMOKE_MODEL

LENGTHS = (256 * 1024, 512 * 1024, 1024 * 1024)
DENSE_LENGTHS = (256 * 1024, 512 * 1024)
SMOKE_POLICY = {"chunk_size": 64, "topk": 3, "dense_last": 1}
LOSS_SLICE = 16 * 1024


def _build(config: dict, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**config), attn_implementation="sdpa", dtype=dtype
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device).train()


def _dense_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal SDPA with repeated key/value heads: what upstream context parallelism can take."""
    repeat = query.shape[1] // key.shape[1]
    if repeat > 1:
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_dense() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("cp_dense", _dense_attention)
    AttentionMaskInterface.register("cp_dense", lambda *args, **kwargs: None)  # is_causal stands for the mask


def _loss(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, group: Any) -> torch.Tensor:
    """Token-mean cross-entropy over all ranks, the head and loss in checkpointed slices (logits never whole)."""
    weight = model.lm_head.weight

    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((h @ weight.t()).float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], LOSS_SLICE):
        h, y = hidden[:, start : start + LOSS_SLICE], labels[:, start : start + LOSS_SLICE]
        total = total + checkpoint(piece, h, y, use_reentrant=False)
    count = (labels != -100).sum().float().reshape(1)
    dist.all_reduce(count, group=group)
    return total / count


def _exchanged_bytes(config: dict, tokens: int, world: int, variant: str) -> int:
    """Bytes one rank receives per layer per step (computed from the shapes, see the module docstring).

    For ``"moba_dense_balanced"`` (a policy dense layer of the MoBA variant, head-tail balanced): the key/value
    exchange of a MoBA layer plus the balancing all-to-alls, in which a rank sends away half of its query rows and
    receives another rank's half, and the same for the outputs, in the forward, the recomputation and (gradients of
    both) the backward.
    """
    shard = tokens // world
    heads = config["num_key_value_heads"] if variant != "dense" else config["num_attention_heads"]
    one = (world - 1) * shard * heads * config["head_dim"] * 2  # one bf16 tensor's other shards
    # moba: K,V gathered twice (forward, recomputation) + dK,dV reduce-scattered; dense: K,V gathered three times
    # (forward, recomputation, backward) + dK,dV reduce-scattered.
    kv = 2 * one * (4 if variant == "dense" else 3)
    if variant != "moba_dense_balanced" or world == 1:
        return kv
    half_rows = (shard // 2) * config["num_attention_heads"] * config["head_dim"] * 2  # bf16 half of a shard's q/out
    return kv + half_rows * 2 * 3  # (queries + outputs) x (forward, recomputation, backward)


def _median_ms(fn: Any, group: Any, device: torch.device, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in ms on every rank together (barrier before, device synchronised after)."""
    fn()  # warm-up: kernels compiled, communicators set up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _layer_timing(config: dict, policy: dict, tokens: int, mesh: Any, device: torch.device) -> dict[str, float]:
    """One MoBA layer's attention under context parallelism against its key/value exchange alone (measured).

    ``moba_layer_attention_ms``: forward + backward of ``context_parallel_moba_attention`` on random bf16 shards of
    the model's shapes (its all-gathers and reduce-scatter included). ``moba_layer_exchange_ms``: the collectives a
    checkpointed MoBA layer runs per step, alone: key and value all-gathered twice (forward and recomputation) and
    their gradients reduce-scattered once. Their ratio is issue 19's "communication per layer / attention time".
    """
    from moba_compile import context_parallel as cp

    group = mesh.get_group()
    world = dist.get_world_size(group)
    shard, d = tokens // world, config["head_dim"]
    hq, hkv = config["num_attention_heads"], config["num_key_value_heads"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())
    q = torch.randn(1, hq, shard, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    k = torch.randn(1, hkv, shard, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    v = torch.randn(1, hkv, shard, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    grad = torch.randn_like(q)

    def attention() -> None:
        out = cp.context_parallel_moba_attention(
            q, k, v, mesh_or_group=mesh, chunk_size=policy["chunk_size"], topk=policy["topk"]
        )
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    gathered = torch.empty(world * k.numel(), device=device, dtype=dtype)
    scattered = torch.empty(k.numel(), device=device, dtype=dtype)
    flat = k.detach().reshape(-1)

    def exchange() -> None:
        for _ in range(4):  # K and V, forward and recomputation
            dist.all_gather_into_tensor(gathered, flat, group=group)
        for _ in range(2):  # dK and dV back to their owners
            dist.reduce_scatter_tensor(scattered, gathered, group=group)

    attention_ms = _median_ms(attention, group, device)
    exchange_ms = _median_ms(exchange, group, device)
    return {
        "moba_layer_attention_ms": attention_ms,
        "moba_layer_exchange_ms": exchange_ms,
        "exchange_share_of_attention": exchange_ms / attention_ms,
    }


def _step(model: torch.nn.Module, variant: str, mesh: Any, ids: torch.Tensor, dense_balance: bool = True) -> float:
    from moba_compile import context_parallel as cp

    group = mesh.get_group()
    labels, positions = cp.shift_labels(ids), cp.global_positions(ids)
    device = ids.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group)
    start = time.perf_counter()
    if variant == "moba":
        context = cp.context_parallel(
            mesh, buffers=[ids, positions, labels], buffer_seq_dims=[1, 1, 1], dense_balance=dense_balance
        )
    else:
        from torch.distributed.tensor.experimental import context_parallel

        context = context_parallel(mesh, buffers=[ids, positions, labels], buffer_seq_dims=[1, 1, 1])
    with context:
        hidden = model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        loss = _loss(model, hidden, labels, group)
        loss.backward()
    cp.reduce_gradients(model, mesh)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise RuntimeError(f"{variant}: the loss is not finite ({value})")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (under torchrun) and print a table; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and lengths on the CPU (gloo); not saved")
    parser.add_argument("--lengths", default=None, help="comma-separated tokens per sequence (default 256K,512K,1M)")
    parser.add_argument("--dense-lengths", default=None, help="lengths dense also runs (default 256K,512K)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--no-layer-timing", action="store_true", help="skip the per-layer attention vs exchange timing (measured)"
    )
    parser.add_argument(
        "--dense-balance",
        choices=["on", "off"],
        default="on",
        help="MoBA variant: the policy's dense layers head-tail balanced across the ranks (on) or not (off)",
    )
    parser.add_argument(
        "--warmup-tokens",
        type=int,
        default=None,
        help="length of each variant's untimed warm-up step (default: the first length); any length of at least "
        "topk chunks per rank compiles the same kernels, and a short one saves a long step's time",
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        print("error: start with torchrun --nproc-per-node 2 (see the module docstring)", file=sys.stderr)
        return 2
    smoke = args.smoke
    parse = lambda text: tuple(int(x) for x in text.split(",") if x)  # noqa: E731
    # An empty --dense-lengths "" means no dense run at all, not the default.
    lengths = parse(args.lengths) if args.lengths is not None else ((256, 512) if smoke else LENGTHS)
    dense_lengths = (
        parse(args.dense_lengths) if args.dense_lengths is not None else ((256, 512) if smoke else DENSE_LENGTHS)
    )
    config, policy = (SMOKE_MODEL, SMOKE_POLICY) if smoke else (MODEL, POLICY)
    if smoke:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl")
    from torch.distributed.device_mesh import init_device_mesh

    import moba_compile.hf
    from moba_compile import ops

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("cp",))
    dtype = torch.float32 if smoke else torch.bfloat16
    model = _build(config, dtype, device)
    moba_compile.hf.register(policy, name="moba")
    _register_dense()
    env = environment(device)
    meta = {
        "gpu": env["gpu"] or "cpu",
        "torch": env["torch"],
        "triton": env["triton"],
        "world": world,
        "date": datetime.date.today().isoformat(),
        "model": config,
        "policy": policy,
        "step": "forward + loss + backward + gradient sum over ranks, every layer checkpointed, no optimiser",
        "exchanged_bytes": "per rank per layer per step, computed from the shapes (module docstring), not measured",
        "dense_balance": args.dense_balance,
    }
    rows: list[dict[str, Any]] = []

    def save() -> Path | None:
        if smoke or rank != 0:
            return None
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"context_parallel-{meta['gpu'].replace(' ', '_')}-{meta['date']}.json"
        path.write_text(json.dumps({**meta, "rows": rows}, indent=2))
        return path

    gen = torch.Generator().manual_seed(0)
    warmed: set[str] = set()
    for n in lengths:
        row: dict[str, Any] = {"tokens": n, "tokens_per_rank": n // world}
        if not args.no_layer_timing:
            try:
                row.update(_layer_timing(config, policy, n, mesh, device))
            except (torch.OutOfMemoryError, RuntimeError) as err:
                row["layer_timing_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for variant in ("moba", "dense"):
            if variant == "dense" and n not in dense_lengths:
                row["dense_note"] = "not run (--dense-lengths): its step would not fit one 10-minute GPU call"
                continue
            model.set_attn_implementation("moba" if variant == "moba" else "cp_dense")
            ids = torch.randint(0, config["vocab_size"], (1, n), generator=gen).to(device)
            try:
                balance = args.dense_balance == "on"
                if variant not in warmed:  # kernels compiled and loaded, untimed
                    warm = ids[:, : args.warmup_tokens].clone() if args.warmup_tokens else ids.clone()
                    _step(model, variant, mesh, warm, balance)
                    warmed.add(variant)
                    del warm
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                before = ops.CALLS.copy()
                times = [_step(model, variant, mesh, ids.clone(), balance) for _ in range(args.repeats)]
                row[f"{variant}_s"] = statistics.median(times)
                if variant == "moba":  # which paths the timed steps ran (MoBA kernels, flash / balanced dense)
                    row["moba_calls"] = {k: n - before[k] for k, n in ops.CALLS.items() if n != before[k]}
                if device.type == "cuda":
                    row[f"{variant}_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            except (torch.OutOfMemoryError, RuntimeError) as err:
                row[f"{variant}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            row[f"{variant}_exchanged_bytes_per_layer"] = _exchanged_bytes(config, n, world, variant)
            if variant == "moba" and args.dense_balance == "on":
                row["moba_dense_layer_exchanged_bytes"] = _exchanged_bytes(config, n, world, "moba_dense_balanced")
        if "moba_s" in row and "dense_s" in row:
            row["speedup"] = row["dense_s"] / row["moba_s"]
        rows.append(row)
        save()
        if rank == 0:
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
            print(json.dumps(shown), flush=True)
    path = save()
    if rank == 0:
        print("smoke run: numbers are not benchmark results and are not saved" if smoke else f"wrote {path}")
    # Teardown as in examples/train_distributed.py: drop what still refers to the process group (the model, the mesh),
    # wait for every rank, then destroy it. With them alive, rank 0 once aborted at exit on CI-like load ("terminate
    # called without an active exception", SIGABRT) after printing its row.
    del model, mesh
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
