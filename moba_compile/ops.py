"""The ``moba::`` torch.library ops: schemas, fake kernels, autograd, dispatch to the Triton kernels or the reference.

Ops (all functional but ``moba::update_static_chunk_means_``, which fills a static cache's means buffer):

- ``moba::attention(query, key, value, attn_mask, mask_kind, chunk_size, topk, scale, min_seq_len, impl,
  chunk_means=None, routing="head") -> (out, lse)``: MoBA attention in the SDPA layout. ``mask_kind`` is an optional
  result of ``moba::analyse_mask`` (the compile pass shares one per mask node): ``MASK_CAUSAL`` drops the mask (MoBA is
  already causal), ``MASK_APPLY`` intersects it with the selection (padding), ``MASK_NOT_CAUSAL`` and
  ``MASK_PER_ROW`` (sliding windows) run dense SDPA with the mask instead: not MoBA; ``MASK_DOCUMENTS`` (the
  block-diagonal causal mask of packed documents) runs every document as MoBA on its own.
  ``min_seq_len``: key sequences shorter than this run dense causal attention. ``chunk_means``: gate means kept by a
  KV cache, so that a decode step need not average every key. ``routing``: ``"head"`` (the paper's gate, one top-k per
  query head) or ``"group"`` (one top-k per key head from the group-summed scores; spec section 6). Every ``moba::``
  attention op (backward, jvp, packed, static decode) takes ``routing`` as its last argument, defaulting to
  ``"head"``, so calls written before it existed are unchanged.
- ``moba::attention_backward(...) -> (dq, dk, dv)``: the registered backward of ``moba::attention``.
- ``moba::attention_jvp(query, key, value, attn_mask, mask_kind, tangent_query, tangent_key, tangent_value, ...)
  -> (tangent_out, tangent_lse)``: forward-mode derivative (plain PyTorch formulas; on the Triton path over the
  selection the Triton gate made).
- ``moba::static_decode(query, key, value, chunk_means, length, attn_mask, chunk_size, topk, scale, impl)
  -> (out, lse)`` and ``moba::update_static_chunk_means_(chunk_means, key, length, new_tokens, chunk_size, impl)``
  (the one mutating op, ``mutates_args=("chunk_means",)``): graph-safe decode on a static KV cache whose length is a
  device tensor (:func:`static_decode`, :func:`update_static_chunk_means_`); inference only. Defined in
  :mod:`moba_compile.static_decode_ops`, re-exported here.
- ``moba::dense_decode(query, key, value, length, attn_mask, scale, impl) -> (out, lse)``: dense causal attention of
  a decode step on MoBA's split-K decode kernels (every earlier chunk selected, no gate), graph-safe on a static cache
  (``length`` a device tensor or None); inference only (:func:`dense_decode`, the policy's ``dense_decode =
  "split_k"``, the default). Defined in :mod:`moba_compile.static_decode_ops`, re-exported here.
- ``moba::static_length(mask, impl) -> Tensor``: each batch row's length on a static cache, read from the step's
  boolean mask on the device (:func:`static_length_from_mask`; a Triton read split over the slots on CUDA). Defined
  in :mod:`moba_compile.static_decode_ops`, re-exported here.
- ``moba::packed_attention`` (and its backward and forward-mode ops): packed documents given by ``cu_seqlens``, each
  MoBA on its own (:func:`packed_attention`). Defined in :mod:`moba_compile.packed_ops`, re-exported here.

Autodiff: the ops have vmap rules (the vmapped dim folds into the batch). :func:`attention` runs ``moba::attention``
through an ``autograd.Function`` in eager mode whenever derivatives may be asked for, which gives reverse mode, forward
mode (``torch.func.jvp``, ``torch.autograd.forward_ad``) and ``torch.func`` transforms; under ``torch.compile`` it calls
the op, whose registered autograd is reverse mode only. Derivatives are first order: a second-order one raises.

Mask analysis (``moba::analyse_mask``, the ``MASK_*`` kinds, :func:`analyse_mask`) lives in :mod:`moba_compile.masks`
and is re-exported here. The Triton kernels are reached one way: ``kernels.<launcher>`` on the package
:mod:`moba_compile.kernels` (importing it never needs Triton; a launcher is imported on first use).

The fake kernels return contiguous tensors, as the real kernels do, so Inductor's stride checks hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dense_fallback, kernels, reference
from .masks import (
    CALLS,
    DENSE_MASK_KINDS,
    MASK_APPLY,
    MASK_CAUSAL,
    MASK_DOCUMENTS,
    MASK_DOCUMENTS_NOTE,
    MASK_KIND_REASONS,
    MASK_NOT_CAUSAL,
    MASK_OBSERVATIONS,
    MASK_PER_ROW,
    analyse_mask,
    documents_from_mask,
    mask_for_moba,
)
from .validation import (
    INT64_MAX,
    bounded_params,
    check_moba_inputs,
    check_moba_params,
    check_routing,
)

__all__ = [
    "CALLS",
    "DENSE_MASK_KINDS",
    "IMPLS",
    "MASK_APPLY",
    "MASK_CAUSAL",
    "MASK_DOCUMENTS",
    "MASK_DOCUMENTS_NOTE",
    "MASK_KIND_REASONS",
    "MASK_NOT_CAUSAL",
    "MASK_OBSERVATIONS",
    "MASK_PER_ROW",
    "Impl",
    "analyse_mask",
    "attention",
    "dense_attention",
    "chunk_means",
    "packed_attention",
    "SHARED_LAUNCH_BELOW",
    "resolve_impl",
    "static_chunk_means_buffer",
    "dense_decode",
    "split_k_unsupported_reason",
    "static_decode",
    "static_length_from_mask",
    "update_static_chunk_means_",
]

#: What ``impl`` may ask for (the public functions take it typed as :data:`Impl`; the ops' schemas keep ``str``).
Impl = Literal["auto", "triton", "reference"]
IMPLS: tuple[str, ...] = get_args(Impl)


def _triton_unavailable_reason(
    query: Tensor, key: Tensor, value: Tensor, chunk_size: int, topk: int, attn_mask: Tensor | None
) -> str | None:
    """Why the Triton kernels cannot run these inputs, or None when they can."""
    # Answers "triton is not installed" without importing Triton, so "triton" is chosen only where it can be imported.
    return kernels.triton_unsupported_reason(query, key, value, chunk_size, topk, attn_mask)


def resolve_impl(
    impl: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    chunk_size: int,
    topk: int,
    attn_mask: Tensor | None = None,
) -> tuple[str, str]:
    """Choose the implementation that will run a MoBA call, and say why.

    Args:
        impl: ``"auto"`` (Triton on CUDA when it supports the inputs, else the reference; CPU tensors always use the
            reference), ``"triton"`` (also on CPU tensors under ``TRITON_INTERPRET=1``) or ``"reference"``.
        query, key, value, chunk_size, topk, attn_mask: the call (real or fake tensors; only metadata is read).

    Returns:
        ``(chosen, why)`` with ``chosen`` in ``{"triton", "reference"}``.

    Raises:
        ValueError: ``impl`` is not one of :data:`IMPLS`.
        RuntimeError: ``impl="triton"`` cannot run these inputs; the message gives the reason.

    Example:
        >>> q = torch.randn(1, 2, 8, 16)
        >>> resolve_impl("auto", q, q, q, 4, 2)[0]
        'reference'
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    if impl == "reference":
        return "reference", "impl='reference' requested"
    if isinstance(key.shape[2], int):
        # The op runs the clamped parameters, so decide on them (topk=10**6 on a short input fits the kernels).
        # A symbolic length (the pass, under dynamic shapes) is left alone: comparing it would add a shape guard.
        chunk_size, topk = bounded_params(key.shape[2], chunk_size, topk)
    reason = _triton_unavailable_reason(query, key, value, chunk_size, topk, attn_mask)
    if impl == "triton":
        if reason is not None:
            raise RuntimeError(f"impl='triton' cannot run this call: {reason}")
        return "triton", "impl='triton' requested"
    if query.device.type != "cuda":
        # The interpreter (TRITON_INTERPRET=1) is for testing the kernels, far too slow to pick automatically.
        return "reference", f"{query.device.type.upper()} tensors"
    if reason is not None:
        return "reference", reason
    return "triton", "Triton kernels"


def _scale(query: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)


def _lse_dtype(query: Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _bounded_call(key: Tensor, chunk_size: int, topk: int, min_seq_len: int) -> tuple[int, int]:
    """The ``(chunk_size, topk)`` an op body runs: validated, clamped to the key length (memory and time then follow
    the inputs, never a huge parameter) and, below ``min_seq_len``, widened to every chunk (dense causal attention is
    MoBA with every earlier chunk selected)."""
    check_moba_params(chunk_size, topk)  # the op can be called directly (the pass does): no division by zero below
    chunk_size, topk = bounded_params(key.shape[2], chunk_size, topk)
    if key.shape[2] < min_seq_len:
        topk = -(-key.shape[2] // chunk_size)  # >= the clamped topk, which never exceeds the chunk count
    return chunk_size, topk


def _dense_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)


@torch.library.custom_op("moba::attention", mutates_args=())
def _attention_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    mask_kind: Tensor | None,
    chunk_size: int,
    topk: int,
    scale: float,
    min_seq_len: int,
    impl: str,
    chunk_means: Tensor | None = None,
    routing: str = "head",
) -> tuple[Tensor, Tensor]:
    check_routing(routing)  # the op can be called directly (the pass does)
    mask, kind = mask_for_moba(attn_mask, mask_kind)
    if kind in DENSE_MASK_KINDS:
        CALLS["attention:dense-sdpa"] += 1
        out = _dense_sdpa(query, key, value, attn_mask, scale).contiguous()
        lse = dense_fallback.masked_lse(query, key, attn_mask, scale)
        return out, lse
    if kind == MASK_DOCUMENTS:
        # Packed documents (a block-diagonal causal mask, checked this forward): each document is MoBA on its own.
        bounds = documents_from_mask(attn_mask, query.shape[2]).tolist()
        out, lse = _packed_forward(
            query, key, value, bounds, chunk_size, topk, scale, min_seq_len, impl, "attention:packed", routing
        )
        return out.contiguous(), lse.contiguous()
    chunk_size, topk = _bounded_call(key, chunk_size, topk, min_seq_len)
    chosen, _ = resolve_impl(impl, query, key, value, chunk_size, topk, mask)
    decode = _decode_kernel(chosen, query, key, value, chunk_size, topk, mask, chunk_means)
    CALLS[f"attention:{chosen}{'-decode' if decode is not None else ''}"] += 1
    if decode is not None:
        out, lse = decode(query, key, value, chunk_size, topk, scale, mask, chunk_means, routing=routing)
    elif chosen == "triton":
        # The forward kernel averages the keys itself, with the one means kernel that chunk_means() and the decode
        # kernel use: means a cache took from chunk_means() are bitwise these numbers.
        out, lse = kernels.moba_forward_triton(query, key, value, chunk_size, topk, scale, mask, routing=routing)
    else:
        out, lse = reference.moba_attention_forward(
            query, key, value, chunk_size=chunk_size, topk=topk, scale=scale, attn_mask=mask, chunk_means=chunk_means,
            routing=routing,
        )  # fmt: skip
    return out.contiguous(), lse.contiguous()


def _decode_kernel(chosen, query, key, value, chunk_size, topk, mask, chunk_means):
    """The Triton decode kernel when it can take this call (one query row on the Triton path), else None."""
    if chosen != "triton" or query.shape[2] != 1:
        return None
    if kernels.decode_unsupported_reason(query, key, value, chunk_size, topk, mask, chunk_means) is not None:
        return None
    return kernels.moba_decode_triton


@_attention_op.register_fake
def _attention_fake(
    query,
    key,
    value,
    attn_mask,
    mask_kind,
    chunk_size,
    topk,
    scale,
    min_seq_len,
    impl,
    chunk_means=None,
    routing="head",
):
    b, hq, lq, _ = query.shape
    out = query.new_empty((b, hq, lq, value.shape[-1]))
    lse = query.new_empty((b, hq, lq), dtype=_lse_dtype(query))
    return out, lse


@torch.library.custom_op("moba::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    mask_kind: Tensor | None,
    out: Tensor,
    lse: Tensor,
    chunk_size: int,
    topk: int,
    scale: float,
    min_seq_len: int,
    impl: str,
    chunk_means: Tensor | None = None,
    routing: str = "head",
) -> tuple[Tensor, Tensor, Tensor]:
    check_routing(routing)
    mask, kind = mask_for_moba(attn_mask, mask_kind)
    if kind in DENSE_MASK_KINDS:
        CALLS["attention_backward:dense-sdpa"] += 1
        return dense_fallback.masked_backward(grad_out, query, key, value, attn_mask, scale)
    if kind == MASK_DOCUMENTS:
        bounds = documents_from_mask(attn_mask, query.shape[2]).tolist()
        grads = _packed_backward(
            grad_out, query, key, value, out, lse, bounds, chunk_size, topk, scale, min_seq_len, impl,
            "attention_backward:packed", routing,
        )  # fmt: skip
        return tuple(g.contiguous() for g in grads)
    chunk_size, topk = _bounded_call(key, chunk_size, topk, min_seq_len)
    chosen, _ = resolve_impl(impl, query, key, value, chunk_size, topk, mask)
    CALLS[f"attention_backward:{chosen}"] += 1
    if chosen == "triton":
        dq, dk, dv = kernels.moba_backward_triton(
            grad_out, query, key, value, out, lse, chunk_size, topk, scale, mask, routing=routing
        )
    else:
        # The reference's hand-written gradient formulas (plain PyTorch ops): CPU tensors, or Triton cannot run them.
        dq, dk, dv = reference.moba_attention_backward(
            grad_out,
            query,
            key,
            value,
            out,
            lse,
            chunk_size=chunk_size,
            topk=topk,
            scale=scale,
            attn_mask=mask,
            chunk_means=chunk_means,
            routing=routing,
        )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_backward_op.register_fake
def _attention_backward_fake(
    grad_out,
    query,
    key,
    value,
    attn_mask,
    mask_kind,
    out,
    lse,
    chunk_size,
    topk,
    scale,
    min_seq_len,
    impl,
    chunk_means=None,
    routing="head",
):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, attn_mask, mask_kind, chunk_size, topk, scale, min_seq_len, impl, chunk_means, routing = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, attn_mask, mask_kind, out, lse, chunk_means)
    ctx.params = (chunk_size, topk, scale, min_seq_len, impl)
    ctx.routing = routing
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, attn_mask, mask_kind, out, lse, chunk_means = ctx.saved_tensors
    dq, dk, dv = torch.ops.moba.attention_backward(
        grad_out.contiguous(), query, key, value, attn_mask, mask_kind, out, lse, *ctx.params, chunk_means, ctx.routing
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("moba::attention_jvp", mutates_args=())
def _attention_jvp_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    mask_kind: Tensor | None,
    tangent_query: Tensor | None,
    tangent_key: Tensor | None,
    tangent_value: Tensor | None,
    chunk_size: int,
    topk: int,
    scale: float,
    min_seq_len: int,
    impl: str,
    chunk_means: Tensor | None = None,
    routing: str = "head",
) -> tuple[Tensor, Tensor]:
    check_routing(routing)
    mask, kind = mask_for_moba(attn_mask, mask_kind)
    if kind in DENSE_MASK_KINDS:
        CALLS["attention_jvp:dense-sdpa"] += 1
        return dense_fallback.masked_jvp(query, key, value, tangent_query, tangent_key, tangent_value, attn_mask, scale)
    if kind == MASK_DOCUMENTS:
        bounds = documents_from_mask(attn_mask, query.shape[2]).tolist()
        tangents = (tangent_query, tangent_key, tangent_value)
        t_out, t_lse = _packed_jvp(
            query, key, value, tangents, bounds, chunk_size, topk, scale, min_seq_len, impl, "attention_jvp:packed",
            routing,
        )  # fmt: skip
        return t_out.contiguous(), t_lse.contiguous()
    chunk_size, topk = _bounded_call(key, chunk_size, topk, min_seq_len)
    chosen, _ = resolve_impl(impl, query, key, value, chunk_size, topk, mask)
    # There is no Triton JVP kernel: the reference's formulas run (plain PyTorch, O(rows * Lk) blocks), over the
    # selection the Triton forward made when it ran, so tangents belong to the output the forward returned.
    selection = _kernel_selection(chosen, query, key, value, chunk_size, topk, mask, chunk_means, routing)
    CALLS[f"attention_jvp:reference{'' if selection is None else '-triton-gate'}"] += 1
    t_out, t_lse = reference.moba_attention_jvp(
        query,
        key,
        value,
        tangent_query,
        tangent_key,
        tangent_value,
        chunk_size=chunk_size,
        topk=topk,
        scale=scale,
        attn_mask=mask,
        chunk_means=chunk_means,
        selection=selection,
        routing=routing,
    )
    return t_out.contiguous(), t_lse.contiguous()


def _kernel_selection(
    chosen: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    chunk_size: int,
    topk: int,
    mask: Tensor | None,
    chunk_means: Tensor | None,
    routing: str = "head",
) -> Tensor | None:
    """The Triton gate's selection ``[B, Hq, Lq, S]`` that ``moba::attention`` used on the Triton path, else None."""
    if chosen != "triton" or topk <= 1:
        return None
    if _decode_kernel(chosen, query, key, value, chunk_size, topk, mask, chunk_means) is not None:
        sel = kernels.decode_select_chunks_triton(query, key, chunk_size, topk, means=chunk_means, routing=routing)
        return sel.unsqueeze(2)
    return kernels.select_chunks_triton(query, key, chunk_size, topk, routing=routing)


@_attention_jvp_op.register_fake
def _attention_jvp_fake(
    query,
    key,
    value,
    attn_mask,
    mask_kind,
    tangent_query,
    tangent_key,
    tangent_value,
    chunk_size,
    topk,
    scale,
    min_seq_len,
    impl,
    chunk_means=None,
    routing="head",
):
    return _attention_fake(query, key, value, attn_mask, mask_kind, chunk_size, topk, scale, min_seq_len, impl)


def _vmap_by_folding(op: torch._ops.OpOverload, n_args: int, mask_index: int) -> Callable[..., tuple]:
    """A ``register_vmap`` rule for a MoBA op whose tensors all have the batch dim first (masks broadcast to it).

    Every (batch, head) is an independent problem, so the vmapped dim is folded into the batch: one call of the op on
    ``[V * B, ...]`` inputs (an unbatched input is expanded, i.e. copied, to ``V`` entries). A vmapped ``mask_kind``
    (different kinds per entry need different paths) runs the op once per entry instead.
    """
    kind_index = mask_index + 1

    def rule(info, in_dims, *args):
        # Defaulted trailing arguments left out by the caller (chunk_means=None, routing="head"), from the schema.
        args = (*args, *(a.default_value for a in op._schema.arguments[len(args) : n_args]))
        in_dims = (*in_dims, *([None] * (n_args - len(in_dims))))
        v = info.batch_size
        if in_dims[kind_index] is not None:
            per_entry = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims))) for i in range(v)]
            return tuple(torch.stack(parts) for parts in zip(*per_entry)), tuple(0 for _ in per_entry[0])
        folded = list(args)
        for i, (a, d) in enumerate(zip(args, in_dims)):
            if isinstance(a, Tensor) and i not in (mask_index, kind_index):
                a = a.movedim(d, 0) if d is not None else a.expand(v, *a.shape)
                folded[i] = a.reshape(v * a.shape[1], *a.shape[2:])
        mask, d = args[mask_index], in_dims[mask_index]
        if mask is not None and (d is not None or (mask.dim() == 4 and mask.shape[0] != 1)):
            batch = folded[0].shape[0] // v  # the query's batch B
            m = mask.movedim(d, 0) if d is not None else mask.expand(v, *mask.shape)
            m = m.reshape(v, *([1] * (5 - m.dim())), *m.shape[1:])  # [V, B or 1, H or 1, Lq or 1, Lk or 1]
            folded[mask_index] = m.expand(v, batch, *m.shape[2:]).reshape(v * batch, *m.shape[2:])
        outs = op(*folded)
        return tuple(o.unflatten(0, (v, o.shape[0] // v)) for o in outs), tuple(0 for _ in outs)

    return rule


_attention_op.register_vmap(_vmap_by_folding(torch.ops.moba.attention.default, 12, 3))
_attention_backward_op.register_vmap(_vmap_by_folding(torch.ops.moba.attention_backward.default, 15, 4))
_attention_jvp_op.register_vmap(_vmap_by_folding(torch.ops.moba.attention_jvp.default, 15, 3))


_SECOND_ORDER = (
    "moba_attention has first-order derivatives only (gradients, JVPs, vmap of either): differentiating its "
    "backward (double backward, Hessians, jacfwd of a gradient) is not implemented. Use dense attention "
    "(torch.nn.functional.scaled_dot_product_attention, math backend) where second-order derivatives are needed."
)


def _first_order_only(op: Callable[..., tuple], name: str) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` that runs the backward op ``op`` where its own derivatives could be asked for:
    first-order use works under every transform (vmap rules generated from the op's own); a second-order derivative
    raises :data:`_SECOND_ORDER` instead of a zero or an unrelated error. Shared by the attention and packed ops."""

    def forward(*args):
        return op(*args)

    def setup_context(ctx, inputs, output) -> None:
        pass

    def refuse(ctx, *grads):
        raise NotImplementedError(_SECOND_ORDER)

    body = {"generate_vmap_rule": True, "forward": staticmethod(forward), "setup_context": staticmethod(setup_context)}
    body.update(
        backward=staticmethod(refuse), jvp=staticmethod(refuse), __doc__=f"``{name}``: {_first_order_only.__doc__}"
    )
    return type(name, (torch.autograd.Function,), body)


_AttentionBackwardFunction = _first_order_only(torch.ops.moba.attention_backward, "_AttentionBackwardFunction")


class _AttentionFunction(torch.autograd.Function):
    """``moba::attention`` for eager autograd in every mode: reverse mode (``backward``), forward mode (``jvp``,
    through ``moba::attention_jvp``) and ``torch.func`` transforms (``setup_context``; vmap rules generated from the
    ops' own). The op's registered autograd alone is reverse-mode only, and without ``setup_context`` (which
    ``torch.library`` does not give it) ``torch.func.grad`` rejects it. Not used under ``torch.compile``: Dynamo breaks
    the graph on an autograd.Function with a custom ``jvp``, while the op itself compiles with its registered backward.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        query, key, value, attn_mask, mask_kind, chunk_size, topk, scale, min_seq_len, impl, chunk_means, routing
    ):
        return torch.ops.moba.attention(
            query, key, value, attn_mask, mask_kind, chunk_size, topk, scale, min_seq_len, impl, chunk_means, routing
        )

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _setup_context(ctx, inputs, output)
        query, key, value, attn_mask, mask_kind, *_, chunk_means, _ = inputs
        ctx.save_for_forward(query, key, value, attn_mask, mask_kind, chunk_means)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, attn_mask, mask_kind, out, lse, chunk_means = ctx.saved_tensors
        args = (
            grad_out.contiguous(), query, key, value, attn_mask, mask_kind, out, lse, *ctx.params, chunk_means,
            ctx.routing,
        )  # fmt: skip
        if torch._C._are_functorch_transforms_active() or torch.is_grad_enabled():
            # torch.func and create_graph=True differentiate the backward too: the op's generated autograd would be
            # rejected by torch.func (no setup_context) or fail with a message that does not name moba_attention.
            dq, dk, dv = _AttentionBackwardFunction.apply(*args)
        else:
            dq, dk, dv = torch.ops.moba.attention_backward(*args)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tangent_query, tangent_key, tangent_value, *_):
        query, key, value, attn_mask, mask_kind, chunk_means = ctx.saved_tensors
        t_out, _ = torch.ops.moba.attention_jvp(
            query, key, value, attn_mask, mask_kind, tangent_query, tangent_key, tangent_value, *ctx.params,
            chunk_means, ctx.routing,
        )  # fmt: skip
        return t_out, None  # lse is marked non-differentiable (it is an internal output)


def _needs_autograd_function(query: Tensor, key: Tensor, value: Tensor) -> bool:
    # Plain inference calls the op directly: nothing is saved, and no autograd.Function overhead per decode step.
    if torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    mask_kind: Tensor | None = None,
    min_seq_len: int = 0,
    impl: str = "auto",
    chunk_means: Tensor | None = None,
    routing: str = "head",
) -> Tensor:
    """Validate a MoBA call and run ``moba::attention``; differentiable; returns only the output.

    See :func:`moba_compile.moba_attention` for shapes, dtypes, ``routing`` and errors. ``mask_kind`` and
    ``min_seq_len`` are the compile pass's knobs (see the module docstring); ``chunk_means`` are gate means a KV cache
    kept (:class:`moba_compile.hf.MobaCache`), so a decode step need not average every key.

    Example:
        >>> q = torch.randn(1, 2, 16, 8)
        >>> attention(q, q, q, chunk_size=4, topk=2).shape
        torch.Size([1, 2, 16, 8])
    """
    check_moba_inputs(query, key, value, chunk_size, topk, scale, attn_mask)
    check_routing(routing)
    if isinstance(min_seq_len, bool) or not isinstance(min_seq_len, int):
        raise TypeError(f"min_seq_len must be an int >= 0, got {min_seq_len!r} ({type(min_seq_len).__name__})")
    if not 0 <= min_seq_len <= INT64_MAX:
        raise ValueError(f"min_seq_len must be in [0, 2**63 - 1], got {min_seq_len}")
    if not torch.compiler.is_compiling():
        # Raise early for an impossible impl. Traced, the op's body decides (and raises) at run time: torch 2.11's
        # Dynamo cannot trace the Triton install check (importlib's find_spec) and would break the graph here.
        resolve_impl(impl, query, key, value, chunk_size, topk, attn_mask)
    args = (query, key, value, attn_mask, mask_kind, chunk_size, topk, _scale(query, scale), min_seq_len, impl)
    if not torch.compiler.is_compiling() and _needs_autograd_function(query, key, value):
        out, _ = _AttentionFunction.apply(*args, chunk_means, routing)
    else:
        out, _ = torch.ops.moba.attention(*args, chunk_means, routing)
    return out


def chunk_means(key: Tensor, chunk_size: int, *, impl: str = "auto") -> Tensor:
    """Means of the complete key chunks, the numbers the MoBA gate scores: what a KV cache keeps for decode steps.

    A cache calls it for newly completed chunks (e.g. ``chunk_means(keys[:, :, c0 * C:(c1 + 1) * C], C)`` appends rows
    ``c0 .. c1``, since a chunk's mean depends on its own keys only) and passes the rows it kept as
    ``chunk_means=`` to :func:`attention`. The implementation is chosen as for a decode step of :func:`attention` on
    these keys, so the means are bitwise the ones that call would compute itself: on the Triton path the one Triton
    means kernel (shared by the prefill gate and the decode kernels; IEEE division), on the reference path
    :func:`moba_compile.reference.chunk_means`. The two paths agree to fp32 rounding, not bitwise (docs/kernels.md,
    "Chunk means").

    Args:
        key: ``[B, Hkv, Lk, D]``, floating, any strides and device.
        chunk_size: ``C >= 1``.
        impl: ``"auto"`` (Triton on CUDA where the kernels take these keys, else the reference), ``"triton"`` (also on
            CPU tensors under ``TRITON_INTERPRET=1``) or ``"reference"``; see :func:`resolve_impl`.

    Returns:
        ``[B, Hkv, Lk // C, D]`` contiguous on ``key``'s device, fp32 (fp64 for fp64 keys on the reference path): row
        ``c`` is the mean of keys ``[c*C, (c+1)*C)``. A partial last chunk is excluded (its mean changes as keys
        arrive); ``Lk < C`` gives zero rows.

    Raises:
        ValueError: ``key`` is not 4-D, ``chunk_size`` is not an int >= 1, or ``impl`` is unknown.
        RuntimeError: ``impl="triton"`` cannot run these keys; the message gives the reason.

    Example:
        >>> chunk_means(torch.ones(1, 2, 40, 16), 16).shape
        torch.Size([1, 2, 2, 16])
    """
    if not isinstance(key, Tensor) or key.dim() != 4:
        raise ValueError(f"key must be a 4-D tensor [B, Hkv, Lk, D], got {getattr(key, 'shape', key)!r}")
    check_moba_params(chunk_size, 1)
    # Through the op, not the launcher: a compiled graph (the static-cache decode step, a cache traced by Dynamo)
    # propagates fake tensors through its nodes, and a Triton launch cannot run on those.
    return _chunk_means_op(key, chunk_size, impl)


@torch.library.custom_op("moba::chunk_means", mutates_args=())
def _chunk_means_op(key: Tensor, chunk_size: int, impl: str) -> Tensor:
    n_complete = key.shape[2] // chunk_size
    # The decode step this cache serves: one query row per key head (only metadata is read). An empty cache has no
    # step to serve yet: its query is as empty as its keys, which every implementation answers with zero rows.
    query = key[:, :, :1]
    chosen, _ = resolve_impl(impl, query, key, key, chunk_size, 1)
    CALLS[f"chunk_means:{chosen}"] += 1
    if chosen == "triton":
        return kernels.launch_chunk_means(key, chunk_size, n_complete)
    # Sliced from the means of every chunk, as the reference op computes them when no means are given.
    return reference.chunk_means(key, chunk_size)[:, :, :n_complete].contiguous()


@_chunk_means_op.register_fake
def _(key: Tensor, chunk_size: int, impl: str) -> Tensor:
    b, h, lk, d = key.shape
    dtype = torch.float64 if key.dtype == torch.float64 else torch.float32
    return key.new_empty((b, h, lk // chunk_size, d), dtype=dtype)


# The packed-sequence, static-cache and dense-site ops live in their own modules; these names stay reachable as
# ``ops.<name>`` (and ``moba::attention`` runs a packed-documents mask through the packed module's forward). Imported
# last: those modules import from this one.
from .dense_ops import dense_attention  # noqa: E402
from .packed_ops import (  # noqa: E402
    SHARED_LAUNCH_BELOW,
    _packed_backward,
    _packed_forward,
    _packed_jvp,
    packed_attention,
)
from .static_decode_ops import (  # noqa: E402
    dense_decode,
    split_k_unsupported_reason,
    static_chunk_means_buffer,
    static_decode,
    static_length_from_mask,
    update_static_chunk_means_,
)
