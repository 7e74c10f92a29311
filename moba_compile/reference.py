"""The MoBA reference: readable eager PyTorch, the spec (moba-spec.md section 1) in code and the oracle of every test.

Layout is SDPA's: ``query [B, Hq, Lq, D]``, ``key [B, Hkv, Lk, D]``, ``value [B, Hkv, Lk, Dv]``, ``Hq % Hkv == 0``.
Query row ``i`` sits at absolute position ``p = Lk - Lq + i`` (causal, bottom-right aligned). Key chunks are
``[c*C, min(Lk, (c+1)*C))``. A query attends causally to its own chunk ``p // C`` plus the ``topk - 1`` strictly earlier
chunks whose fp32 gate score ``q_p . mean(key[c])`` is highest (ties to the later chunk), intersected with an optional
boolean ``attn_mask``. Softmax is exact over that union, accumulated in fp32 (fp64 for fp64 inputs).

``routing="group"`` (spec section 6): for GQA/MQA the score of chunk ``c`` at row ``i`` is the sum over the group's
query heads of ``q_h . mean(key[c])`` (fp32), and its top-(K-1) is shared by every query head of the group. ``"head"``
(the default) is the per-head gate above; with ``Hq == Hkv`` the two are the same.

Memory: queries are processed in blocks of rows, so the largest temporary is ``[B, Hq, rows, Lk]`` rather than
``[B, Hq, Lq, Lk]``; GQA folds the query heads of a group into the row dimension, so key/value are never repeated.

This module is deliberately plain. Kernels never import it; tests always do.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .validation import bounded_params, check_moba_inputs, check_packed_inputs, check_routing

__all__ = [
    "chunk_means",
    "select_chunks",
    "moba_attention",
    "moba_attention_forward",
    "moba_attention_backward",
    "moba_attention_jvp",
    "moba_static_decode_forward",
    "dense_static_decode_forward",
    "moba_attention_packed",
    "moba_attention_packed_forward",
    "moba_attention_packed_backward",
]

# Rows per query block: keep the [B, Hq, rows, Lk] temporaries near 2**24 elements (64 MiB in fp32).
_BLOCK_ELEMENTS = 1 << 24


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_rows(batch: int, heads_q: int, len_q: int, len_k: int) -> int:
    return max(1, min(len_q, _BLOCK_ELEMENTS // max(1, batch * heads_q * len_k)))


def chunk_means(key: Tensor, chunk_size: int) -> Tensor:
    """Mean key of every chunk, accumulated in fp32 (fp64 for fp64 keys).

    Args:
        key: ``[B, Hkv, Lk, D]``, any floating dtype and device.
        chunk_size: ``C >= 1``; the last chunk may be partial and is averaged over its real keys only.

    Returns:
        ``[B, Hkv, ceil(Lk / C), D]`` in fp32 (fp64 for fp64 input), on ``key``'s device. Memory is ``O(Lk)`` for
        any ``C``.

    Example:
        >>> chunk_means(torch.ones(1, 1, 5, 2), 2).shape
        torch.Size([1, 1, 3, 2])
    """
    b, h, lk, d = key.shape
    n = -(-lk // chunk_size)
    # A chunk size beyond Lk is one chunk of Lk keys: padding to chunk_size would cost memory in the parameter.
    chunk_size = min(chunk_size, max(lk, 1))
    acc = _acc_dtype(key.dtype)
    padded = torch.nn.functional.pad(key.to(acc), (0, 0, 0, n * chunk_size - lk))
    sums = padded.view(b, h, n, chunk_size, d).sum(dim=3)
    starts = torch.arange(n, device=key.device) * chunk_size
    counts = (lk - starts).clamp(max=chunk_size).to(acc)
    return sums / counts[:, None]


def _gate_means(key: Tensor, chunk_size: int, given: Tensor | None) -> Tensor:
    """Chunk means for the gate: computed from ``key``, or the caller's (a KV cache keeps them as chunks complete).

    Only chunks strictly before the last row's own chunk are ever scored, so ``given`` needs at least
    ``(Lk - 1) // chunk_size`` rows; the rest are padded (never read).
    """
    if given is None:
        return chunk_means(key, chunk_size)
    b, h, lk, d = key.shape
    n = -(-lk // chunk_size)
    need = (lk - 1) // chunk_size
    if given.dim() != 4 or tuple(given.shape[:2]) != (b, h) or given.shape[3] != d or given.shape[2] < need:
        raise ValueError(
            f"chunk_means must be [B, Hkv, >= {need}, D] = [{b}, {h}, >= {need}, {d}] for Lk={lk}, "
            f"chunk_size={chunk_size}; got {tuple(given.shape)}"
        )
    acc = _acc_dtype(key.dtype)
    means = given[:, :, :n].to(acc)
    if means.shape[2] < n:
        means = torch.nn.functional.pad(means, (0, 0, 0, n - means.shape[2]))
    return means


def _fold_heads(x: Tensor, heads_kv: int) -> Tensor:
    """``[B, Hq, rows, X] -> [B, Hkv, G * rows, X]``: a group's query heads become extra rows of its key head."""
    b, hq, rows, last = x.shape
    return x.reshape(b, heads_kv, (hq // heads_kv) * rows, last)


def _unfold_heads(x: Tensor, heads_q: int) -> Tensor:
    b, _, grows, last = x.shape
    return x.reshape(b, heads_q, grows * x.shape[1] // heads_q, last)


def _gate_scores(query_blk: Tensor, means: Tensor, routing: str) -> Tensor:
    """fp32 (fp64) gate scores of a block of rows against every chunk mean: ``[B, Hq, rows, n]`` per query head
    (``routing="head"``), or ``[B, Hkv, rows, n]`` summed over each group's query heads (``routing="group"``)."""
    b, hq, rows, _ = query_blk.shape
    heads_kv, n = means.shape[1], means.shape[2]
    scores = _fold_heads(query_blk.to(means.dtype), heads_kv) @ means.transpose(-1, -2)  # [B, Hkv, G * rows, n]
    if routing == "group":
        # The spec's sum of per-head fp32 dot products (not a dot with the summed queries: another rounding).
        return scores.view(b, heads_kv, hq // heads_kv, rows, n).sum(dim=2)
    return _unfold_heads(scores, hq)


def _spread_groups(selected: Tensor, heads_q: int) -> Tensor:
    """``[B, Hkv, rows, S] -> [B, Hq, rows, S]``: a group's selection given to each of its query heads."""
    b, hkv, rows, slots = selected.shape
    return selected[:, :, None].expand(b, hkv, heads_q // hkv, rows, slots).reshape(b, heads_q, rows, slots)


def _top_earlier(scores: Tensor, own: Tensor, take: int) -> Tensor:
    """The ``take`` best strictly earlier chunks per row of ``scores [..., rows, n]`` (``own`` broadcastable to
    ``[..., rows]``: each row's own chunk), best first, ties to the later chunk; ``-1`` where a row has fewer."""
    n = scores.shape[-1]
    chunk_ids = torch.arange(n, device=scores.device)
    scores = scores.masked_fill(~(chunk_ids < own[..., None]), -math.inf)
    # Ties go to the later chunk: reverse the chunk order, then a stable descending sort keeps later chunks first.
    order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[..., :take]
    chosen = (n - 1) - order
    return torch.where(chosen < own[..., None], chosen, torch.full_like(chosen, -1))


def _select_block(
    query_blk: Tensor, means: Tensor, positions: Tensor, chunk_size: int, topk: int, routing: str = "head"
) -> Tensor:
    """Top-(K-1) earlier chunks for one block of query rows; ``-1`` marks an unused slot. ``[B, Hq, rows, K-1]``."""
    b, hq, rows, _ = query_blk.shape
    n = means.shape[2]
    want = topk - 1
    out = torch.full((b, hq, rows, want), -1, dtype=torch.long, device=query_blk.device)
    take = min(want, n)
    if take == 0:
        return out
    chosen = _top_earlier(_gate_scores(query_blk, means, routing), positions // chunk_size, take)
    out[..., :take] = _spread_groups(chosen, hq) if routing == "group" else chosen
    return out


def select_chunks(query: Tensor, key: Tensor, *, chunk_size: int, topk: int, routing: str = "head") -> Tensor:
    """The MoBA gate: the earlier chunks each query row attends to besides its own.

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` and ``Lq <= Lk``.
        chunk_size, topk: MoBA parameters (``topk`` counts the own chunk).
        routing: ``"head"`` (one selection per query head) or ``"group"`` (one per key head and row, from the scores
            summed over the group's query heads, the same for every head of the group).

    Returns:
        ``int64 [B, Hq, Lq, K' - 1]`` with ``K' = min(topk, ceil(Lk / chunk_size))`` (no row has more than ``K' - 1``
        earlier chunks, so a larger ``topk`` selects the same and costs no memory): chunk indices in descending score
        order (ties: later chunk first), ``-1`` where the row has fewer than ``K' - 1`` earlier chunks. No gradient
        flows through the gate.

    Raises:
        ValueError, TypeError: as :func:`moba_compile.validation.check_moba_inputs`; ``routing`` not in
            :data:`moba_compile.validation.ROUTINGS`.

    Example:
        >>> q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 1, 8, 4)
        >>> select_chunks(q, k, chunk_size=2, topk=3)[0, 0, -1].tolist()  # row at position 7, own chunk 3
        ... # doctest: +SKIP
        [0, 2]
    """
    shapes = check_moba_inputs(query, key, key, chunk_size, topk)
    check_routing(routing)
    chunk_size, topk = bounded_params(shapes.len_k, chunk_size, topk)
    with torch.no_grad():
        means = chunk_means(key, chunk_size)
        rows = _block_rows(shapes.batch, shapes.heads_q, shapes.len_q, shapes.len_k)
        blocks = []
        for r0 in range(0, shapes.len_q, rows):
            r1 = min(shapes.len_q, r0 + rows)
            pos = torch.arange(r0, r1, device=query.device) + (shapes.len_k - shapes.len_q)
            blocks.append(_select_block(query[:, :, r0:r1], means, pos, chunk_size, topk, routing))
        if not blocks:
            return torch.empty(shapes.batch, shapes.heads_q, 0, topk - 1, dtype=torch.long, device=query.device)
        return torch.cat(blocks, dim=2)


def _allowed_block(selected: Tensor, positions: Tensor, len_k: int, chunk_size: int, mask_blk: Tensor | None) -> Tensor:
    """Boolean ``[B, Hq, rows, Lk]``: own chunk causally, plus the selected chunks, AND the user's mask."""
    b, hq, rows, _ = selected.shape
    n = -(-len_k // chunk_size)
    device = selected.device
    chosen = torch.zeros(b, hq, rows, n + 1, dtype=torch.bool, device=device)
    # Slot n soaks up the -1 placeholders.
    chosen.scatter_(-1, torch.where(selected < 0, n, selected), True)
    key_chunk = torch.arange(len_k, device=device) // chunk_size
    allowed = chosen[..., :n].gather(-1, key_chunk.expand(b, hq, rows, len_k))
    own = (key_chunk[None, :] == (positions // chunk_size)[:, None]) & (
        torch.arange(len_k, device=device)[None, :] <= positions[:, None]
    )
    allowed = allowed | own
    if mask_blk is not None:
        allowed = allowed & mask_blk
    return allowed


def _mask_rows(attn_mask: Tensor | None, shape: tuple[int, int, int, int], r0: int, r1: int) -> Tensor | None:
    if attn_mask is None:
        return None
    return attn_mask.expand(shape)[:, :, r0:r1]


def _blocks(query: Tensor, key: Tensor):
    b, hq, lq, _ = query.shape
    lk = key.shape[2]
    rows = _block_rows(b, hq, lq, lk)
    for r0 in range(0, lq, rows):
        r1 = min(lq, r0 + rows)
        yield r0, r1, torch.arange(r0, r1, device=query.device) + (lk - lq)


def _cat_row_blocks(
    outs: list[Tensor], lses: list[Tensor], query: Tensor, head_dim_v: int, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The row blocks' outputs ``[B, Hq, rows, Dv]`` and LSEs ``[B, Hq, rows]`` joined along the rows: ``(out`` in the
    query's dtype, ``lse`` in ``acc)``; empty tensors of those shapes when there are no rows."""
    if not outs:
        b, hq = query.shape[0], query.shape[1]
        return query.new_zeros(b, hq, 0, head_dim_v), torch.zeros(b, hq, 0, dtype=acc, device=query.device)
    return torch.cat(outs, dim=2).to(query.dtype), torch.cat(lses, dim=2)


def _attend_allowed(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention of a row block over the keys ``allowed`` marks: ``q`` ``[B, Hq, rows, D]``, ``k``/``v``
    ``[B, Hkv, Lk, D/Dv]`` (in the accumulation dtype), ``allowed`` bool ``[B, Hq, rows, Lk]``. Returns ``out``
    ``[B, Hq, rows, Dv]`` and the natural ``lse`` ``[B, Hq, rows]``; a row with no allowed key gets ``out = 0`` and
    ``lse = -inf``. The one softmax of every reference forward (MoBA, static-cache MoBA, static-cache dense)."""
    hq, hkv = q.shape[1], k.shape[1]
    s = (_fold_heads(q, hkv) @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~_fold_heads(allowed, hkv), -math.inf)
    row_max = s.amax(dim=-1, keepdim=True).detach()  # a constant shift: it cancels, also in the gradient
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(s - row_max)  # exp(-inf) = 0 on masked keys, also in the gradient
    denom = p.sum(dim=-1, keepdim=True)
    out = (p @ v) / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return _unfold_heads(out, hq), _unfold_heads(lse.unsqueeze(-1), hq).squeeze(-1)


def moba_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    chunk_means: Tensor | None = None,
    routing: str = "head",
) -> tuple[Tensor, Tensor]:
    """MoBA attention and its log-sum-exp, differentiable by PyTorch autograd (the gate excepted).

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, Lk, D]``; value: ``[B, Hkv, Lk, Dv]``; one floating dtype and
            device; ``Hq % Hkv == 0``; ``Lq <= Lk``.
        chunk_size, topk: MoBA parameters, both ``>= 1``; ``topk`` counts the own chunk.
        scale: softmax scale, default ``1 / sqrt(D)``.
        attn_mask: optional boolean mask broadcastable to ``[B, Hq, Lq, Lk]`` (True = may attend), intersected with
            the MoBA selection; the gate ignores it.
        chunk_means: optional precomputed gate means ``[B, Hkv, >= (Lk - 1) // C, D]`` (what a KV cache keeps), used
            instead of averaging ``key``; they must equal :func:`chunk_means` of ``key`` for the result to be MoBA's.
        routing: ``"head"`` (default, the paper's gate) or ``"group"`` (one selection per key head and row from the
            group-summed scores, shared by the group's query heads); see :func:`select_chunks`.

    Returns:
        ``(out, lse)``: ``out [B, Hq, Lq, Dv]`` in the query's dtype; ``lse [B, Hq, Lq]`` in fp32 (fp64 for fp64
        inputs), the natural log-sum-exp of the scaled scores over the attended keys. A row with no attended key gives
        ``out = 0`` and ``lse = -inf``.

    Raises:
        ValueError, TypeError: as :func:`moba_compile.validation.check_moba_inputs`; an unknown ``routing``.

    Example:
        >>> q = k = v = torch.randn(1, 2, 16, 8)
        >>> out, lse = moba_attention_forward(q, k, v, chunk_size=4, topk=2)
        >>> out.shape, lse.shape
        (torch.Size([1, 2, 16, 8]), torch.Size([1, 2, 16]))
    """
    shapes = check_moba_inputs(query, key, value, chunk_size, topk, scale, attn_mask)
    check_routing(routing)
    # Identical results; no temporary then grows with a topk or chunk_size beyond what Lk keys can use.
    chunk_size, topk = bounded_params(shapes.len_k, chunk_size, topk)
    scale = 1.0 / math.sqrt(shapes.head_dim) if scale is None else float(scale)
    acc = _acc_dtype(query.dtype)
    full = (shapes.batch, shapes.heads_q, shapes.len_q, shapes.len_k)
    with torch.no_grad():
        means = _gate_means(key, chunk_size, chunk_means)
    k32, v32 = key.to(acc), value.to(acc)
    outs, lses = [], []
    for r0, r1, pos in _blocks(query, key):
        q_blk = query[:, :, r0:r1]
        with torch.no_grad():
            sel = _select_block(q_blk, means, pos, chunk_size, topk, routing)
            allowed = _allowed_block(sel, pos, shapes.len_k, chunk_size, _mask_rows(attn_mask, full, r0, r1))
        out, lse = _attend_allowed(q_blk.to(acc), k32, v32, allowed, scale)
        outs.append(out)
        lses.append(lse)
    return _cat_row_blocks(outs, lses, query, shapes.head_dim_v, acc)


def moba_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    routing: str = "head",
) -> Tensor:
    """MoBA attention output only; see :func:`moba_attention_forward` for shapes, dtypes, ``routing`` and errors.

    Example:
        >>> q = k = v = torch.randn(1, 2, 16, 8)
        >>> moba_attention(q, k, v, chunk_size=4, topk=2).shape
        torch.Size([1, 2, 16, 8])
    """
    out, _ = moba_attention_forward(
        query, key, value, chunk_size=chunk_size, topk=topk, scale=scale, attn_mask=attn_mask, routing=routing
    )
    return out


def moba_attention_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    chunk_means: Tensor | None = None,
    routing: str = "head",
) -> tuple[Tensor, Tensor, Tensor]:
    """Hand-written gradients of :func:`moba_attention_forward` (the formulas the kernels implement).

    With ``P = exp(scale * q k^T - lse)`` on attended keys and 0 elsewhere, ``Delta = rowsum(dO * O)``:
    ``dV = P^T dO``, ``dS = P * (dO V^T - Delta)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``; GQA sums over the
    query heads of a group. Rows with no attended key (``lse = -inf``) contribute nothing.

    Args:
        grad_out: ``[B, Hq, Lq, Dv]``, the gradient of ``out``.
        query, key, value, chunk_size, topk, scale, attn_mask, chunk_means, routing: as given to the forward.
        out, lse: the forward's results.

    Returns:
        ``(dq, dk, dv)`` shaped and typed like ``query``, ``key`` and ``value``.

    Example:
        >>> q = k = v = torch.randn(1, 1, 8, 4)
        >>> o, lse = moba_attention_forward(q, k, v, chunk_size=2, topk=2)
        >>> [g.shape for g in moba_attention_backward(torch.ones_like(o), q, k, v, o, lse, chunk_size=2, topk=2)]
        [torch.Size([1, 1, 8, 4]), torch.Size([1, 1, 8, 4]), torch.Size([1, 1, 8, 4])]
    """
    shapes = check_moba_inputs(query, key, value, chunk_size, topk, scale, attn_mask)
    check_routing(routing)
    # Identical results; no temporary then grows with a topk or chunk_size beyond what Lk keys can use.
    chunk_size, topk = bounded_params(shapes.len_k, chunk_size, topk)
    scale = 1.0 / math.sqrt(shapes.head_dim) if scale is None else float(scale)
    acc = _acc_dtype(query.dtype)
    full = (shapes.batch, shapes.heads_q, shapes.len_q, shapes.len_k)
    hkv = shapes.heads_kv
    with torch.no_grad():
        means = _gate_means(key, chunk_size, chunk_means)
        k32, v32 = key.to(acc), value.to(acc)
        dk = torch.zeros_like(k32)
        dv = torch.zeros_like(v32)
        dq_blocks = []
        for r0, r1, pos in _blocks(query, key):
            q_blk = query[:, :, r0:r1]
            sel = _select_block(q_blk, means, pos, chunk_size, topk, routing)
            allowed = _fold_heads(
                _allowed_block(sel, pos, shapes.len_k, chunk_size, _mask_rows(attn_mask, full, r0, r1)), hkv
            )
            q32 = _fold_heads(q_blk.to(acc), hkv)
            do = _fold_heads(grad_out[:, :, r0:r1].to(acc), hkv)
            o = _fold_heads(out[:, :, r0:r1].to(acc), hkv)
            row_lse = _fold_heads(lse[:, :, r0:r1].to(acc).unsqueeze(-1), hkv)
            finite = torch.isfinite(row_lse)
            s = (q32 @ k32.transpose(-1, -2)) * scale
            p = torch.exp(s - torch.where(finite, row_lse, torch.zeros_like(row_lse)))
            p = torch.where(allowed & finite, p, torch.zeros_like(p))
            dv += p.transpose(-1, -2) @ do
            delta = (do * o).sum(dim=-1, keepdim=True)
            ds = p * (do @ v32.transpose(-1, -2) - delta)
            dq_blocks.append(_unfold_heads((ds @ k32) * scale, shapes.heads_q))
            dk += (ds.transpose(-1, -2) @ q32) * scale
        if dq_blocks:
            dq = torch.cat(dq_blocks, dim=2)
        else:
            dq = torch.zeros(query.shape, dtype=acc, device=query.device)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


def moba_attention_jvp(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    tangent_query: Tensor | None,
    tangent_key: Tensor | None,
    tangent_value: Tensor | None,
    *,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    chunk_means: Tensor | None = None,
    selection: Tensor | None = None,
    routing: str = "head",
) -> tuple[Tensor, Tensor]:
    """Forward-mode derivative of :func:`moba_attention_forward`: the tangents of ``out`` and ``lse``.

    The selection is piecewise constant (no derivative through the gate), so this is the JVP of softmax attention over
    the selected keys. With ``P`` the attention probabilities (0 off the attended set) and
    ``dS = scale * (dQ K^T + Q dK^T)``: ``d lse = rowsum(P * dS)`` and
    ``d out = (P * dS) V - d lse * (P V) + P dV``; GQA reads each query head's key head, as the forward.

    Args:
        query, key, value, chunk_size, topk, scale, attn_mask, chunk_means: as for :func:`moba_attention_forward`.
        tangent_query, tangent_key, tangent_value: tangents shaped like ``query``, ``key``, ``value``, or ``None``
            for a zero tangent.
        selection: optional int ``[B, Hq, Lq, S]`` earlier chunks per row (``-1`` = unused slot), e.g. a Triton gate's
            output, so the JVP follows the selection the forward that ran actually made; default: this module's gate.
        routing: the gate's routing (see :func:`moba_attention_forward`), used when ``selection`` is None.

    Returns:
        ``(tangent_out, tangent_lse)``: ``[B, Hq, Lq, Dv]`` in the query's dtype and ``[B, Hq, Lq]`` in fp32 (fp64 for
        fp64 inputs). Rows with no attended key have zero tangents.

    Raises:
        ValueError, TypeError: as :func:`moba_compile.validation.check_moba_inputs`, or a tangent whose shape differs
        from its primal's.

    Example:
        >>> q = k = v = torch.randn(1, 1, 8, 4, dtype=torch.float64)
        >>> t_out, t_lse = moba_attention_jvp(q, k, v, torch.ones_like(q), None, None, chunk_size=4, topk=1)
        >>> t_out.shape, t_lse.shape
        (torch.Size([1, 1, 8, 4]), torch.Size([1, 1, 8]))
    """
    shapes = check_moba_inputs(query, key, value, chunk_size, topk, scale, attn_mask)
    for name, primal, tangent in (
        ("tangent_query", query, tangent_query),
        ("tangent_key", key, tangent_key),
        ("tangent_value", value, tangent_value),
    ):
        if tangent is not None and tangent.shape != primal.shape:
            raise ValueError(f"{name} has shape {tuple(tangent.shape)}, its primal {tuple(primal.shape)}")
    check_routing(routing)
    chunk_size, topk = bounded_params(shapes.len_k, chunk_size, topk)
    scale = 1.0 / math.sqrt(shapes.head_dim) if scale is None else float(scale)
    acc = _acc_dtype(query.dtype)
    full = (shapes.batch, shapes.heads_q, shapes.len_q, shapes.len_k)
    hkv = shapes.heads_kv
    with torch.no_grad():
        means = _gate_means(key, chunk_size, chunk_means) if selection is None else None
        k32, v32 = key.to(acc), value.to(acc)
        tk32 = tangent_key.to(acc) if tangent_key is not None else None
        tv32 = tangent_value.to(acc) if tangent_value is not None else None
        t_outs, t_lses = [], []
        for r0, r1, pos in _blocks(query, key):
            q_blk = query[:, :, r0:r1]
            if selection is None:
                sel = _select_block(q_blk, means, pos, chunk_size, topk, routing)
            else:
                sel = selection[:, :, r0:r1].long()
            allowed = _fold_heads(
                _allowed_block(sel, pos, shapes.len_k, chunk_size, _mask_rows(attn_mask, full, r0, r1)), hkv
            )
            q32 = _fold_heads(q_blk.to(acc), hkv)
            s = ((q32 @ k32.transpose(-1, -2)) * scale).masked_fill(~allowed, -math.inf)
            lse = torch.logsumexp(s, dim=-1, keepdim=True)
            p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))  # 0 off the set
            ds = torch.zeros_like(p)
            if tangent_query is not None:
                ds += (_fold_heads(tangent_query[:, :, r0:r1].to(acc), hkv) @ k32.transpose(-1, -2)) * scale
            if tk32 is not None:
                ds += (q32 @ tk32.transpose(-1, -2)) * scale
            pds = p * ds
            t_lse = pds.sum(dim=-1, keepdim=True)
            t_out = pds @ v32 - t_lse * (p @ v32)
            if tv32 is not None:
                t_out += p @ tv32
            t_outs.append(_unfold_heads(t_out, shapes.heads_q))
            t_lses.append(_unfold_heads(t_lse, shapes.heads_q).squeeze(-1))
        return _cat_row_blocks(t_outs, t_lses, query, shapes.head_dim_v, acc)


def _is_length(length: object, batch: int, device: torch.device) -> bool:
    """Whether ``length`` is a static cache's per-row key count: an integer tensor ``[batch]`` or ``[]`` on ``device``
    (the one check the static-cache references share)."""
    return (
        isinstance(length, Tensor)
        and not length.dtype.is_floating_point
        and not length.dtype.is_complex
        and length.dtype != torch.bool
        and length.dim() <= 1
        and (length.dim() == 0 or length.shape[0] == batch)
        and length.device == device
    )


def _described_length(length: object) -> str:
    """``dtype shape`` of a rejected ``length`` (its type name when it is no tensor), for the error message."""
    return f"{getattr(length, 'dtype', type(length).__name__)} {tuple(getattr(length, 'shape', ()))}"


def moba_static_decode_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    length: Tensor,
    *,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    chunk_means: Tensor | None = None,
    routing: str = "head",
) -> tuple[Tensor, Tensor]:
    """MoBA for queries ending a static KV cache whose length is a device tensor (spec section 6, static-cache decode).

    ``key``/``value`` are the cache's buffers of ``slots`` positions; batch row ``b`` holds ``n_b = length[b]`` keys
    and its ``Lq`` queries sit at positions ``n_b - Lq .. n_b - 1``. The result is
    :func:`moba_attention_forward` of the queries over ``key[b, :, :n_b]`` (bottom-right aligned) for every row:
    slots at or after ``n_b`` are never selected or attended. Computed without reading ``length`` on the host (every
    step masks over the fixed chunk axis), so it is also a graph-safe path, at ``O(Lq * slots)`` cost per head.

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, slots, D]``; value: ``[B, Hkv, slots, Dv]``; one floating dtype and
            device, ``Hq % Hkv == 0``, ``Lq <= slots``.
        length: integer tensor ``[B]`` or ``[]`` (shared by the batch) on the query's device, ``Lq <= n_b <= slots``
            (values outside are clamped to ``[Lq, slots]``: they cannot be checked without a host sync).
        chunk_size, topk, scale, attn_mask: as for :func:`moba_attention_forward` (the mask spans the ``slots``).
        chunk_means: optional gate means ``[B, Hkv, >= (slots - 1) // C, D]`` (a static cache's buffer), used for
            chunks ``c < (n_b - 1) // C`` only; rows at or after a row's own chunk may hold anything. Default:
            :func:`chunk_means` of ``key``.
        routing: ``"head"`` or ``"group"``, as for :func:`moba_attention_forward`.

    Returns:
        ``(out [B, Hq, Lq, Dv] in the query's dtype, lse [B, Hq, Lq] fp32 (fp64 for fp64))``; a row with no attended
        key gives ``out = 0``, ``lse = -inf``.

    Raises:
        ValueError, TypeError: as :func:`moba_compile.validation.check_moba_inputs`; ``length`` not an integer tensor
            of shape ``[B]`` or ``[]`` on the query's device; an unknown ``routing``.

    Example:
        >>> q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 32, 8)
        >>> out, _ = moba_static_decode_forward(q, k, k, torch.tensor([20]), chunk_size=4, topk=2)
        >>> ref, _ = moba_attention_forward(q, k[:, :, :20], k[:, :, :20], chunk_size=4, topk=2)
        >>> torch.allclose(out, ref, atol=1e-6)  # 32 slots vs 20 keys: matmuls of other shapes, fp32 rounding
        True
    """
    shapes = check_moba_inputs(query, key, value, chunk_size, topk, scale, attn_mask)
    b, hq, lq, slots = shapes.batch, shapes.heads_q, shapes.len_q, shapes.len_k
    check_routing(routing)
    if not _is_length(length, b, query.device):
        raise ValueError(
            f"length must be an integer tensor [B={b}] or [] on {query.device}, got {_described_length(length)}"
        )
    # The chunk parameters of the full buffer: a chunk's keys and the top-k count do not depend on the length.
    chunk_size, topk = bounded_params(slots, chunk_size, topk)
    scale = 1.0 / math.sqrt(shapes.head_dim) if scale is None else float(scale)
    acc = _acc_dtype(query.dtype)
    n = -(-slots // chunk_size)
    with torch.no_grad():
        lengths = length.to(torch.int64).clamp(min=lq, max=slots).expand(b)
        means = _gate_means(key, chunk_size, chunk_means)  # [B, Hkv, n, D]
    k32, v32 = key.to(acc), value.to(acc)
    slot_ids = torch.arange(slots, device=query.device)
    key_chunk = slot_ids // chunk_size
    take = min(topk - 1, n)
    outs, lses = [], []
    for r0, r1, _ in _blocks(query, key):
        q_blk = query[:, :, r0:r1]
        rows = r1 - r0
        with torch.no_grad():
            pos = lengths[:, None] - lq + torch.arange(r0, r1, device=query.device)[None, :]  # [B, rows]
            own = pos // chunk_size
            allowed = (key_chunk[None, None, :] == own[:, :, None]) & (slot_ids[None, None, :] <= pos[:, :, None])
            if take > 0:
                # Each batch row's own chunk comes from its device length ([B, 1, rows] broadcasts over the heads).
                chosen = _top_earlier(_gate_scores(q_blk, means, routing), own[:, None], take)
                if routing == "group":
                    chosen = _spread_groups(chosen, hq)  # [B, Hq, rows, take]
                picked = torch.zeros(b, hq, rows, n + 1, dtype=torch.bool, device=query.device)
                picked.scatter_(-1, torch.where(chosen >= 0, chosen, n), True)
                allowed = allowed[:, None] | picked[..., :n].gather(-1, key_chunk.expand(b, hq, rows, slots))
            else:
                allowed = allowed[:, None].expand(b, hq, rows, slots)
            mask_blk = _mask_rows(attn_mask, (b, hq, lq, slots), r0, r1)
            if mask_blk is not None:
                allowed = allowed & mask_blk
        out, lse = _attend_allowed(q_blk.to(acc), k32, v32, allowed, scale)
        outs.append(out)
        lses.append(lse)
    return _cat_row_blocks(outs, lses, query, shapes.head_dim_v, acc)


def dense_static_decode_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    length: Tensor | None,
    *,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Dense causal attention of the queries ending a KV cache, the length a device tensor: graph-safe.

    Row ``b`` holds ``n_b = length[b]`` keys (``length=None``: every slot) and its ``Lq`` queries sit at positions
    ``n_b - Lq .. n_b - 1``; query ``p`` attends to keys ``0 .. p`` (intersected with ``attn_mask``). This is
    :func:`moba_static_decode_forward` with every earlier chunk selected, written as masked softmax attention over all
    ``slots`` (the mask built on the device from ``length``): no host read, fixed shapes, ``O(Lq * slots)`` per head.

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, slots, D]``; value: ``[B, Hkv, slots, Dv]``; one floating dtype and
            device, ``Hq % Hkv == 0``, ``Lq <= slots``.
        length: None, or an integer tensor ``[B]`` or ``[]`` on the query's device (clamped to ``[Lq, slots]``).
        scale: softmax scale (None: ``1 / sqrt(D)``). attn_mask: optional boolean mask broadcastable to
            ``[B, Hq, Lq, slots]`` (True = may attend).

    Returns:
        ``(out [B, Hq, Lq, Dv] in the query's dtype, lse [B, Hq, Lq] fp32 (fp64 for fp64))``; a row with no attended
        key gives ``out = 0``, ``lse = -inf``.

    Raises:
        ValueError, TypeError: as :func:`moba_compile.validation.check_moba_inputs`; ``length`` not an integer tensor
            of shape ``[B]`` or ``[]`` on the query's device.

    Example:
        >>> q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 32, 8)
        >>> out, _ = dense_static_decode_forward(q, k, k, torch.tensor([20]))
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :20], k[:, :, :20], enable_gqa=True)
        >>> torch.allclose(out, ref, atol=1e-6)
        True
    """
    shapes = check_moba_inputs(query, key, value, 1, 1, scale, attn_mask)
    b, hq, lq, slots = shapes.batch, shapes.heads_q, shapes.len_q, shapes.len_k
    if length is not None and not _is_length(length, b, query.device):
        raise ValueError(
            f"length must be None or an integer tensor [B={b}] or [] on {query.device}, got {_described_length(length)}"
        )
    scale = 1.0 / math.sqrt(shapes.head_dim) if scale is None else float(scale)
    acc = _acc_dtype(query.dtype)
    slot_ids = torch.arange(slots, device=query.device)
    if length is None:
        lengths = torch.full((b,), slots, dtype=torch.int64, device=query.device)
    else:
        lengths = length.to(torch.int64).clamp(min=lq, max=slots).expand(b)
    k32, v32 = key.to(acc), value.to(acc)
    outs, lses = [], []
    for r0, r1, _ in _blocks(query, key):
        with torch.no_grad():
            pos = lengths[:, None] - lq + torch.arange(r0, r1, device=query.device)[None, :]  # [B, rows]
            allowed = (slot_ids[None, None, :] <= pos[:, :, None])[:, None].expand(b, hq, r1 - r0, slots)
            mask_blk = _mask_rows(attn_mask, (b, hq, lq, slots), r0, r1)
            if mask_blk is not None:
                allowed = allowed & mask_blk
        out, lse = _attend_allowed(query[:, :, r0:r1].to(acc), k32, v32, allowed, scale)
        outs.append(out)
        lses.append(lse)
    return _cat_row_blocks(outs, lses, query, shapes.head_dim_v, acc)


# --------------------------------------------------------------------------------------------------------------------
# Packed sequences (docs/semantics.md, "Packed sequences"): every document is MoBA on its own
# --------------------------------------------------------------------------------------------------------------------
def _documents(bounds: list[int]):
    for d in range(len(bounds) - 1):
        yield bounds[d], bounds[d + 1]


def moba_attention_packed_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    *,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    routing: str = "head",
) -> tuple[Tensor, Tensor]:
    """MoBA over packed documents, and its log-sum-exp: :func:`moba_attention_forward` on every document alone.

    Document ``d`` is positions ``[cu_seqlens[d], cu_seqlens[d + 1])`` of every batch row. Its chunks are cut from its
    own first token (its last chunk may be partial), a query attends causally in its own chunk and to the top
    ``topk - 1`` strictly earlier chunks of its own document (same fp32 gate and tie rule), never across documents.
    Written as the definition: the result is the concatenation of the per-document results.

    Args:
        query: ``[B, Hq, T, D]``; key: ``[B, Hkv, T, D]``; value: ``[B, Hkv, T, Dv]`` (``T`` the packed length; the
            usual packed layout has ``B = 1``; several rows share the boundaries); one floating dtype and device.
        cu_seqlens: int32/int64 ``[n_docs + 1]`` on the query's device, ``0 = cu[0] < cu[1] < ... < cu[n] = T``.
        chunk_size, topk, scale: as for :func:`moba_attention_forward`; bounded per document (a document shorter
            than a chunk is one chunk: dense causal inside it).
        routing: ``"head"`` or ``"group"``, as for :func:`moba_attention_forward`.

    Returns:
        ``(out [B, Hq, T, Dv]`` in the query's dtype, ``lse [B, Hq, T]`` fp32, fp64 for fp64 inputs``)``.

    Raises:
        ValueError, TypeError: as :func:`moba_compile.validation.check_packed_inputs` (bad boundaries, ``Lq != Lk``).

    Example:
        >>> q = k = v = torch.randn(1, 2, 12, 8)
        >>> cu = torch.tensor([0, 5, 12])
        >>> out, _ = moba_attention_packed_forward(q, k, v, cu, chunk_size=2, topk=2)
        >>> torch.allclose(out[:, :, 5:], moba_attention(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], chunk_size=2, topk=2))
        True
    """
    _, bounds = check_packed_inputs(query, key, value, cu_seqlens, chunk_size, topk, scale)
    outs, lses = [], []
    for s, e in _documents(bounds):
        o, lse = moba_attention_forward(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            chunk_size=chunk_size,
            topk=topk,
            scale=scale,
            routing=routing,
        )
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def moba_attention_packed(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    *,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    routing: str = "head",
) -> Tensor:
    """MoBA over packed documents, output only; see :func:`moba_attention_packed_forward` (also for ``routing``).

    Example:
        >>> q = k = v = torch.randn(1, 1, 6, 4)
        >>> moba_attention_packed(q, k, v, torch.tensor([0, 1, 6]), chunk_size=2, topk=1).shape
        torch.Size([1, 1, 6, 4])
    """
    return moba_attention_packed_forward(
        query, key, value, cu_seqlens, chunk_size=chunk_size, topk=topk, scale=scale, routing=routing
    )[0]


def moba_attention_packed_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    *,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    routing: str = "head",
) -> tuple[Tensor, Tensor, Tensor]:
    """Hand-written gradients of :func:`moba_attention_packed_forward`: :func:`moba_attention_backward` per document.

    Documents share no attended pair, so each document's gradients come from its own rows and keys only.

    Args:
        grad_out: ``[B, Hq, T, Dv]``; query, key, value, cu_seqlens, chunk_size, topk, scale, routing: as for the
            forward;
            out, lse: the forward's results.

    Returns:
        ``(dq, dk, dv)`` shaped and typed like ``query``, ``key``, ``value``.

    Raises:
        ValueError, TypeError: as :func:`moba_compile.validation.check_packed_inputs`.

    Example:
        >>> q = k = v = torch.randn(1, 1, 6, 4)
        >>> cu = torch.tensor([0, 2, 6])
        >>> o, lse = moba_attention_packed_forward(q, k, v, cu, chunk_size=2, topk=1)
        >>> dq, dk, dv = moba_attention_packed_backward(torch.ones_like(o), q, k, v, o, lse, cu, chunk_size=2, topk=1)
        >>> dq.shape
        torch.Size([1, 1, 6, 4])
    """
    _, bounds = check_packed_inputs(query, key, value, cu_seqlens, chunk_size, topk, scale)
    grads: list[tuple[Tensor, Tensor, Tensor]] = []
    for s, e in _documents(bounds):
        grads.append(
            moba_attention_backward(
                grad_out[:, :, s:e],
                query[:, :, s:e],
                key[:, :, s:e],
                value[:, :, s:e],
                out[:, :, s:e],
                lse[:, :, s:e],
                chunk_size=chunk_size,
                topk=topk,
                scale=scale,
                routing=routing,
            )
        )
    dq, dk, dv = (torch.cat(parts, dim=2) for parts in zip(*grads))
    return dq, dk, dv
