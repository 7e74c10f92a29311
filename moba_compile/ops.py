"""The ``moba::`` torch.library ops: schemas, fake kernels, autograd, dispatch to the Triton kernels or the reference.

Ops (all functional but ``moba::update_static_chunk_means_``, which fills a static cache's means buffer):

- ``moba::attention(query, key, value, attn_mask, mask_kind, chunk_size, topk, scale, min_seq_len, impl,
  chunk_means=None) -> (out, lse)``: MoBA attention in the SDPA layout. ``mask_kind`` is an optional result of
  ``moba::analyse_mask`` (the compile pass shares one per mask node): ``MASK_CAUSAL`` drops the mask (MoBA is
  already causal), ``MASK_APPLY`` intersects it with the selection (padding), ``MASK_NOT_CAUSAL`` and
  ``MASK_PER_ROW`` (sliding windows) run dense SDPA with the mask instead: not MoBA; ``MASK_DOCUMENTS`` (the
  block-diagonal causal mask of packed documents) runs every document as MoBA on its own.
  ``min_seq_len``: key sequences shorter than this run dense causal attention. ``chunk_means``: gate means kept by a
  KV cache, so that a decode step need not average every key.
- ``moba::attention_backward(...) -> (dq, dk, dv)``: the registered backward of ``moba::attention``.
- ``moba::attention_jvp(query, key, value, attn_mask, mask_kind, tangent_query, tangent_key, tangent_value, ...)
  -> (tangent_out, tangent_lse)``: forward-mode derivative (plain PyTorch formulas; on the Triton path over the
  selection the Triton gate made).
- ``moba::static_decode(query, key, value, chunk_means, length, attn_mask, chunk_size, topk, scale, impl)
  -> (out, lse)`` and ``moba::update_static_chunk_means_(chunk_means, key, length, new_tokens, chunk_size, impl)``
  (the one mutating op, ``mutates_args=("chunk_means",)``): graph-safe decode on a static KV cache whose length is a
  device tensor (:func:`static_decode`, :func:`update_static_chunk_means_`); inference only.

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
    check_cu_seqlens,
    check_moba_inputs,
    check_moba_params,
    check_packed_inputs,
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
    "chunk_means",
    "packed_attention",
    "SHARED_LAUNCH_BELOW",
    "resolve_impl",
    "static_chunk_means_buffer",
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
) -> tuple[Tensor, Tensor]:
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
            query, key, value, bounds, chunk_size, topk, scale, min_seq_len, impl, "attention:packed"
        )
        return out.contiguous(), lse.contiguous()
    chunk_size, topk = _bounded_call(key, chunk_size, topk, min_seq_len)
    chosen, _ = resolve_impl(impl, query, key, value, chunk_size, topk, mask)
    decode = _decode_kernel(chosen, query, key, value, chunk_size, topk, mask, chunk_means)
    CALLS[f"attention:{chosen}{'-decode' if decode is not None else ''}"] += 1
    if decode is not None:
        out, lse = decode(query, key, value, chunk_size, topk, scale, mask, chunk_means)
    elif chosen == "triton":
        # The forward kernel averages the keys itself, with the one means kernel that chunk_means() and the decode
        # kernel use: means a cache took from chunk_means() are bitwise these numbers.
        out, lse = kernels.moba_forward_triton(query, key, value, chunk_size, topk, scale, mask)
    else:
        out, lse = reference.moba_attention_forward(
            query, key, value, chunk_size=chunk_size, topk=topk, scale=scale, attn_mask=mask, chunk_means=chunk_means
        )
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
    query, key, value, attn_mask, mask_kind, chunk_size, topk, scale, min_seq_len, impl, chunk_means=None
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
) -> tuple[Tensor, Tensor, Tensor]:
    mask, kind = mask_for_moba(attn_mask, mask_kind)
    if kind in DENSE_MASK_KINDS:
        CALLS["attention_backward:dense-sdpa"] += 1
        return dense_fallback.masked_backward(grad_out, query, key, value, attn_mask, scale)
    if kind == MASK_DOCUMENTS:
        bounds = documents_from_mask(attn_mask, query.shape[2]).tolist()
        grads = _packed_backward(
            grad_out, query, key, value, out, lse, bounds, chunk_size, topk, scale, min_seq_len, impl,
            "attention_backward:packed",
        )  # fmt: skip
        return tuple(g.contiguous() for g in grads)
    chunk_size, topk = _bounded_call(key, chunk_size, topk, min_seq_len)
    chosen, _ = resolve_impl(impl, query, key, value, chunk_size, topk, mask)
    CALLS[f"attention_backward:{chosen}"] += 1
    if chosen == "triton":
        dq, dk, dv = kernels.moba_backward_triton(grad_out, query, key, value, out, lse, chunk_size, topk, scale, mask)
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
):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, attn_mask, mask_kind, chunk_size, topk, scale, min_seq_len, impl, chunk_means = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, attn_mask, mask_kind, out, lse, chunk_means)
    ctx.params = (chunk_size, topk, scale, min_seq_len, impl)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, attn_mask, mask_kind, out, lse, chunk_means = ctx.saved_tensors
    dq, dk, dv = torch.ops.moba.attention_backward(
        grad_out.contiguous(), query, key, value, attn_mask, mask_kind, out, lse, *ctx.params, chunk_means
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


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
) -> tuple[Tensor, Tensor]:
    mask, kind = mask_for_moba(attn_mask, mask_kind)
    if kind in DENSE_MASK_KINDS:
        CALLS["attention_jvp:dense-sdpa"] += 1
        return dense_fallback.masked_jvp(query, key, value, tangent_query, tangent_key, tangent_value, attn_mask, scale)
    if kind == MASK_DOCUMENTS:
        bounds = documents_from_mask(attn_mask, query.shape[2]).tolist()
        tangents = (tangent_query, tangent_key, tangent_value)
        t_out, t_lse = _packed_jvp(
            query, key, value, tangents, bounds, chunk_size, topk, scale, min_seq_len, impl, "attention_jvp:packed"
        )
        return t_out.contiguous(), t_lse.contiguous()
    chunk_size, topk = _bounded_call(key, chunk_size, topk, min_seq_len)
    chosen, _ = resolve_impl(impl, query, key, value, chunk_size, topk, mask)
    # There is no Triton JVP kernel: the reference's formulas run (plain PyTorch, O(rows * Lk) blocks), over the
    # selection the Triton forward made when it ran, so tangents belong to the output the forward returned.
    selection = _kernel_selection(chosen, query, key, value, chunk_size, topk, mask, chunk_means)
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
) -> Tensor | None:
    """The Triton gate's selection ``[B, Hq, Lq, S]`` that ``moba::attention`` used on the Triton path, else None."""
    if chosen != "triton" or topk <= 1:
        return None
    if _decode_kernel(chosen, query, key, value, chunk_size, topk, mask, chunk_means) is not None:
        return kernels.decode_select_chunks_triton(query, key, chunk_size, topk, means=chunk_means).unsqueeze(2)
    return kernels.select_chunks_triton(query, key, chunk_size, topk)


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
        args = (*args, *([None] * (n_args - len(args))))  # defaulted trailing arguments
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


_attention_op.register_vmap(_vmap_by_folding(torch.ops.moba.attention.default, 11, 3))
_attention_backward_op.register_vmap(_vmap_by_folding(torch.ops.moba.attention_backward.default, 14, 4))
_attention_jvp_op.register_vmap(_vmap_by_folding(torch.ops.moba.attention_jvp.default, 14, 3))


_SECOND_ORDER = (
    "moba_attention has first-order derivatives only (gradients, JVPs, vmap of either): differentiating its "
    "backward (double backward, Hessians, jacfwd of a gradient) is not implemented. Use dense attention "
    "(torch.nn.functional.scaled_dot_product_attention, math backend) where second-order derivatives are needed."
)


class _AttentionBackwardFunction(torch.autograd.Function):
    """``moba::attention_backward`` where its own derivatives could be asked for: first-order use works under every
    transform; a second-order derivative raises :data:`_SECOND_ORDER` instead of a zero or an unrelated error."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return torch.ops.moba.attention_backward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(_SECOND_ORDER)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_SECOND_ORDER)


class _AttentionFunction(torch.autograd.Function):
    """``moba::attention`` for eager autograd in every mode: reverse mode (``backward``), forward mode (``jvp``,
    through ``moba::attention_jvp``) and ``torch.func`` transforms (``setup_context``; vmap rules generated from the
    ops' own). The op's registered autograd alone is reverse-mode only, and without ``setup_context`` (which
    ``torch.library`` does not give it) ``torch.func.grad`` rejects it. Not used under ``torch.compile``: Dynamo breaks
    the graph on an autograd.Function with a custom ``jvp``, while the op itself compiles with its registered backward.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(query, key, value, attn_mask, mask_kind, chunk_size, topk, scale, min_seq_len, impl, chunk_means):
        return torch.ops.moba.attention(
            query, key, value, attn_mask, mask_kind, chunk_size, topk, scale, min_seq_len, impl, chunk_means
        )

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _setup_context(ctx, inputs, output)
        query, key, value, attn_mask, mask_kind, *_, chunk_means = inputs
        ctx.save_for_forward(query, key, value, attn_mask, mask_kind, chunk_means)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, attn_mask, mask_kind, out, lse, chunk_means = ctx.saved_tensors
        args = (grad_out.contiguous(), query, key, value, attn_mask, mask_kind, out, lse, *ctx.params, chunk_means)
        if torch._C._are_functorch_transforms_active() or torch.is_grad_enabled():
            # torch.func and create_graph=True differentiate the backward too: the op's generated autograd would be
            # rejected by torch.func (no setup_context) or fail with a message that does not name moba_attention.
            dq, dk, dv = _AttentionBackwardFunction.apply(*args)
        else:
            dq, dk, dv = torch.ops.moba.attention_backward(*args)
        return dq, dk, dv, None, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tangent_query, tangent_key, tangent_value, *_):
        query, key, value, attn_mask, mask_kind, chunk_means = ctx.saved_tensors
        t_out, _ = torch.ops.moba.attention_jvp(
            query, key, value, attn_mask, mask_kind, tangent_query, tangent_key, tangent_value, *ctx.params, chunk_means
        )
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
) -> Tensor:
    """Validate a MoBA call and run ``moba::attention``; differentiable; returns only the output.

    See :func:`moba_compile.moba_attention` for shapes, dtypes and errors. ``mask_kind`` and ``min_seq_len`` are the
    compile pass's knobs (see the module docstring); ``chunk_means`` are gate means a KV cache kept
    (:class:`moba_compile.hf.MobaCache`), so a decode step need not average every key.

    Example:
        >>> q = torch.randn(1, 2, 16, 8)
        >>> attention(q, q, q, chunk_size=4, topk=2).shape
        torch.Size([1, 2, 16, 8])
    """
    check_moba_inputs(query, key, value, chunk_size, topk, scale, attn_mask)
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
        out, _ = _AttentionFunction.apply(*args, chunk_means)
    else:
        out, _ = torch.ops.moba.attention(*args, chunk_means)
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


# --------------------------------------------------------------------------------------------------------------------
# Packed sequences (issue 17): every document is MoBA on its own
# --------------------------------------------------------------------------------------------------------------------
# One document's call: (start, end, chunk size, top-k, chosen implementation).
_DocCall = tuple[int, int, int, int, str]


def _doc_calls(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    bounds: list[int],
    chunk_size: int,
    topk: int,
    min_seq_len: int,
    impl: str,
) -> list[_DocCall]:
    """Per document: ``(start, end, chunk_size', topk', chosen impl)``, each bounded and resolved on its own slice.

    A document is a sequence of its own (spec, "Packed sequences"): its chunk size and top-k are clamped to its
    length, ``min_seq_len`` applies to its length, and the implementation is chosen for it (``impl="triton"`` raises
    for a document the kernels cannot run). Every document's slice is a strided view: the kernels take any strides.
    """
    calls = []
    for d in range(len(bounds) - 1):
        s, e = bounds[d], bounds[d + 1]
        k_d = key[:, :, s:e]
        cs, tk = _bounded_call(k_d, chunk_size, topk, min_seq_len)
        chosen, _ = resolve_impl(impl, query[:, :, s:e], k_d, value[:, :, s:e], cs, tk, None)
        calls.append((s, e, cs, tk, chosen))
    return calls


# Documents shorter than this share their launches on the Triton path (see _PackedPlan); longer ones run alone on
# their slice, where one launch sequence is small next to their attention and padding would only waste work.
SHARED_LAUNCH_BELOW = 4096


class _PackedPlan:
    """How the documents of one packed call run: each alone on its slice, or several in one batched launch.

    On the Triton path, documents shorter than :data:`SHARED_LAUNCH_BELOW` are grouped by their length rounded up to a
    power of two (at least 16) and by their MoBA parameters, and each group of two or more runs as one batch of
    documents right-padded to that length. Padding is exact for the real rows: a padded key sits after every real
    row (never in a real row's causal own chunk), a chunk of padding only is never an earlier chunk of a real row, and
    the one chunk that mixes real and padded keys is the document's last, never an earlier chunk of its own rows. In
    the backward the padded rows get ``lse = -inf`` (their probabilities are exactly 0) and ``dO = 0``, so they add
    nothing to a real key's gradients. A document then costs a share of one launch sequence, not one of its own.
    """

    def __init__(self, calls: list[_DocCall], chunk_size: int, topk: int) -> None:
        self.alone: list[_DocCall] = []
        groups: dict[tuple[int, int, int], list[_DocCall]] = {}
        for call in calls:
            s, e, cs, tk, chosen = call
            n = e - s
            if chosen != "triton" or n >= SHARED_LAUNCH_BELOW:
                self.alone.append(call)
                continue
            padded = max(16, 1 << (n - 1).bit_length())
            # The parameters the padded rows run: every chunk where the document selects all of its own (its top-k
            # covers them, or min_seq_len widened it), else the document's top-k; real rows select the same.
            every = tk >= -(-n // cs)
            cs_p, tk_p = bounded_params(padded, chunk_size, padded if every else tk)
            groups.setdefault((padded, cs_p, tk_p), []).append(call)
        self.shared: list[tuple[int, int, int, list[tuple[int, int]]]] = []  # (padded, chunk, topk, documents)
        for (padded, cs_p, tk_p), members in groups.items():
            if len(members) == 1:
                self.alone.append(members[0])
            else:
                self.shared.append((padded, cs_p, tk_p, [(s, e) for s, e, *_ in members]))


def _gather_documents(x: Tensor, docs: list[tuple[int, int]], padded: int, fill: float = 0.0) -> Tensor:
    """``x [B, H, T, ...]`` -> ``[n_docs * B, H, padded, ...]``: each document's rows, right-padded with ``fill``."""
    starts = torch.tensor([s for s, _ in docs], device=x.device)
    lengths = torch.tensor([e - s for s, e in docs], device=x.device)
    offs = torch.arange(padded, device=x.device)
    valid = offs[None, :] < lengths[:, None]  # [n_docs, padded]
    idx = torch.where(valid, starts[:, None] + offs[None, :], 0)
    taken = x.index_select(2, idx.flatten()).unflatten(2, idx.shape)  # [B, H, n_docs, padded, ...]
    shape = (1, 1, *valid.shape, *([1] * (x.dim() - 3)))
    taken = torch.where(valid.view(shape), taken, torch.full((), fill, dtype=x.dtype, device=x.device))
    taken = taken.movedim(2, 0)  # [n_docs, B, H, padded, ...]
    return taken.reshape(taken.shape[0] * taken.shape[1], *taken.shape[2:]).contiguous()


def _scatter_documents(dst: Tensor, src: Tensor, docs: list[tuple[int, int]], padded: int) -> None:
    """Write the real rows of ``src [n_docs * B, H, padded, ...]`` (from :func:`_gather_documents`) into ``dst``."""
    b = dst.shape[0]
    rows = torch.cat([torch.arange(s, e) for s, e in docs]).to(dst.device)
    flat = torch.cat([i * padded + torch.arange(e - s) for i, (s, e) in enumerate(docs)]).to(dst.device)
    src = src.unflatten(0, (len(docs), b)).movedim(0, 2)  # [B, H, n_docs, padded, ...]
    src = src.reshape(*src.shape[:2], len(docs) * padded, *src.shape[4:])
    dst.index_copy_(2, rows, src.index_select(2, flat).to(dst.dtype))


def _packed_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    bounds: list[int],
    chunk_size: int,
    topk: int,
    scale: float,
    min_seq_len: int,
    impl: str,
    counter: str,
) -> tuple[Tensor, Tensor]:
    b, hq, total, _ = query.shape
    out = query.new_empty((b, hq, total, value.shape[-1]))
    lse = query.new_empty((b, hq, total), dtype=_lse_dtype(query))
    plan = _PackedPlan(_doc_calls(query, key, value, bounds, chunk_size, topk, min_seq_len, impl), chunk_size, topk)
    for s, e, cs, tk, chosen in plan.alone:
        CALLS[f"{counter}:{chosen}"] += 1
        q_d, k_d, v_d = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        if chosen == "triton":
            # The unchanged kernels on the document's slice: its chunk grid starts at its first token because the
            # slice does, so no kernel reads a per-(row, key) mask or a boundary table.
            o_d, lse_d = kernels.moba_forward_triton(q_d, k_d, v_d, cs, tk, scale, None)
        else:
            o_d, lse_d = reference.moba_attention_forward(q_d, k_d, v_d, chunk_size=cs, topk=tk, scale=scale)
        out[:, :, s:e] = o_d
        lse[:, :, s:e] = lse_d
    for padded, cs, tk, docs in plan.shared:
        CALLS[f"{counter}:triton"] += len(docs)
        CALLS[f"{counter}:triton-shared-launch"] += 1
        q_p, k_p, v_p = (_gather_documents(x, docs, padded) for x in (query, key, value))
        o_p, lse_p = kernels.moba_forward_triton(q_p, k_p, v_p, cs, tk, scale, None)
        _scatter_documents(out, o_p, docs, padded)
        _scatter_documents(lse, lse_p, docs, padded)
    return out, lse


def _packed_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    bounds: list[int],
    chunk_size: int,
    topk: int,
    scale: float,
    min_seq_len: int,
    impl: str,
    counter: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)
    plan = _PackedPlan(_doc_calls(query, key, value, bounds, chunk_size, topk, min_seq_len, impl), chunk_size, topk)
    for s, e, cs, tk, chosen in plan.alone:
        CALLS[f"{counter}:{chosen}"] += 1
        args = (grad_out[:, :, s:e], query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], out[:, :, s:e], lse[:, :, s:e])
        if chosen == "triton":
            g = kernels.moba_backward_triton(*args, cs, tk, scale, None)
        else:
            g = reference.moba_attention_backward(*args, chunk_size=cs, topk=tk, scale=scale)
        dq[:, :, s:e], dk[:, :, s:e], dv[:, :, s:e] = g
    for padded, cs, tk, docs in plan.shared:
        CALLS[f"{counter}:triton"] += len(docs)
        CALLS[f"{counter}:triton-shared-launch"] += 1
        q_p, k_p, v_p, do_p, o_p = (_gather_documents(x, docs, padded) for x in (query, key, value, grad_out, out))
        # Padded rows attended nothing as far as the backward knows (lse = -inf: P = 0), so they add nothing.
        lse_p = _gather_documents(lse, docs, padded, fill=-math.inf)
        for dst, g in zip((dq, dk, dv), kernels.moba_backward_triton(do_p, q_p, k_p, v_p, o_p, lse_p, cs, tk, scale)):
            _scatter_documents(dst, g, docs, padded)
    return dq, dk, dv


def _packed_jvp(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    tangents: tuple[Tensor | None, Tensor | None, Tensor | None],
    bounds: list[int],
    chunk_size: int,
    topk: int,
    scale: float,
    min_seq_len: int,
    impl: str,
    counter: str,
) -> tuple[Tensor, Tensor]:
    b, hq, total, _ = query.shape
    t_out = query.new_empty((b, hq, total, value.shape[-1]))
    t_lse = query.new_empty((b, hq, total), dtype=_lse_dtype(query))
    for s, e, cs, tk, chosen in _doc_calls(query, key, value, bounds, chunk_size, topk, min_seq_len, impl):
        q_d, k_d, v_d = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        # As moba::attention_jvp: the reference's formulas over the selection the forward made (the Triton gate's).
        selection = _kernel_selection(chosen, q_d, k_d, v_d, cs, tk, None, None)
        CALLS[f"{counter}:reference{'' if selection is None else '-triton-gate'}"] += 1
        t = [None if x is None else x[:, :, s:e] for x in tangents]
        t_out[:, :, s:e], t_lse[:, :, s:e] = reference.moba_attention_jvp(
            q_d, k_d, v_d, *t, chunk_size=cs, topk=tk, scale=scale, selection=selection
        )
    return t_out, t_lse


@torch.library.custom_op("moba::packed_attention", mutates_args=())
def _packed_attention_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    chunk_size: int,
    topk: int,
    scale: float,
    min_seq_len: int,
    impl: str,
) -> tuple[Tensor, Tensor]:
    check_moba_params(chunk_size, topk)
    bounds = check_cu_seqlens(cu_seqlens, key.shape[2])  # the op may be called directly: check before slicing
    out, lse = _packed_forward(
        query, key, value, bounds, chunk_size, topk, scale, min_seq_len, impl, "packed_attention"
    )
    return out.contiguous(), lse.contiguous()


@_packed_attention_op.register_fake
def _packed_attention_fake(query, key, value, cu_seqlens, chunk_size, topk, scale, min_seq_len, impl):
    return _attention_fake(query, key, value, None, None, chunk_size, topk, scale, min_seq_len, impl)


@torch.library.custom_op("moba::packed_attention_backward", mutates_args=())
def _packed_attention_backward_op(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    out: Tensor,
    lse: Tensor,
    chunk_size: int,
    topk: int,
    scale: float,
    min_seq_len: int,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    check_moba_params(chunk_size, topk)
    bounds = check_cu_seqlens(cu_seqlens, key.shape[2])
    grads = _packed_backward(
        grad_out, query, key, value, out, lse, bounds, chunk_size, topk, scale, min_seq_len, impl,
        "packed_attention_backward",
    )  # fmt: skip
    return tuple(g.contiguous() for g in grads)


@_packed_attention_backward_op.register_fake
def _packed_attention_backward_fake(
    grad_out, query, key, value, cu_seqlens, out, lse, chunk_size, topk, scale, min_seq_len, impl
):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _packed_setup_context(ctx, inputs, output) -> None:
    query, key, value, cu_seqlens, chunk_size, topk, scale, min_seq_len, impl = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, cu_seqlens, out, lse)
    ctx.params = (chunk_size, topk, scale, min_seq_len, impl)
    ctx.mark_non_differentiable(lse)


def _packed_backward_rule(ctx, grad_out, grad_lse):
    query, key, value, cu_seqlens, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.moba.packed_attention_backward(
        grad_out.contiguous(), query, key, value, cu_seqlens, out, lse, *ctx.params
    )
    return dq, dk, dv, None, None, None, None, None, None


_packed_attention_op.register_autograd(_packed_backward_rule, setup_context=_packed_setup_context)


@torch.library.custom_op("moba::packed_attention_jvp", mutates_args=())
def _packed_attention_jvp_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    tangent_query: Tensor | None,
    tangent_key: Tensor | None,
    tangent_value: Tensor | None,
    chunk_size: int,
    topk: int,
    scale: float,
    min_seq_len: int,
    impl: str,
) -> tuple[Tensor, Tensor]:
    check_moba_params(chunk_size, topk)
    bounds = check_cu_seqlens(cu_seqlens, key.shape[2])
    tangents = (tangent_query, tangent_key, tangent_value)
    t_out, t_lse = _packed_jvp(
        query, key, value, tangents, bounds, chunk_size, topk, scale, min_seq_len, impl, "packed_attention_jvp"
    )
    return t_out.contiguous(), t_lse.contiguous()


@_packed_attention_jvp_op.register_fake
def _packed_attention_jvp_fake(
    query, key, value, cu_seqlens, tangent_query, tangent_key, tangent_value, chunk_size, topk, scale, min_seq_len, impl
):
    return _attention_fake(query, key, value, None, None, chunk_size, topk, scale, min_seq_len, impl)


def _packed_vmap(op: torch._ops.OpOverload, cu_index: int) -> Callable[..., tuple]:
    """A ``register_vmap`` rule for a packed op: the vmapped dim folds into the batch (every batch row shares the
    documents); a vmapped ``cu_seqlens`` (different documents per entry) runs the op once per entry instead."""

    def rule(info, in_dims, *args):
        v = info.batch_size
        if in_dims[cu_index] is not None:
            per_entry = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims))) for i in range(v)]
            return tuple(torch.stack(parts) for parts in zip(*per_entry)), tuple(0 for _ in per_entry[0])
        folded = list(args)
        for i, (a, d) in enumerate(zip(args, in_dims)):
            if isinstance(a, Tensor) and i != cu_index:
                a = a.movedim(d, 0) if d is not None else a.expand(v, *a.shape)
                folded[i] = a.reshape(v * a.shape[1], *a.shape[2:])
        outs = op(*folded)
        return tuple(o.unflatten(0, (v, o.shape[0] // v)) for o in outs), tuple(0 for _ in outs)

    return rule


_packed_attention_op.register_vmap(_packed_vmap(torch.ops.moba.packed_attention.default, 3))
_packed_attention_backward_op.register_vmap(_packed_vmap(torch.ops.moba.packed_attention_backward.default, 4))
_packed_attention_jvp_op.register_vmap(_packed_vmap(torch.ops.moba.packed_attention_jvp.default, 3))


class _PackedBackwardFunction(torch.autograd.Function):
    """``moba::packed_attention_backward`` where its own derivatives could be asked for: a second-order derivative
    raises :data:`_SECOND_ORDER` (as :class:`_AttentionBackwardFunction`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return torch.ops.moba.packed_attention_backward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(_SECOND_ORDER)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_SECOND_ORDER)


class _PackedAttentionFunction(torch.autograd.Function):
    """``moba::packed_attention`` for eager autograd in every mode (see :class:`_AttentionFunction`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(query, key, value, cu_seqlens, chunk_size, topk, scale, min_seq_len, impl):
        return torch.ops.moba.packed_attention(
            query, key, value, cu_seqlens, chunk_size, topk, scale, min_seq_len, impl
        )

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _packed_setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:4])

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, cu_seqlens, out, lse = ctx.saved_tensors
        args = (grad_out.contiguous(), query, key, value, cu_seqlens, out, lse, *ctx.params)
        if torch._C._are_functorch_transforms_active() or torch.is_grad_enabled():
            dq, dk, dv = _PackedBackwardFunction.apply(*args)
        else:
            dq, dk, dv = torch.ops.moba.packed_attention_backward(*args)
        return dq, dk, dv, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tangent_query, tangent_key, tangent_value, *_):
        query, key, value, cu_seqlens = ctx.saved_tensors
        t_out, _ = torch.ops.moba.packed_attention_jvp(
            query, key, value, cu_seqlens, tangent_query, tangent_key, tangent_value, *ctx.params
        )
        return t_out, None


def packed_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    *,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    min_seq_len: int = 0,
    impl: str = "auto",
) -> Tensor:
    """Validate a packed-sequence MoBA call and run ``moba::packed_attention``; differentiable; the output only.

    Every document ``[cu_seqlens[d], cu_seqlens[d + 1])`` is MoBA on its own (docs/semantics.md, "Packed sequences"):
    chunks from its first token, the gate over its own earlier chunks, never a key of another document. The result
    equals running each document as its own sequence, outputs and gradients. The boundaries are read on the host once
    per call (one device synchronisation): each document runs the Triton kernels (or the reference) on its slice, and
    documents shorter than :data:`SHARED_LAUNCH_BELOW` share launches, right-padded to a common length (exact).

    Args:
        query: ``[B, Hq, T, D]``; key: ``[B, Hkv, T, D]``; value: ``[B, Hkv, T, Dv]``: as for :func:`attention` with
            ``Lq == Lk == T``; every batch row holds the same documents (the usual layout is ``B = 1``).
        cu_seqlens: int32/int64 ``[n_docs + 1]`` on the query's device, ``0 = cu[0] < ... < cu[n] = T``.
        chunk_size, topk, scale, impl: as for :func:`attention`, applied per document. min_seq_len: documents shorter
            than this run dense causal attention (inside the document).

    Returns:
        ``[B, Hq, T, Dv]`` in the query's dtype. Reverse and forward mode and ``torch.func`` transforms as
        :func:`attention` (first order).

    Raises:
        TypeError, ValueError: as :func:`moba_compile.validation.check_packed_inputs`, or a bad ``min_seq_len``.
        RuntimeError: ``impl="triton"`` cannot run some document (the reason is given).

    Example:
        >>> q = torch.randn(1, 2, 12, 16)
        >>> cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        >>> out = packed_attention(q, q, q, cu, chunk_size=4, topk=2)
        >>> torch.allclose(out[:, :, :5], attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], chunk_size=4, topk=2))
        True
    """
    compiling = torch.compiler.is_compiling()
    # Traced, or vmapped over the boundaries themselves, the values cannot be read here: the op's body (once per vmap
    # entry) reads and checks them at run time.
    vmapped = isinstance(cu_seqlens, Tensor) and torch._C._functorch.is_batchedtensor(cu_seqlens)
    read = not (compiling or vmapped)
    _, bounds = check_packed_inputs(query, key, value, cu_seqlens, chunk_size, topk, scale, read_values=read)
    if isinstance(min_seq_len, bool) or not isinstance(min_seq_len, int):
        raise TypeError(f"min_seq_len must be an int >= 0, got {min_seq_len!r} ({type(min_seq_len).__name__})")
    if not 0 <= min_seq_len <= INT64_MAX:
        raise ValueError(f"min_seq_len must be in [0, 2**63 - 1], got {min_seq_len}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    if read:
        _doc_calls(query, key, value, bounds, chunk_size, topk, min_seq_len, impl)  # raises early for impl="triton"
    args = (query, key, value, cu_seqlens, chunk_size, topk, _scale(query, scale), min_seq_len, impl)
    if not compiling and _needs_autograd_function(query, key, value):
        out, _ = _PackedAttentionFunction.apply(*args)
    else:
        out, _ = torch.ops.moba.packed_attention(*args)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Static-cache decode (issue 16): graph-safe, the length a device tensor
# --------------------------------------------------------------------------------------------------------------------
def _static_means_impl(impl: str, key: Tensor, chunk_size: int) -> str:
    """The implementation that averages a static cache's chunks: :func:`chunk_means`'s choice for these keys."""
    return resolve_impl(impl, key[:, :, :1], key, key, chunk_size, 1)[0]


def _no_static_kernel(query, key, value, chunk_size, topk, mask, means) -> str | None:
    """Why the Triton decode kernel cannot take this static-cache step, or None."""
    if query.shape[2] != 1:
        return f"the decode kernel takes one query row, got Lq={query.shape[2]}"
    return kernels.decode_unsupported_reason(query, key, value, chunk_size, topk, mask, means)


def _static_decode_kernel(chosen, query, key, value, chunk_size, topk, mask, means) -> bool:
    """Whether the Triton decode kernel takes this static-cache step (one query row, supported shapes)."""
    if chosen != "triton" or query.shape[2] != 1:
        return False
    return kernels.decode_unsupported_reason(query, key, value, chunk_size, topk, mask, means) is None


@torch.library.custom_op("moba::static_decode", mutates_args=())
def _static_decode_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    chunk_means: Tensor,
    length: Tensor,
    attn_mask: Tensor | None,
    chunk_size: int,
    topk: int,
    scale: float,
    impl: str,
) -> tuple[Tensor, Tensor]:
    check_moba_params(chunk_size, topk)
    chunk_size, topk = bounded_params(key.shape[2], chunk_size, topk)
    chosen, _ = resolve_impl(impl, query, key, value, chunk_size, topk, attn_mask)
    use_kernel = _static_decode_kernel(chosen, query, key, value, chunk_size, topk, attn_mask, chunk_means)
    if impl == "triton" and not use_kernel:
        why = _no_static_kernel(query, key, value, chunk_size, topk, attn_mask, chunk_means)
        raise RuntimeError(f"impl='triton' cannot run this static-cache step: {why}")
    if use_kernel:
        CALLS["static_decode:triton"] += 1
        out, lse = kernels.moba_decode_static_triton(
            query, key, value, chunk_means, length, chunk_size, topk, scale, attn_mask
        )
    else:
        # Several query rows (a chunked step), or inputs the decode kernel does not take: the reference, which masks
        # over the fixed chunk axis too (no host read of the length), at O(Lq * slots) per head.
        CALLS["static_decode:reference"] += 1
        out, lse = reference.moba_static_decode_forward(
            query,
            key,
            value,
            length,
            chunk_size=chunk_size,
            topk=topk,
            scale=scale,
            attn_mask=attn_mask,
            chunk_means=chunk_means,
        )
    return out.contiguous(), lse.contiguous()


@_static_decode_op.register_fake
def _static_decode_fake(query, key, value, chunk_means, length, attn_mask, chunk_size, topk, scale, impl):
    b, hq, lq, _ = query.shape
    return query.new_empty((b, hq, lq, value.shape[-1])), query.new_empty((b, hq, lq), dtype=_lse_dtype(query))


@torch.library.custom_op("moba::update_static_chunk_means_", mutates_args=("chunk_means",))
def _update_static_means_op(
    chunk_means: Tensor, key: Tensor, length: Tensor, new_tokens: int, chunk_size: int, impl: str
) -> None:
    b, hkv, slots, d = key.shape
    rows = chunk_means.shape[2]
    n_upd = min(new_tokens // chunk_size + 1, rows)  # chunks a step of new_tokens keys can complete
    if n_upd == 0 or b == 0:
        return
    chosen = _static_means_impl(impl, key, chunk_size)
    CALLS[f"update_static_chunk_means:{chosen}"] += 1
    if chosen == "triton" and chunk_means.dtype == torch.float32:
        # Three fixed launches (gather the chunks, the one means kernel, write the completed rows): in a captured
        # decode step the generic path below would be a dozen small kernels per layer.
        kernels.update_static_means_triton(chunk_means, key, length, new_tokens, chunk_size)
        return
    dev = key.device
    end = length.to(torch.int64).clamp(0, slots).expand(b)  # keys held after the step
    first = (end - new_tokens).clamp(min=0) // chunk_size  # the first chunk the step's keys can complete
    done = end // chunk_size  # chunks complete after the step
    # n_upd distinct chunk rows covering [first, done): a fixed count whatever the lengths, rows in range.
    start = (done - n_upd).clamp(min=0)
    chunks = start[:, None] + torch.arange(n_upd, device=dev)[None, :]  # [B, n_upd]
    fresh_rows = (chunks >= first[:, None]) & (chunks < done[:, None])
    slots_idx = (chunks[:, :, None] * chunk_size + torch.arange(chunk_size, device=dev)).reshape(b, 1, -1, 1)
    gathered = key.gather(2, slots_idx.expand(b, hkv, n_upd * chunk_size, d))
    # The one means computation of the path (the kernel the prefill gate uses, or the reference's): a chunk's mean
    # depends on its own keys only, so these rows are bitwise the means of the chunks in place.
    if chosen == "triton":
        fresh = kernels.launch_chunk_means(gathered, chunk_size, n_upd)
    else:
        fresh = reference.chunk_means(gathered, chunk_size)
    where = chunks.reshape(b, 1, n_upd, 1).expand(b, hkv, n_upd, d)
    kept = chunk_means.gather(2, where)
    chunk_means.scatter_(2, where, torch.where(fresh_rows[:, None, :, None], fresh.to(chunk_means.dtype), kept))


@_update_static_means_op.register_fake
def _update_static_means_fake(chunk_means, key, length, new_tokens, chunk_size, impl) -> None:
    return None


def _static_length(length: Tensor, batch: int, device: torch.device) -> Tensor:
    """``length`` as the ops take it: contiguous int64 ``[B]`` on the query's device (no host read)."""
    if (
        not isinstance(length, Tensor)
        or length.dtype.is_floating_point
        or length.dtype.is_complex
        or length.dtype == torch.bool
        or length.dim() > 1
        or (length.dim() == 1 and length.shape[0] not in (1, batch))
    ):
        raise ValueError(
            f"length must be an integer tensor of shape [B={batch}], [1] or [] (the keys each batch row holds, on "
            f"the device), got {getattr(length, 'dtype', type(length).__name__)} "
            f"{tuple(getattr(length, 'shape', ()))}"
        )
    if length.device != device:
        raise ValueError(f"length is on {length.device}, the cache on {device}: it must stay on the device")
    return length.to(torch.int64).reshape(-1).expand(batch).contiguous()


def static_length_from_mask(mask: Tensor, batch: int) -> Tensor:
    """The keys each batch row of a static KV cache holds, read from the step's boolean mask on the device.

    A static cache's step masks every slot after its queries' positions (and padding before them), so one past the
    last slot its last query may see is the row's length. No host read, fixed shapes: usable inside a captured step,
    as the ``length`` of :func:`static_decode` and :func:`update_static_chunk_means_`.

    Args:
        mask: boolean ``[B or 1, H or 1, Lq, slots]`` (True = may attend), e.g. the mask transformers builds for a
            static cache's step. A row that allows nothing gives ``slots`` (its queries then attend to nothing).
        batch: ``B``, the batch the result is expanded to.

    Returns:
        int64 ``[B]`` on the mask's device.

    Raises:
        ValueError: ``mask`` is not a 4-D boolean tensor.

    Example:
        >>> mask = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
        >>> mask[0, ..., :5] = True
        >>> mask[1, ..., 2:7] = True  # left padding, then 5 keys
        >>> static_length_from_mask(mask, 2).tolist()
        [5, 7]
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        raise ValueError(f"mask must be a 4-D boolean tensor [B, H, Lq, slots], got {getattr(mask, 'shape', mask)!r}")
    last = mask[:, :, -1, :].any(dim=1)  # [B or 1, slots]: the last query row, any head
    slots = last.shape[-1]
    # argmax returns the first maximum: on the reversed row, the last allowed slot.
    return (slots - last.flip(-1).to(torch.uint8).argmax(dim=-1)).expand(batch)


def static_chunk_means_buffer(key: Tensor, chunk_size: int) -> Tensor:
    """A zeroed chunk-means buffer for a static KV cache of ``key``'s shape: what :func:`static_decode` reads.

    Args:
        key: the cache's key buffer ``[B, Hkv, slots, D]`` (only its shape, dtype and device are read).
        chunk_size: ``C >= 1``, the MoBA chunk size of the layer.

    Returns:
        fp32 (fp64 for fp64 keys, as the reference path averages) ``[B, Hkv, slots // C, D]`` zeros on ``key``'s
        device, for :func:`update_static_chunk_means_` to fill. ``slots`` need not be a multiple of ``C``: a partial
        last chunk is never an earlier chunk of any position in the buffer, so it needs no mean.

    Raises:
        ValueError: ``key`` is not 4-D or ``chunk_size`` is not an int >= 1.

    Example:
        >>> static_chunk_means_buffer(torch.zeros(2, 4, 100, 16), 32).shape
        torch.Size([2, 4, 3, 16])
    """
    if not isinstance(key, Tensor) or key.dim() != 4:
        raise ValueError(f"key must be a 4-D tensor [B, Hkv, slots, D], got {getattr(key, 'shape', key)!r}")
    check_moba_params(chunk_size, 1)
    b, hkv, slots, d = key.shape
    dtype = torch.float64 if key.dtype == torch.float64 else torch.float32
    return torch.zeros(b, hkv, slots // chunk_size, d, dtype=dtype, device=key.device)


def update_static_chunk_means_(
    chunk_means: Tensor, key: Tensor, length: Tensor, *, new_tokens: int, chunk_size: int, impl: str = "auto"
) -> None:
    """Average, in place, the chunks a step's new keys completed in a static cache (``moba::update_static_chunk_means_``
    behind it).

    Call it after the step's ``new_tokens`` keys were written to ``key`` at positions ``length - new_tokens ..
    length - 1`` and before :func:`static_decode`. It writes row ``c`` of ``chunk_means`` for every chunk ``c`` whose
    last key is among the new ones, and leaves the other rows alone; so rows ``c < length // C`` hold the means of the
    chunks as they are, provided every write to the cache went through such a step (a reset cache is refilled from
    position 0, which rewrites every chunk as it completes again). Graph-safe: the work is the same at every length
    (``new_tokens // C + 1`` chunks are gathered and averaged, the rows that did not complete are rewritten with their
    old value), no host synchronisation, fixed shapes: it can run under CUDA-graph capture.

    The means come from the computation :func:`chunk_means` would use for these keys (the one Triton means kernel on
    CUDA, which the prefill gate uses too; the reference's on CPU), so a decode step scores chunks bitwise as its own
    prefill did.

    Args:
        chunk_means: the buffer of :func:`static_chunk_means_buffer` (``[B, Hkv, slots // C, D]``), updated in place.
        key: the cache's key buffer ``[B, Hkv, slots, D]``, floating, on the buffer's device.
        length: integer tensor ``[B]``, ``[1]`` or ``[]`` on the device: keys held after the step (values outside
            ``[0, slots]`` are clamped; they cannot be checked without a host sync).
        new_tokens: keys the step wrote (``Lq``), an int >= 1.
        chunk_size: ``C``, the buffer's chunk size.
        impl: as for :func:`chunk_means`.

    Raises:
        ValueError: shapes, dtypes or devices that do not match, or a bad ``new_tokens``/``chunk_size``/``impl``.
        RuntimeError: ``impl="triton"`` cannot run these keys.

    Example:
        >>> key = torch.randn(1, 2, 64, 16)
        >>> means = static_chunk_means_buffer(key, 16)
        >>> update_static_chunk_means_(means, key, torch.tensor(40), new_tokens=40, chunk_size=16)
        >>> torch.equal(means[:, :, :2], chunk_means(key[:, :, :40], 16))
        True
    """
    if not isinstance(key, Tensor) or key.dim() != 4 or not key.is_floating_point():
        raise ValueError(f"key must be a floating 4-D tensor [B, Hkv, slots, D], got {getattr(key, 'shape', key)!r}")
    check_moba_params(chunk_size, 1)
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be an int >= 1 (the keys the step wrote), got {new_tokens!r}")
    b, hkv, slots, d = key.shape
    want = (b, hkv, slots // chunk_size, d)
    if not isinstance(chunk_means, Tensor) or tuple(chunk_means.shape) != want:
        raise ValueError(
            f"chunk_means must be [B, Hkv, slots // C, D] = {list(want)} for key {list(key.shape)} and chunk_size "
            f"{chunk_size}, got {list(getattr(chunk_means, 'shape', []))} (see static_chunk_means_buffer)"
        )
    if chunk_means.dtype not in (torch.float32, torch.float64) or chunk_means.device != key.device:
        raise ValueError(
            f"chunk_means must be fp32 (fp64 for fp64 keys) on {key.device}, got {chunk_means.dtype} on "
            f"{chunk_means.device}"
        )
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    if not torch.compiler.is_compiling():  # (traced, the op's body decides at run time; Dynamo cannot trace find_spec)
        _static_means_impl(impl, key, chunk_size)  # raises early for an impossible impl
    torch.ops.moba.update_static_chunk_means_(
        chunk_means, key, _static_length(length, b, key.device), new_tokens, chunk_size, impl
    )


def static_decode(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    chunk_means: Tensor,
    length: Tensor,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    impl: str = "auto",
) -> Tensor:
    """MoBA for the queries of a step ending a static KV cache, the length read on the device (``moba::static_decode``).

    ``key``/``value`` are the cache's buffers of ``slots`` positions; batch row ``b`` holds ``length[b]`` keys (the
    step's own included) and its ``Lq`` queries sit at positions ``length[b] - Lq .. length[b] - 1``. The result is
    MoBA of those queries over the row's first ``length[b]`` keys (spec section 1, and section 6 "static-cache
    decode"): slots at or after the length are never selected or attended, however the buffer was filled. The gate
    scores the earlier chunks against ``chunk_means`` (kept by :func:`update_static_chunk_means_`, which must have run
    for this step's keys). Graph-safe: no host synchronisation, no data-dependent shape, the same launches at every
    length, so a decode step can be captured in a CUDA graph (``torch.compile(mode="reduce-overhead")``) and replayed
    while the length grows. ``Lq == 1`` runs the Triton decode kernel (CUDA); several query rows (a chunked step) and
    inputs the kernel does not take run the reference, also graph-safe but ``O(Lq * slots)``.

    Inference only: no gradient is defined (it raises if one would be needed).

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, slots, D]``; value: ``[B, Hkv, slots, Dv]``: as for
            :func:`moba_compile.moba_attention` (one dtype and device, ``Hq % Hkv == 0``).
        chunk_means: the buffer of :func:`static_chunk_means_buffer`, ``[B, Hkv, slots // C, D]``.
        length: integer tensor ``[B]``, ``[1]`` or ``[]`` on the device, ``Lq <= length <= slots`` (clamped to that
            range on the device: it cannot be checked without a host sync).
        chunk_size, topk, scale: MoBA parameters, as for :func:`attention`.
        attn_mask: optional boolean mask broadcastable to ``[B, Hq, Lq, slots]`` (True = may attend; e.g. the
            padding mask transformers builds for a static cache), intersected with the selection; the gate ignores it.
        impl: as for :func:`attention`.

    Returns:
        ``[B, Hq, Lq, Dv]`` contiguous in the query's dtype; a row with no attended key gives zeros.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices or parameters (naming the argument), or ``chunk_means`` not
            shaped for ``key`` and ``chunk_size``.
        RuntimeError: ``impl="triton"`` cannot run the step (the reason is given), or a gradient would be needed.

    Example:
        >>> q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 64, 16)
        >>> means = static_chunk_means_buffer(k, 8)
        >>> update_static_chunk_means_(means, k, torch.tensor(30), new_tokens=30, chunk_size=8)
        >>> out = static_decode(q, k, k, chunk_means=means, length=torch.tensor(30), chunk_size=8, topk=2)
        >>> torch.allclose(out, attention(q, k[:, :, :30], k[:, :, :30], chunk_size=8, topk=2), atol=1e-6)
        True
    """
    check_moba_inputs(query, key, value, chunk_size, topk, scale, attn_mask)
    b, hkv, slots, d = key.shape
    want = (b, hkv, slots // chunk_size, d)
    if not isinstance(chunk_means, Tensor) or tuple(chunk_means.shape) != want:
        raise ValueError(
            f"chunk_means must be [B, Hkv, slots // C, D] = {list(want)} for key {list(key.shape)} and chunk_size "
            f"{chunk_size}, got {list(getattr(chunk_means, 'shape', []))} (see static_chunk_means_buffer)"
        )
    if chunk_means.dtype not in (torch.float32, torch.float64) or chunk_means.device != key.device:
        raise ValueError(
            f"chunk_means must be fp32 (fp64 for fp64 keys) on {key.device}, got {chunk_means.dtype} on "
            f"{chunk_means.device}"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise RuntimeError(
            "static_decode is inference-only (a decode step over a static KV cache): run it under torch.no_grad() "
            "or torch.inference_mode(), or use moba_compile.moba_attention for training"
        )
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    if not torch.compiler.is_compiling():  # raise early; traced, the op's body decides (and raises) at run time
        bounded = bounded_params(slots, chunk_size, topk)
        resolve_impl(impl, query, key, value, *bounded, attn_mask)
        if impl == "triton":
            why = _no_static_kernel(query, key, value, *bounded, attn_mask, chunk_means)
            if why is not None:
                raise RuntimeError(f"impl='triton' cannot run this static-cache step: {why}")
    out, _ = torch.ops.moba.static_decode(
        query, key, value, chunk_means, _static_length(length, b, query.device), attn_mask, chunk_size, topk,
        _scale(query, scale), impl,
    )  # fmt: skip
    return out
