"""Context parallelism: exact MoBA over a sequence sharded across ranks, on ``torch.distributed``.

Rank ``r`` of a sequence group of ``W`` ranks holds the contiguous slice ``[r * S, (r + 1) * S)`` of a sequence of
``L = W * S`` tokens: its queries, keys and values, its input ids, global position ids and (already shifted) labels.
A MoBA attention site all-gathers the keys and values of the group (``all_gather`` with autograd: its backward is a
reduce-scatter that sums every rank's key/value gradients back to their owner), keeps the prefix ``[0, (r + 1) * S)``
that causality lets the local queries see, and calls ``moba::attention`` with the ``S`` local queries. The op places
query row ``i`` at position ``Lk - Lq + i = r * S + i`` (bottom-right alignment, spec section 1), so every local row is
exactly the row of single-device MoBA over the whole sequence, forward and backward. The policy's dense layers
attend to the same gathered prefix on the flash kernels (:mod:`moba_compile.flash_merge`: the earlier ranks' keys
unmasked plus the own keys square-causal, merged exactly by log-sum-exp), or with SDPA and a lower-right causal mask
where flash cannot take the inputs (:func:`dense_attention_kernel`).

Contiguous shards are balanced for MoBA: a query attends to about ``topk * chunk_size`` keys wherever it sits. Dense
causal attention is not (the last rank's queries see ``W`` times more keys than the first's), which is why upstream
``torch.distributed.tensor.experimental.context_parallel`` reorders the sequence head-tail ("zig-zag") before
sharding; MoBA needs no reordering, and its shards are whole chunks (``S % chunk_size == 0``).

Entry points:

- :func:`context_parallel_moba_attention` (and :func:`context_parallel_dense_attention`): the op-level functions.
- :func:`context_parallel`: a context manager modelled on upstream ``context_parallel``: shards ``buffers`` in place
  along their sequence dims and, for the Hugging Face attention implementation registered by
  :func:`moba_compile.hf.register` (``attn_implementation="moba"``), swaps in :class:`ContextParallelAttention`, which
  gathers keys and values across the group for every layer (MoBA layers and the policy's dense layers alike). Any
  other ``scaled_dot_product_attention`` call inside the context raises instead of attending to the local shard only.
- :func:`shard_sequence`, :func:`shift_labels`, :func:`global_positions`: building the shards of a batch.
- :func:`context_parallel_loss` (the token-mean loss over all ranks) and :func:`reduce_gradients` (sum replicated
  parameters' gradients over the group when FSDP2 does not).

Example (2 processes, ``torchrun --nproc-per-node 2``):

    >>> mesh = torch.distributed.device_mesh.init_device_mesh("cuda", (2,), mesh_dim_names=("cp",))  # doctest: +SKIP
    >>> moba_compile.hf.register({"chunk_size": 4096, "topk": 12})  # doctest: +SKIP
    >>> model.set_attn_implementation("moba")  # doctest: +SKIP
    >>> labels = shift_labels(ids); positions = global_positions(ids)  # doctest: +SKIP
    >>> with context_parallel(mesh, buffers=[ids, positions, labels], buffer_seq_dims=[1, 1, 1]):  # doctest: +SKIP
    ...     logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    ...     loss = context_parallel_loss(logits, labels, mesh)
    ...     loss.backward()
    ...     reduce_gradients(model, mesh)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from . import ops
from .decisions import decide_site
from .flash_merge import causal_flash_attention, flash_unsupported_reason
from .ops import Impl
from .policy import Routing
from .report import FORM_CAUSAL

__all__ = [
    "SEQ_DIM",
    "ContextParallelAttention",
    "ContextParallelError",
    "SequenceGroup",
    "context_parallel",
    "context_parallel_dense_attention",
    "context_parallel_loss",
    "context_parallel_moba_attention",
    "dense_attention_kernel",
    "global_positions",
    "reduce_gradients",
    "sequence_group",
    "shard_sequence",
    "shift_labels",
]

_log = logging.getLogger(__name__)
# The dense-kernel choices already logged (a log line per distinct choice, not per layer and step).
_LOGGED_KERNELS: set[tuple[str, str | None]] = set()

#: The default name of the sequence dimension of a DeviceMesh (as in torchtitan's ``("dp", "cp")`` meshes).
SEQ_DIM = "cp"

MeshOrGroup = DeviceMesh | ProcessGroup


class ContextParallelError(ValueError):
    """An input context parallelism cannot serve exactly: the message names the problem and the way out."""


def _all_gather_autograd() -> Any:
    # torch 2.13 renamed the autograd all-gather (the old name warns); torch 2.11 has only the old one. Both trace in
    # Dynamo as _c10d_functional(_autograd) ops, whose backward is a reduce-scatter (sum).
    from torch.distributed import _functional_collectives as fc

    return getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd


def _all_to_all_autograd() -> Any:
    # The functional all-to-all with autograd (its backward is the reverse all-to-all); the same name on 2.11 and 2.13.
    from torch.distributed import _functional_collectives as fc

    return fc.all_to_all_single_autograd


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: torch 2.11's reduce-scatter (the all-gather's backward)
    requires a contiguous input, and the gradient of a moved dimension is a strided view."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


@dataclass(frozen=True)
class SequenceGroup:
    """The ranks that share one sequence: their process group, this rank's index in it and the group's size.

    Attributes:
        group: the ``torch.distributed`` process group (gloo or NCCL).
        rank: this process's index in ``group`` (its shard is the ``rank``-th slice of the sequence).
        size: the number of ranks ``W``.
    """

    group: ProcessGroup
    rank: int
    size: int

    def gather(self, tensor: Tensor, dim: int) -> Tensor:
        """All shards of ``tensor`` concatenated along ``dim`` in rank order; differentiable (the backward sums).

        Args:
            tensor: this rank's shard, any dtype and device the group's backend takes; every rank's shard must have
                the same shape.
            dim: the sequence dimension.

        Returns:
            ``tensor``'s shape with ``dim`` multiplied by :attr:`size`.

        Example:
            >>> group.gather(torch.ones(1, 2, 8, 4), dim=2).shape  # 2 ranks  # doctest: +SKIP
            torch.Size([1, 2, 16, 4])
        """
        if self.size == 1:
            return tensor
        dim = dim % tensor.dim()
        # all_gather stacks shards along dim 0: gather a view with the sequence first, then move it back (one copy
        # fewer than gathering along `dim`, which splits and concatenates the result).
        moved = tensor.movedim(dim, 0).contiguous()
        gathered = _all_gather_autograd()(moved, 0, self.group)
        return _ContiguousGrad.apply(gathered).movedim(0, dim)


def sequence_group(mesh_or_group: MeshOrGroup | SequenceGroup, *, seq_dim: str = SEQ_DIM) -> SequenceGroup:
    """The sequence group of a DeviceMesh (its ``seq_dim`` dimension) or of a process group.

    Args:
        mesh_or_group: a :class:`~torch.distributed.device_mesh.DeviceMesh` (1-D, or N-D with a dimension named
            ``seq_dim``), a ``ProcessGroup``, or a :class:`SequenceGroup` (returned as is).
        seq_dim: the mesh dimension that shards the sequence (default ``"cp"``). A 1-D mesh without dimension names
            is taken as the sequence dimension.

    Returns:
        A :class:`SequenceGroup`.

    Raises:
        ContextParallelError: the mesh has no dimension named ``seq_dim`` (a 1-D mesh named otherwise, or an N-D mesh),
            or ``torch.distributed`` is not initialised.
        TypeError: ``mesh_or_group`` is neither a mesh nor a process group.

    Example:
        >>> mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))  # doctest: +SKIP
        >>> sequence_group(mesh).size  # doctest: +SKIP
        2
    """
    if isinstance(mesh_or_group, SequenceGroup):
        return mesh_or_group
    if not dist.is_available() or not dist.is_initialized():
        raise ContextParallelError("context parallelism needs torch.distributed initialised (init_process_group)")
    if isinstance(mesh_or_group, DeviceMesh):
        names = mesh_or_group.mesh_dim_names
        if names is not None and seq_dim in names:
            group = mesh_or_group.get_group(seq_dim)
        elif names is None and mesh_or_group.ndim == 1:
            group = mesh_or_group.get_group()
        else:
            raise ContextParallelError(
                f"the device mesh has no sequence dimension {seq_dim!r} (its dimensions: "
                f"{list(names) if names is not None else f'{mesh_or_group.ndim} unnamed'}); build it with "
                f"mesh_dim_names containing {seq_dim!r} or pass seq_dim="
            )
    elif isinstance(mesh_or_group, ProcessGroup):
        group = mesh_or_group
    else:
        raise TypeError(f"mesh_or_group must be a DeviceMesh or a ProcessGroup, got {type(mesh_or_group).__name__}")
    return SequenceGroup(group=group, rank=dist.get_rank(group), size=dist.get_world_size(group))


def shard_sequence(
    tensor: Tensor, mesh_or_group: MeshOrGroup | SequenceGroup, *, dim: int = 1, seq_dim: str = SEQ_DIM
) -> Tensor:
    """This rank's contiguous slice of ``tensor`` along its sequence dimension ``dim`` (a view).

    Every rank must hold the same global tensor (same seed or a broadcast); rank ``r`` of ``W`` gets
    ``[r * L / W, (r + 1) * L / W)``.

    Args:
        tensor: any tensor with the global sequence along ``dim`` (input ids ``[B, L]``, position ids, labels).
        mesh_or_group: see :func:`sequence_group`. dim: the sequence dimension. seq_dim: the mesh dimension name.

    Returns:
        A view of ``tensor`` with ``L / W`` entries along ``dim``.

    Raises:
        ContextParallelError: ``L`` is not divisible by the group size.

    Example:
        >>> shard_sequence(torch.arange(8)[None], mesh, dim=1)  # rank 1 of 2  # doctest: +SKIP
        tensor([[4, 5, 6, 7]])
    """
    group = sequence_group(mesh_or_group, seq_dim=seq_dim)
    length = tensor.shape[dim]
    if length % group.size != 0:
        raise ContextParallelError(
            f"the sequence length {length} (dim {dim}) is not divisible by the context-parallel world size "
            f"{group.size}: every rank must hold the same number of tokens"
        )
    per_rank = length // group.size
    return tensor.narrow(dim, group.rank * per_rank, per_rank)


def shift_labels(input_ids: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Next-token labels of the GLOBAL sequence, shifted before sharding: ``labels[:, t] = input_ids[:, t + 1]``.

    A causal LM's loss shifts labels by one inside the model (``labels[..., 1:]``); under context parallelism that
    shift would cross shard boundaries, so it is done once on the global sequence and the model's loss is not used
    (:func:`context_parallel_loss` takes the shifted labels as they are).

    Args:
        input_ids: ``[B, L]`` integer tensor. ignore_index: the label of the last position (it has no next token).

    Returns:
        ``[B, L]`` labels, same dtype and device.

    Example:
        >>> shift_labels(torch.tensor([[5, 6, 7]]))
        tensor([[   6,    7, -100]])
    """
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def global_positions(input_ids: Tensor) -> Tensor:
    """Position ids ``0 .. L - 1`` of the global sequence, ``[B, L]`` int64 on ``input_ids``' device: shard them with
    the input ids, so that rotary embeddings see each token's global position (a model left to itself numbers the
    local shard from 0).

    Example:
        >>> global_positions(torch.zeros(2, 3, dtype=torch.long))
        tensor([[0, 1, 2],
                [0, 1, 2]])
    """
    b, length = input_ids.shape[:2]
    return torch.arange(length, device=input_ids.device).expand(b, length).contiguous()


def _check_shards(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ContextParallelError(f"{name} must be a 4-D tensor [B, H, S, D] (this rank's shard)")
    if attn_mask is not None:
        raise ContextParallelError(
            "an attention mask (padding, packed documents) is not supported under context parallelism: the shards "
            "are one causal sequence; pass sequences without padding"
        )
    if not query.shape[2] == key.shape[2] == value.shape[2]:
        raise ContextParallelError(
            f"query, key and value shards must hold the same {query.shape[2]} positions (got key {key.shape[2]}, "
            f"value {value.shape[2]}): a KV cache (decode, chunked prefill) cannot be mixed with context parallelism"
        )


def _gathered_prefix(key: Tensor, value: Tensor, group: SequenceGroup) -> tuple[Tensor, Tensor]:
    """Keys and values of positions ``[0, (rank + 1) * S)``: everything the local queries may attend to."""
    end = (group.rank + 1) * key.shape[2]
    full_key, full_value = group.gather(key, 2), group.gather(value, 2)
    return full_key[:, :, :end], full_value[:, :, :end]


def context_parallel_moba_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mesh_or_group: MeshOrGroup | SequenceGroup,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    min_seq_len: int = 0,
    impl: Impl = "auto",
    seq_dim: str = SEQ_DIM,
    routing: Routing = "head",
) -> Tensor:
    """MoBA of this rank's queries over a sequence sharded contiguously across the sequence group: exactly the rows
    ``[r * S, (r + 1) * S)`` of single-device :func:`moba_compile.moba_attention` on the whole sequence, and the
    gradients of query, key and value of those rows (the key/value gradients of every rank summed to the owner).

    Keys and values are all-gathered (differentiably) and the prefix ``[0, (r + 1) * S)`` goes to ``moba::attention``
    with the local queries, whose rows sit bottom-right (position ``r * S + i``). Compiles under ``torch.compile``
    (the functional collectives trace) without a graph break.

    Args:
        query: ``[B, Hq, S, D]`` this rank's queries. key: ``[B, Hkv, S, D]``. value: ``[B, Hkv, S, Dv]``;
            ``Hq % Hkv == 0``; floating dtype (fp32, bf16, fp16, fp64), on the group backend's device.
        mesh_or_group: the sequence group (see :func:`sequence_group`).
        chunk_size, topk, scale, impl, routing: as in :func:`moba_compile.moba_attention` (the gate of a row reads
            only the gathered prefix, so group routing is as exact across shards as head routing).
        attn_mask: must be None (padding masks are refused under context parallelism).
        min_seq_len: a GLOBAL sequence ``W * S`` shorter than this runs dense causal attention (the policy's
            ``min_seq_len``), on every rank alike.
        seq_dim: the mesh dimension name of the sequence.

    Returns:
        ``[B, Hq, S, Dv]`` in the query's dtype.

    Raises:
        ContextParallelError: an ``attn_mask``; query/key/value shards of different lengths (a KV cache); ``S`` not a
            multiple of ``chunk_size`` (shards hold whole chunks); a mesh without ``seq_dim``.
        ValueError, TypeError: what :func:`moba_compile.moba_attention` raises for the call.

    Example:
        >>> out = context_parallel_moba_attention(q, k, v, mesh_or_group=mesh, chunk_size=64, topk=3)  # doctest: +SKIP
    """
    _check_shards(query, key, value, attn_mask)
    group = sequence_group(mesh_or_group, seq_dim=seq_dim)
    local = query.shape[2]
    if isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1 and local % chunk_size:
        raise ContextParallelError(
            f"the local sequence length {local} (global {local * group.size} over {group.size} ranks) is not a "
            f"multiple of chunk_size {chunk_size}: context-parallel shards must hold whole chunks"
        )
    full = local * group.size
    if isinstance(topk, int) and full < min_seq_len:
        # Dense causal attention is MoBA with every chunk selected; decided on the global length, not the prefix's.
        topk = max(topk, -(-full // chunk_size))
    key, value = _gathered_prefix(key, value, group)
    return ops.attention(query, key, value, chunk_size=chunk_size, topk=topk, scale=scale, impl=impl, routing=routing)


def dense_attention_kernel(query: Tensor, key: Tensor, value: Tensor) -> tuple[str, str | None]:
    """Which kernel :func:`context_parallel_dense_attention` runs for these shards, and why not flash.

    Args:
        query, key, value: this rank's ``[B, H, S, D]`` shards (or the gathered keys and values: only dtypes, devices
            and head shapes matter).

    Returns:
        ``("flash", None)`` when the flash kernels take the inputs (:mod:`moba_compile.flash_merge`: CPU in any
        floating dtype, CUDA in fp16/bf16 with a head dim flash takes), else ``("sdpa", reason)``: SDPA with the
        causal mask aligned bottom-right (the memory-efficient or math kernel), e.g. for fp32 on CUDA.

    Example:
        >>> dense_attention_kernel(torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
        ('flash', None)
        >>> dense_attention_kernel(*(torch.randn(1, 2, 8, 16, dtype=torch.bfloat16, device="meta"),) * 3)
        ('sdpa', 'no flash kernel on meta')
    """
    reason = flash_unsupported_reason(query, key, value)
    return ("flash", None) if reason is None else ("sdpa", reason)


def _count(name: str) -> None:
    """Count a Python-side choice in :data:`moba_compile.ops.CALLS`, in eager calls only: Dynamo replays a traced
    mutation of a global dict after the graph by restoring the dict it traced, which would erase the counts the ops
    added while the graph ran (the flash ops count themselves, at run time, compiled or not)."""
    if not torch.compiler.is_compiling():
        ops.CALLS[name] += 1


def _head_tail_plan(rank: int, size: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """The exchange of the balanced dense layer: the sequence in ``2W`` half-shards, rank ``r`` holding halves ``2r``
    and ``2r + 1`` and computing halves ``r`` and ``2W - 1 - r`` (upstream's head-tail order).

    Returns:
        ``send``: this rank's halves (0 = first, 1 = second) in the order they leave (by destination rank, ties in
        sequence order); ``send_splits``: halves per destination; ``recv``: the halves it computes (0 = half ``r``,
        1 = half ``2W - 1 - r``) in the order they arrive (by source rank, ties in sequence order);
        ``recv_splits``: halves per source. The splits count halves; multiply by the half length.
    """
    owner = [i if i < size else 2 * size - 1 - i for i in range(2 * size)]  # half -> the rank computing it
    send = sorted((0, 1), key=lambda h: (owner[2 * rank + h], h))
    send_splits = [sum(owner[2 * rank + h] == dest for h in (0, 1)) for dest in range(size)]
    computed = (rank, 2 * size - 1 - rank)
    recv = sorted((0, 1), key=lambda j: (computed[j] // 2, j))
    recv_splits = [sum(computed[j] // 2 == src for j in (0, 1)) for src in range(size)]
    return send, send_splits, recv, recv_splits


def _balanced_flash(query: Tensor, key: Tensor, value: Tensor, group: SequenceGroup, scale: float | None) -> Tensor:
    """Dense causal rows of this rank's queries, computed head-tail balanced: every rank attends the same number of
    scores. Rank ``r`` sends its two query halves to the ranks that compute them, computes halves ``r`` and
    ``2W - 1 - r`` (each a flash pair over its prefix of the gathered keys) and sends their outputs back; the
    all-to-alls' backward is the reverse exchange, so gradients reach their owners."""
    size, rank, half = group.size, group.rank, query.shape[2] // 2
    send, send_splits, recv, recv_splits = _head_tail_plan(rank, size)
    all_to_all = _all_to_all_autograd()
    full_key, full_value = group.gather(key, 2), group.gather(value, 2)
    # Sequence first: all_to_all splits dim 0.
    mine = query.movedim(2, 0).split(half)
    arrived = all_to_all(
        torch.cat([mine[h] for h in send]).contiguous(),
        [n * half for n in recv_splits],
        [n * half for n in send_splits],
        group.group,
    )
    pieces = _ContiguousGrad.apply(arrived).split(half)
    computed = (rank, 2 * size - 1 - rank)
    outs: dict[int, Tensor] = {}
    for piece, j in zip(pieces, recv):
        end = (computed[j] + 1) * half  # half i attends to keys [0, (i + 1) * half)
        rows = piece.movedim(0, 2)
        outs[j] = causal_flash_attention(rows, full_key[:, :, :end], full_value[:, :, :end], scale=scale)
    back = all_to_all(
        torch.cat([outs[j].movedim(2, 0) for j in recv]).contiguous(),
        [n * half for n in send_splits],
        [n * half for n in recv_splits],
        group.group,
    )
    returned = dict(zip(send, _ContiguousGrad.apply(back).split(half)))
    return torch.cat([returned[0], returned[1]]).movedim(0, 2)


def context_parallel_dense_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mesh_or_group: MeshOrGroup | SequenceGroup,
    scale: float | None = None,
    balance: bool = True,
    seq_dim: str = SEQ_DIM,
) -> Tensor:
    """Dense causal attention of this rank's queries over the sharded sequence (a policy's dense layers under context
    parallelism): exactly the rows ``[r * S, (r + 1) * S)`` of single-device causal SDPA over the whole sequence,
    forward and backward.

    Keys and values are all-gathered (differentiably) and the prefix ``[0, (r + 1) * S)`` is attended with the rows
    aligned bottom-right. Where the flash kernels take the inputs (:func:`dense_attention_kernel`), it runs as two
    flash calls merged by their log-sum-exps (:func:`moba_compile.flash_merge.causal_flash_attention`): the ``r * S``
    keys of earlier ranks without a mask, the ``S`` own keys square-causal, grouped heads unrepeated; the backward
    calls each part's flash backward with the merged output and log-sum-exp, which is the exact gradient. Elsewhere
    (fp32 on CUDA, head dims flash refuses, other devices) it runs SDPA with a ``causal_lower_right`` mask over
    key/value heads repeated to the query's. The choice is counted in :data:`moba_compile.ops.CALLS`:
    ``"cp_dense:flash"`` and ``"cp_dense_backward:flash"`` (per call, inside the ops, compiled or not) or
    ``"cp_dense:sdpa"`` (eager calls only), and logged once per choice by eager calls (logger
    ``moba_compile.context_parallel``, level INFO, with the reason flash was not taken).

    Balance: contiguous shards give rank ``r`` ``r + 1/2`` blocks of ``S x S`` scores (on 2 ranks, rank 1 does 3/4 of
    the work). With ``balance`` (the flash path, ``W > 1``, ``S`` even) the rows are computed in upstream's head-tail
    order instead: rank ``r`` computes the half-shards ``r`` and ``2W - 1 - r`` of the sequence (the same number of
    scores on every rank), its queries and outputs exchanged by two all-to-alls with autograd (at most ``S * Hq * D``
    elements sent per rank each way, forward and backward; on 2 ranks half of it); the shards, the keys' all-gather
    and the result are as without it. Counted as ``"cp_dense:balanced"`` in :data:`moba_compile.ops.CALLS` (eager
    calls only), with two flash pairs per call.

    Args:
        query: ``[B, Hq, S, D]``; key ``[B, Hkv, S, D]``; value ``[B, Hkv, S, Dv]``; ``Hq % Hkv == 0``.
        mesh_or_group, scale, seq_dim: as in :func:`context_parallel_moba_attention`.
        balance: compute the rows head-tail balanced (above) where the flash path runs; False keeps each rank's
            rows on the rank (the MoBA layers' layout, unbalanced).

    Returns:
        ``[B, Hq, S, Dv]`` in the query's dtype, the rows ``[r * S, (r + 1) * S)`` of dense causal SDPA over the whole
        sequence.

    Raises:
        ContextParallelError: shards of different lengths (a KV cache), a mesh without ``seq_dim``.

    Example:
        >>> out = context_parallel_dense_attention(q, k, v, mesh_or_group=mesh)  # doctest: +SKIP
    """
    _check_shards(query, key, value, None)
    group = sequence_group(mesh_or_group, seq_dim=seq_dim)
    kernel, why_not = dense_attention_kernel(query, key, value)
    # Once per choice and reason, not per layer and step; eager calls only (Dynamo cannot trace a logger call).
    if not torch.compiler.is_compiling() and (kernel, why_not) not in _LOGGED_KERNELS:
        _LOGGED_KERNELS.add((kernel, why_not))
        if why_not is None:
            _log.info("context-parallel dense attention on flash (earlier keys + own keys causal, merged by lse)")
        else:
            _log.info("context-parallel dense attention on SDPA, lower-right causal mask: no flash (%s)", why_not)
    if kernel == "flash" and balance and group.size > 1 and query.shape[2] % 2 == 0:
        _count("cp_dense:balanced")
        return _balanced_flash(query, key, value, group, scale)
    key, value = _gathered_prefix(key, value, group)
    if kernel == "flash":
        return causal_flash_attention(query, key, value, scale=scale)
    _count("cp_dense:sdpa")
    if query.shape[1] != key.shape[1]:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    if group.rank == 0:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
    from torch.nn.attention.bias import causal_lower_right

    # The lower-right causal bias never materialises the [S, (r + 1) S] mask on CUDA (memory-efficient kernel).
    bias = causal_lower_right(query.shape[2], key.shape[2])
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)


def context_parallel_loss(
    logits: Tensor,
    labels: Tensor,
    mesh_or_group: MeshOrGroup | SequenceGroup,
    *,
    ignore_index: int = -100,
    seq_dim: str = SEQ_DIM,
) -> Tensor:
    """Mean token cross-entropy of the whole sharded sequence: the sum of every rank's token losses divided by the
    global number of labelled tokens; the same value on every rank.

    Its gradient is that of the global mean with respect to THIS rank's logits only (the other ranks' terms enter as
    constants), so after ``backward`` replicated parameters hold this rank's share: sum them over the sequence group
    (:func:`reduce_gradients`, or FSDP2 over a mesh including the sequence dimension with the right divide factor).

    Args:
        logits: ``[B, S, V]`` this rank's logits (any floating dtype; computed in fp32).
        labels: ``[B, S]`` this rank's shard of :func:`shift_labels` (int64; ``ignore_index`` = not counted).
        mesh_or_group, seq_dim: the sequence group. ignore_index: label excluded from the loss and the count.

    Returns:
        A scalar fp32 tensor.

    Raises:
        ContextParallelError: logits and labels do not have matching ``[B, S]`` shapes.

    Example:
        >>> loss = context_parallel_loss(model(ids, position_ids=pos).logits, labels, mesh)  # doctest: +SKIP
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ContextParallelError(
            f"logits must be [B, S, V] and labels [B, S] (this rank's shards), got {list(logits.shape)} and "
            f"{list(labels.shape)}"
        )
    group = sequence_group(mesh_or_group, seq_dim=seq_dim)
    local_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index, reduction="sum"
    )
    totals = torch.stack([local_sum.detach(), (labels != ignore_index).sum().to(local_sum.dtype)])
    if group.size > 1:
        dist.all_reduce(totals, group=group.group)
    # Value: the global sum over the global count. Gradient: this rank's own tokens only.
    return (local_sum + (totals[0] - local_sum.detach())) / totals[1].clamp_min(1)


def reduce_gradients(
    module: torch.nn.Module, mesh_or_group: MeshOrGroup | SequenceGroup, *, seq_dim: str = SEQ_DIM
) -> None:
    """Sum the gradients of ``module``'s parameters over the sequence group, in place (after ``backward``).

    Each rank's backward of :func:`context_parallel_loss` leaves the gradient of its own tokens; the sum over the
    group is the gradient of the whole sequence. Use it for parameters replicated over the group (a plain model, or
    DDP/FSDP2 over the data-parallel dimension only); FSDP2 sharded over a mesh that includes the sequence dimension
    reduces them itself (see ``docs/context_parallel.md``). Parameters without a gradient are skipped.

    Example:
        >>> reduce_gradients(model, mesh)  # doctest: +SKIP
    """
    group = sequence_group(mesh_or_group, seq_dim=seq_dim)
    if group.size == 1:
        return
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group.group)


def _attention_guard(name: str) -> Any:
    """A transformers attention function that refuses to run: ``name`` would attend to this rank's shard only."""

    def refuse(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        raise ContextParallelError(
            f"{type(module).__name__} runs the attention implementation {name!r} inside "
            "moba_compile.context_parallel, where it would attend to this rank's shard only: only the MoBA attention "
            "implementation is context-parallel here (moba_compile.hf.register(...), "
            "model.set_attn_implementation('moba')); for dense SDPA models use "
            "torch.distributed.tensor.experimental.context_parallel"
        )

    return refuse


@dataclass
class ContextParallelAttention:
    """The transformers attention function swapped in by :func:`context_parallel` for a registered MoBA attention.

    Each call decides the layer as the wrapped :class:`moba_compile.hf.MobaAttention` would (same policy, same
    per-layer decision, same report, with the GLOBAL key length), gathers the keys and values of the sequence group,
    and runs :func:`context_parallel_moba_attention` (MoBA layers) or :func:`context_parallel_dense_attention` (layers
    the policy keeps dense). A call that needs the layer's own attention features (soft-capping, a sliding window,
    sinks, dropout, a bias) cannot be served across shards and raises.

    Attributes:
        inner: the registered ``MobaAttention``. group: the sequence group.
        dense_balance: the dense layers' ``balance`` (:func:`context_parallel_dense_attention`).
    """

    inner: Any
    group: SequenceGroup
    dense_balance: bool = True

    def __call__(
        self,
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        """transformers' attention-function protocol: ``[B, H, S, D]`` shards in, ``([B, S, Hq, Dv], None)`` out."""
        inner, group = self.inner, self.group
        layer = getattr(module, "layer_idx", None)
        if query.shape[2] != key.shape[2]:
            raise ContextParallelError(
                f"layer {layer}: {query.shape[2]} queries over {key.shape[2]} keys: a KV cache cannot be mixed with "
                "context parallelism (call the model with use_cache=False)"
            )
        if attention_mask is not None:
            # Only the local causal square may arrive (a model's own mask for an unpadded sequence): under context
            # parallelism causality is global, which the bottom-right alignment of the gathered prefix gives.
            kind = int(torch.ops.moba.analyse_mask(attention_mask, query, key, ""))
            if kind != ops.MASK_CAUSAL:
                raise ContextParallelError(
                    f"layer {layer}: an attention mask that is not plain causal (padding, packed documents, a window) "
                    "is not supported under context parallelism"
                )
        if layer in (None, 0):
            self._check_positions(kwargs.get("position_ids"), query.shape[2])
        path, _, decision = inner.layer_decision(module)
        blocker = inner.dense_reason(module, query, key, None, {"dropout": dropout, **kwargs})
        full = query.shape[2] * group.size
        decided = decide_site(
            inner.policy, module=path, layer=layer, form=FORM_CAUSAL, blocker=blocker, len_k=full, decision=decision
        )
        if blocker is not None:
            raise ContextParallelError(
                f"{path or type(module).__name__}: {blocker}; such a layer cannot run across sequence shards"
            )
        device_type = query.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            query, key, value = (t if t.dtype == dtype else t.to(dtype) for t in (query, key, value))
        note = f"context parallel: keys and values gathered over {group.size} ranks"
        if decided.mode == "dense":
            out = context_parallel_dense_attention(
                query, key, value, mesh_or_group=group, scale=scaling, balance=self.dense_balance
            )
        else:
            assert decided.chunk_size is not None and decided.topk is not None  # a MoBA decision has both
            out = context_parallel_moba_attention(
                query,
                key,
                value,
                mesh_or_group=group,
                chunk_size=decided.chunk_size,
                topk=decided.topk,
                scale=scaling,
                impl=inner.impl,
                routing=decided.routing or "head",
            )
        inner.record(module, layer, decided, [note])
        return out.transpose(1, 2).contiguous(), None

    def _check_positions(self, position_ids: Tensor | None, local: int) -> None:
        """Once per model call (the first layer), outside compilation: the positions must be the global ones.

        Every rank takes part (one all-gather of a number), so that all raise together rather than some waiting in
        the next collective for a rank that raised.
        """
        if position_ids is None or torch.compiler.is_compiling() or self.group.size == 1:
            return
        first = position_ids.reshape(-1, position_ids.shape[-1])[:1, 0].to(torch.int64)
        firsts = self.group.gather(first.detach(), 0).tolist()
        expected = [r * local for r in range(self.group.size)]
        if firsts != expected:
            raise ContextParallelError(
                f"the ranks' first position ids are {firsts}, not {expected}: pass the GLOBAL position ids sharded "
                "like the input ids (global_positions + shard_sequence), or rotary embeddings see local positions"
            )

    def mask(self, *args: Any, **kwargs: Any) -> None:
        """The mask function swapped in with this attention: None (global causality), or an error for padding.

        transformers builds a mask for the LOCAL shard, which is wrong under context parallelism; a plain causal
        sequence needs none (the gathered prefix is aligned bottom-right).

        Raises:
            ContextParallelError: a padding mask with a masked position, or a mask function other than plain
                causal (packed documents, sliding windows).
        """
        from transformers.masking_utils import causal_mask_function

        padding = kwargs.get("attention_mask")
        if padding is None and len(args) > 6:
            padding = args[6]
        if padding is not None:
            # Agreed over the group: a padded shard on one rank must stop every rank before the next collective.
            padded = (~padding.bool()).any().to(torch.int64).reshape(1)
            if self.group.size > 1:
                dist.all_reduce(padded, op=dist.ReduceOp.MAX, group=self.group.group)
            padded_anywhere = bool(padded)
        else:
            padded_anywhere = False
        if padded_anywhere:
            raise ContextParallelError(
                "a padding mask is not supported under context parallelism: every rank's shard must be real tokens"
            )
        mask_function = kwargs.get("mask_function", causal_mask_function)
        if mask_function is not causal_mask_function and torch.compiler.is_compiling():
            # Traced, transformers always composes its packed-sequence check (position ids that restart) into the mask
            # function, whose outcome only the data gives: it cannot be verified here, so it is not accepted.
            raise ContextParallelError(
                "the model's mask is built under torch.compile, where transformers' packed-sequence check cannot be "
                "verified: under context parallelism compile the decoder layers (moba_compile.compile_blocks, or "
                "layer.compile(backend='moba')) and keep the model's forward eager"
            )
        if mask_function is not causal_mask_function:
            raise ContextParallelError(
                f"the model asks for the mask {getattr(mask_function, '__name__', mask_function)!r} (packed documents "
                "or a sliding window?): only plain causal attention is supported under context parallelism"
            )
        return None


@contextlib.contextmanager
def context_parallel(
    mesh_or_group: MeshOrGroup,
    *,
    buffers: Sequence[Tensor] = (),
    buffer_seq_dims: Sequence[int] = (),
    no_restore_buffers: Sequence[Tensor] = (),
    attention: str = "moba",
    seq_dim: str = SEQ_DIM,
    dense_balance: bool = True,
) -> Iterator[SequenceGroup]:
    """Run a Hugging Face model's MoBA attention context-parallel: shard ``buffers`` in place and make every layer of
    the attention implementation ``attention`` gather keys and values over the sequence group.

    Modelled on ``torch.distributed.tensor.experimental.context_parallel``: the buffers (input ids, GLOBAL position
    ids, labels shifted before sharding, see :func:`shift_labels`) are sharded in place along ``buffer_seq_dims`` and
    restored on exit (except ``no_restore_buffers``). Differences: shards are contiguous (no head-tail reordering:
    MoBA's cost per query does not grow with its position), and the attention swapped in is the transformers
    attention function registered under ``attention`` by :func:`moba_compile.hf.register` (wrapped in
    :class:`ContextParallelAttention`), with its mask function replaced so that no local causal mask is built. Inside
    the context every other registered attention implementation (``"sdpa"``, flash, flex) raises: it would attend to the
    local shard only (a model's own ``"eager"`` attention is not registered and cannot be guarded: do not use it).
    Call the model with ``use_cache=False``.

    Args:
        mesh_or_group: see :func:`sequence_group`. buffers, buffer_seq_dims, no_restore_buffers: as upstream.
        attention: the attention implementation name given to :func:`moba_compile.hf.register`.
        seq_dim: the mesh dimension name of the sequence.
        dense_balance: compute the policy's dense layers head-tail balanced across the ranks (see
            :func:`context_parallel_dense_attention`; the shards and every MoBA layer are unchanged). False: each rank
            computes its own rows (rank ``W - 1`` the most).

    Yields:
        The :class:`SequenceGroup`.

    Raises:
        ContextParallelError: a buffer's sequence length is not divisible by the group size; ``buffers`` and
            ``buffer_seq_dims`` differ in length; ``no_restore_buffers`` is not a subset of ``buffers``; a mesh
            without ``seq_dim``; nothing is registered under ``attention``. Inside: padding masks, KV caches, local
            position ids, dense SDPA calls.

    Example:
        >>> with context_parallel(mesh, buffers=[ids, pos, labels], buffer_seq_dims=[1, 1, 1]):  # doctest: +SKIP
        ...     logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        ...     loss = context_parallel_loss(logits, labels, mesh)
    """
    group = sequence_group(mesh_or_group, seq_dim=seq_dim)
    if len(buffers) != len(buffer_seq_dims):
        raise ContextParallelError(
            f"buffer_seq_dims must give one dimension per buffer ({len(buffers)} buffers, {len(buffer_seq_dims)} dims)"
        )
    if any(not any(b is n for b in buffers) for n in no_restore_buffers):
        raise ContextParallelError("no_restore_buffers must be a subset of buffers")
    from .hf._deps import _transformers

    attention_interface, mask_interface, _, _ = _transformers()
    inner = attention_interface._global_mapping.get(attention)
    if inner is None or not hasattr(inner, "policy"):
        raise ContextParallelError(
            f"no MoBA attention is registered as {attention!r}: call moba_compile.hf.register(policy, name="
            f"{attention!r}) and model.set_attn_implementation({attention!r}) first"
        )
    shards = [shard_sequence(b, group, dim=d).clone() for b, d in zip(buffers, buffer_seq_dims)]
    originals = [None if any(b is n for n in no_restore_buffers) else b.clone() for b in buffers]
    old_mask = mask_interface._global_mapping.get(attention)
    wrapper = ContextParallelAttention(inner=inner, group=group, dense_balance=dense_balance)
    with torch.no_grad():
        for buffer, shard in zip(buffers, shards):
            buffer.resize_(shard.shape)
            buffer.copy_(shard)
    attention_interface._global_mapping[attention] = wrapper
    mask_interface._global_mapping[attention] = wrapper.mask
    others = {name: fn for name, fn in attention_interface._global_mapping.items() if name != attention}
    attention_interface._global_mapping.update({name: _attention_guard(name) for name in others})
    try:
        yield group
    finally:
        attention_interface._global_mapping.update(others)
        attention_interface._global_mapping[attention] = inner
        if old_mask is None:
            mask_interface._global_mapping.pop(attention, None)
        else:
            mask_interface._global_mapping[attention] = old_mask
        with torch.no_grad():
            for buffer, original in zip(buffers, originals):
                if original is not None:
                    buffer.resize_(original.shape)
                    buffer.copy_(original)
