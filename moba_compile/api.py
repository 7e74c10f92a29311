"""The public functional entry point."""

from __future__ import annotations

from torch import Tensor

from . import ops
from .ops import Impl
from .policy import Routing

__all__ = ["moba_attention"]


def moba_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    chunk_size: int,
    topk: int,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    impl: Impl = "auto",
    cu_seqlens: Tensor | None = None,
    routing: Routing = "head",
) -> Tensor:
    """MoBA (Mixture of Block Attention) in the layout of ``torch.nn.functional.scaled_dot_product_attention``.

    Each query row ``i`` sits at position ``p = Lk - Lq + i`` (causal, bottom-right aligned, so prefill, decode and
    chunked prefill all work). Keys are split into chunks of ``chunk_size`` from position 0. The row attends causally to
    its own chunk plus the ``topk - 1`` earlier chunks whose mean key scores highest against it (fp32 gate, ties to the
    later chunk), with exact softmax over that union. With ``topk >= ceil(Lk / chunk_size)`` it equals dense causal
    attention.

    Args:
        query: ``[B, Hq, Lq, D]``.
        key: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (MHA, GQA, MQA; key/value are never repeated in memory)
            and ``Lq <= Lk``.
        value: ``[B, Hkv, Lk, Dv]``.
        chunk_size: keys per chunk, ``>= 1``; the last chunk may be partial. Any ``chunk_size >= Lk`` is one chunk
            (dense causal attention) and costs no memory beyond the sequence's.
        topk: chunks per query including its own, ``>= 1`` (``1`` = own chunk only). Values beyond the number of
            chunks select every earlier chunk, exactly as ``topk = ceil(Lk / chunk_size)``, at that value's cost.
        scale: softmax scale; default ``1 / sqrt(D)``.
        attn_mask: optional boolean mask broadcastable to ``[B, Hq, Lq, Lk]`` (True = may attend). The attended set is
            the MoBA selection AND the mask; the gate ignores the mask. A row left with no key returns zeros (and
            zero gradients). Float (additive) masks are rejected: they are not MoBA.
        impl: ``"auto"`` (Triton kernels on CUDA where they support the inputs, else the reference), ``"triton"``
            (also CPU tensors under ``TRITON_INTERPRET=1``) or ``"reference"``. An explicit ``impl`` that cannot run
            raises; it never falls back silently.
        cu_seqlens: packed sequences: int32/int64 ``[n_docs + 1]`` document boundaries on the query's device,
            ``0 = cu[0] < cu[1] < ... < cu[n] = L`` (the FlashAttention-varlen / fla convention), with ``Lq == Lk == L``
            and no ``attn_mask``. Every document ``[cu[d], cu[d + 1])`` of every batch row (usually ``B = 1``) is MoBA
            on its own: chunks cut from its first token, the gate over its own earlier chunks, never a key of another
            document; the result equals running the documents one by one. The boundaries are read on the host once
            per call.
        routing: ``"head"`` (default, the MoBA paper's gate: every query head chooses its own chunks) or ``"group"``
            (GQA/MQA: one choice per key head and query position, the top-(K-1) of the scores summed over the group's
            query heads, shared by all of them; spec section 6). With ``Hq == Hkv`` the two are the same.

    Returns:
        ``[B, Hq, Lq, Dv]`` in the query's dtype, on its device. Differentiable with respect to query, key and value
        (there is no gradient through the gate) in reverse and forward mode (``torch.func.jvp``,
        ``torch.autograd.forward_ad``) and under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``,
        ``jacfwd``); first-order only: a second-order derivative raises ``NotImplementedError``.

    Raises:
        TypeError, ValueError: malformed inputs, naming the argument (shapes, dtypes, devices, mask kind, parameters,
            including non-int ``chunk_size``/``topk`` and values beyond int64; ``cu_seqlens`` that do not start at 0,
            end at the length or increase, or come with a mask or ``Lq != Lk``; a ``routing`` other than ``"head"`` or
            ``"group"``).
        RuntimeError: ``impl="triton"`` on inputs the kernels cannot run, with the reason.

    Example:
        >>> import torch
        >>> from moba_compile import moba_attention
        >>> q = torch.randn(1, 8, 1024, 64)
        >>> k = v = torch.randn(1, 2, 1024, 64)  # GQA: 4 query heads per key head
        >>> moba_attention(q, k, v, chunk_size=128, topk=3).shape
        torch.Size([1, 8, 1024, 64])
    """
    if cu_seqlens is not None:
        if attn_mask is not None:
            raise ValueError(
                "attn_mask cannot be combined with cu_seqlens (packed documents): a padding mask and packing together "
                "are ambiguous; pack only the real tokens and let cu_seqlens give the documents"
            )
        return ops.packed_attention(
            query, key, value, cu_seqlens, chunk_size=chunk_size, topk=topk, scale=scale, impl=impl, routing=routing
        )
    return ops.attention(
        query, key, value, chunk_size=chunk_size, topk=topk, scale=scale, attn_mask=attn_mask, impl=impl,
        routing=routing,
    )  # fmt: skip
