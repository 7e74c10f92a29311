"""The packed-sequence ops (``moba::packed_attention`` and its backward and forward-mode ops): every document of a
packed row is MoBA on its own (spec section 6, ``docs/semantics.md`` "Packed sequences").

A document runs the ordinary kernels (or the reference) on its own slice of the packed row, so its chunks start at its
first token; documents shorter than :data:`SHARED_LAUNCH_BELOW` share padded launches. Split from
:mod:`moba_compile.ops`, which re-exports the public names and whose ``moba::attention`` runs a ``MASK_DOCUMENTS`` mask
through :func:`_packed_forward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import kernels, reference
from .ops import (
    CALLS,
    IMPLS,
    _attention_fake,
    _bounded_call,
    _first_order_only,
    _kernel_selection,
    _lse_dtype,
    _needs_autograd_function,
    _scale,
    resolve_impl,
)
from .validation import (
    INT64_MAX,
    bounded_params,
    check_cu_seqlens,
    check_moba_params,
    check_packed_inputs,
    check_routing,
)

__all__ = ["SHARED_LAUNCH_BELOW", "packed_attention"]


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
    routing: str = "head",
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
            o_d, lse_d = kernels.moba_forward_triton(q_d, k_d, v_d, cs, tk, scale, None, routing=routing)
        else:
            o_d, lse_d = reference.moba_attention_forward(
                q_d, k_d, v_d, chunk_size=cs, topk=tk, scale=scale, routing=routing
            )
        out[:, :, s:e] = o_d
        lse[:, :, s:e] = lse_d
    for padded, cs, tk, docs in plan.shared:
        CALLS[f"{counter}:triton"] += len(docs)
        CALLS[f"{counter}:triton-shared-launch"] += 1
        q_p, k_p, v_p = (_gather_documents(x, docs, padded) for x in (query, key, value))
        o_p, lse_p = kernels.moba_forward_triton(q_p, k_p, v_p, cs, tk, scale, None, routing=routing)
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
    routing: str = "head",
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)
    plan = _PackedPlan(_doc_calls(query, key, value, bounds, chunk_size, topk, min_seq_len, impl), chunk_size, topk)
    for s, e, cs, tk, chosen in plan.alone:
        CALLS[f"{counter}:{chosen}"] += 1
        args = (grad_out[:, :, s:e], query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], out[:, :, s:e], lse[:, :, s:e])
        if chosen == "triton":
            g = kernels.moba_backward_triton(*args, cs, tk, scale, None, routing=routing)
        else:
            g = reference.moba_attention_backward(*args, chunk_size=cs, topk=tk, scale=scale, routing=routing)
        dq[:, :, s:e], dk[:, :, s:e], dv[:, :, s:e] = g
    for padded, cs, tk, docs in plan.shared:
        CALLS[f"{counter}:triton"] += len(docs)
        CALLS[f"{counter}:triton-shared-launch"] += 1
        q_p, k_p, v_p, do_p, o_p = (_gather_documents(x, docs, padded) for x in (query, key, value, grad_out, out))
        # Padded rows attended nothing as far as the backward knows (lse = -inf: P = 0), so they add nothing.
        lse_p = _gather_documents(lse, docs, padded, fill=-math.inf)
        grads = kernels.moba_backward_triton(do_p, q_p, k_p, v_p, o_p, lse_p, cs, tk, scale, routing=routing)
        for dst, g in zip((dq, dk, dv), grads):
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
    routing: str = "head",
) -> tuple[Tensor, Tensor]:
    b, hq, total, _ = query.shape
    t_out = query.new_empty((b, hq, total, value.shape[-1]))
    t_lse = query.new_empty((b, hq, total), dtype=_lse_dtype(query))
    for s, e, cs, tk, chosen in _doc_calls(query, key, value, bounds, chunk_size, topk, min_seq_len, impl):
        q_d, k_d, v_d = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        # As moba::attention_jvp: the reference's formulas over the selection the forward made (the Triton gate's).
        selection = _kernel_selection(chosen, q_d, k_d, v_d, cs, tk, None, None, routing)
        CALLS[f"{counter}:reference{'' if selection is None else '-triton-gate'}"] += 1
        t = [None if x is None else x[:, :, s:e] for x in tangents]
        t_out[:, :, s:e], t_lse[:, :, s:e] = reference.moba_attention_jvp(
            q_d, k_d, v_d, *t, chunk_size=cs, topk=tk, scale=scale, selection=selection, routing=routing
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
    routing: str = "head",
) -> tuple[Tensor, Tensor]:
    check_moba_params(chunk_size, topk)
    check_routing(routing)
    bounds = check_cu_seqlens(cu_seqlens, key.shape[2])  # the op may be called directly: check before slicing
    out, lse = _packed_forward(
        query, key, value, bounds, chunk_size, topk, scale, min_seq_len, impl, "packed_attention", routing
    )
    return out.contiguous(), lse.contiguous()


@_packed_attention_op.register_fake
def _packed_attention_fake(query, key, value, cu_seqlens, chunk_size, topk, scale, min_seq_len, impl, routing="head"):
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
    routing: str = "head",
) -> tuple[Tensor, Tensor, Tensor]:
    check_moba_params(chunk_size, topk)
    check_routing(routing)
    bounds = check_cu_seqlens(cu_seqlens, key.shape[2])
    grads = _packed_backward(
        grad_out, query, key, value, out, lse, bounds, chunk_size, topk, scale, min_seq_len, impl,
        "packed_attention_backward", routing,
    )  # fmt: skip
    return tuple(g.contiguous() for g in grads)


@_packed_attention_backward_op.register_fake
def _packed_attention_backward_fake(
    grad_out, query, key, value, cu_seqlens, out, lse, chunk_size, topk, scale, min_seq_len, impl, routing="head"
):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _packed_setup_context(ctx, inputs, output) -> None:
    query, key, value, cu_seqlens, chunk_size, topk, scale, min_seq_len, impl, routing = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, cu_seqlens, out, lse)
    ctx.params = (chunk_size, topk, scale, min_seq_len, impl, routing)
    ctx.mark_non_differentiable(lse)


def _packed_backward_rule(ctx, grad_out, grad_lse):
    query, key, value, cu_seqlens, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.moba.packed_attention_backward(
        grad_out.contiguous(), query, key, value, cu_seqlens, out, lse, *ctx.params
    )
    return dq, dk, dv, None, None, None, None, None, None, None


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
    routing: str = "head",
) -> tuple[Tensor, Tensor]:
    check_moba_params(chunk_size, topk)
    check_routing(routing)
    bounds = check_cu_seqlens(cu_seqlens, key.shape[2])
    tangents = (tangent_query, tangent_key, tangent_value)
    t_out, t_lse = _packed_jvp(
        query, key, value, tangents, bounds, chunk_size, topk, scale, min_seq_len, impl, "packed_attention_jvp",
        routing,
    )  # fmt: skip
    return t_out.contiguous(), t_lse.contiguous()


@_packed_attention_jvp_op.register_fake
def _packed_attention_jvp_fake(
    query,
    key,
    value,
    cu_seqlens,
    tangent_query,
    tangent_key,
    tangent_value,
    chunk_size,
    topk,
    scale,
    min_seq_len,
    impl,
    routing="head",
):
    return _attention_fake(query, key, value, None, None, chunk_size, topk, scale, min_seq_len, impl)


def _packed_vmap(op: torch._ops.OpOverload, cu_index: int) -> Callable[..., tuple]:
    """A ``register_vmap`` rule for a packed op: the vmapped dim folds into the batch (every batch row shares the
    documents); a vmapped ``cu_seqlens`` (different documents per entry) runs the op once per entry instead."""

    def rule(info, in_dims, *args):
        v = info.batch_size
        if len(args) < len(op._schema.arguments):  # trailing defaults (routing) left out by the caller
            args = (*args, *(a.default_value for a in op._schema.arguments[len(args) :]))
            in_dims = (*in_dims, *([None] * (len(args) - len(in_dims))))
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


_PackedBackwardFunction = _first_order_only(torch.ops.moba.packed_attention_backward, "_PackedBackwardFunction")


class _PackedAttentionFunction(torch.autograd.Function):
    """``moba::packed_attention`` for eager autograd in every mode (see :class:`_AttentionFunction`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(query, key, value, cu_seqlens, chunk_size, topk, scale, min_seq_len, impl, routing):
        return torch.ops.moba.packed_attention(
            query, key, value, cu_seqlens, chunk_size, topk, scale, min_seq_len, impl, routing
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
        return dq, dk, dv, None, None, None, None, None, None, None

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
    routing: str = "head",
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
        routing: ``"head"`` (default) or ``"group"``, as for :func:`attention`, in every document.

    Returns:
        ``[B, Hq, T, Dv]`` in the query's dtype. Reverse and forward mode and ``torch.func`` transforms as
        :func:`attention` (first order).

    Raises:
        TypeError, ValueError: as :func:`moba_compile.validation.check_packed_inputs`, a bad ``min_seq_len`` or
            ``routing``.
        RuntimeError: ``impl="triton"`` cannot run some document (the reason is given).

    Example:
        >>> q = torch.randn(1, 2, 12, 16)
        >>> cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        >>> out = packed_attention(q, q, q, cu, chunk_size=4, topk=2)
        >>> from moba_compile.ops import attention
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
    check_routing(routing)
    if read:
        _doc_calls(query, key, value, bounds, chunk_size, topk, min_seq_len, impl)  # raises early for impl="triton"
    args = (query, key, value, cu_seqlens, chunk_size, topk, _scale(query, scale), min_seq_len, impl, routing)
    if not compiling and _needs_autograd_function(query, key, value):
        out, _ = _PackedAttentionFunction.apply(*args)
    else:
        out, _ = torch.ops.moba.packed_attention(*args)
    return out
