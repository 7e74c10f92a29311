"""The static-cache decode ops: ``moba::static_decode`` and ``moba::update_static_chunk_means_`` (the one mutating
op), graph-safe decode over a static KV cache whose length is a device tensor (issue 16; ``docs/generation.md``),
``moba::static_length`` (that length, read from the step's mask on the device), and ``moba::dense_decode``: a dense
layer's decode step on the same split-K kernels (the policy's ``dense_decode``).

Split from :mod:`moba_compile.ops`, which re-exports the public names.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels, reference
from .ops import CALLS, IMPLS, _lse_dtype, _scale, resolve_impl
from .validation import bounded_params, check_moba_inputs, check_moba_params, check_routing

__all__ = [
    "dense_decode",
    "split_k_unsupported_reason",
    "static_chunk_means_buffer",
    "static_decode",
    "static_length_from_mask",
    "update_static_chunk_means_",
]


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
    routing: str = "head",
) -> tuple[Tensor, Tensor]:
    check_moba_params(chunk_size, topk)
    check_routing(routing)
    chunk_size, topk = bounded_params(key.shape[2], chunk_size, topk)
    chosen, _ = resolve_impl(impl, query, key, value, chunk_size, topk, attn_mask)
    use_kernel = _static_decode_kernel(chosen, query, key, value, chunk_size, topk, attn_mask, chunk_means)
    if impl == "triton" and not use_kernel:
        why = _no_static_kernel(query, key, value, chunk_size, topk, attn_mask, chunk_means)
        raise RuntimeError(f"impl='triton' cannot run this static-cache step: {why}")
    if use_kernel:
        CALLS["static_decode:triton"] += 1
        out, lse = kernels.moba_decode_static_triton(
            query, key, value, chunk_means, length, chunk_size, topk, scale, attn_mask, routing=routing
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
            routing=routing,
        )
    return out.contiguous(), lse.contiguous()


@_static_decode_op.register_fake
def _static_decode_fake(
    query, key, value, chunk_means, length, attn_mask, chunk_size, topk, scale, impl, routing="head"
):
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
        # One fixed launch whose programs average only the chunks the step completed, in place (the others exit at
        # once): in a captured decode step the generic path below would be a dozen small kernels per layer, and would
        # read a chunk's keys at every step.
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


def _check_means_buffer(chunk_means: object, key: Tensor, chunk_size: int) -> None:
    """Raise ``ValueError`` unless ``chunk_means`` is the buffer :func:`static_chunk_means_buffer` makes for ``key``:
    ``[B, Hkv, slots // C, D]``, fp32 (fp64 for fp64 keys), on the key's device."""
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


def _no_length_kernel(impl: str, mask: Tensor) -> str | None:
    """Why the Triton length kernel does not read this mask under ``impl``, or None when it does."""
    if impl == "reference":
        return "impl='reference' requested"
    if not kernels.triton_available():
        return "triton is not installed"
    if impl == "auto" and mask.device.type != "cuda":
        # The interpreter (TRITON_INTERPRET=1) is for testing the kernels, far too slow to pick automatically.
        return f"{mask.device.type.upper()} tensors"
    return kernels.static_length_unsupported_reason(mask)


def _length_reference(mask: Tensor) -> Tensor:
    """``[B or 1]`` int64: one past the last slot the mask's last query row allows in any head (``slots`` if none)."""
    last = mask[:, :, -1, :].any(dim=1)  # [B or 1, slots]: the last query row, any head
    slots = last.shape[-1]
    # argmax returns the first maximum: on the reversed row, the last allowed slot (0 on a row allowing nothing).
    return slots - last.flip(-1).to(torch.uint8).argmax(dim=-1)


@torch.library.custom_op("moba::static_length", mutates_args=())
def _static_length_op(mask: Tensor, impl: str) -> Tensor:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    why = _no_length_kernel(impl, mask)
    if why is not None and impl == "triton":
        raise RuntimeError(f"impl='triton' cannot read this mask's length: {why}")
    if why is None:
        CALLS["static_length:triton"] += 1
        return kernels.static_length_triton(mask)
    CALLS["static_length:reference"] += 1
    return _length_reference(mask).contiguous()


@_static_length_op.register_fake
def _static_length_fake(mask, impl):
    return mask.new_empty((mask.shape[0],), dtype=torch.int64)


def static_length_from_mask(mask: Tensor, batch: int, *, impl: str = "auto") -> Tensor:
    """The keys each batch row of a static KV cache holds, read from the step's boolean mask on the device.

    A static cache's step masks every slot after its queries' positions (and padding before them), so one past the
    last slot its last query may see is the row's length. No host read, fixed shapes: usable inside a captured step,
    as the ``length`` of :func:`static_decode`, :func:`update_static_chunk_means_` and :func:`dense_decode`.

    Runs as ``moba::static_length``: on CUDA a Triton read of the last query row split over blocks of slots (a few
    microseconds at 512K slots; :func:`moba_compile.kernels.static_length_triton`), elsewhere the reference (``any``
    over the heads, ``flip``, ``argmax``). Both give the same result. One opaque op, so that a compiled step does not
    fuse the reduction over the whole slot axis into the mask's construction (on the H200 that fused kernel took
    ~100 us per layer at 512K slots). Counted in ``ops.CALLS`` as ``static_length:triton`` /
    ``static_length:reference``.

    Args:
        mask: boolean ``[B or 1, H or 1, Lq, slots]`` (True = may attend), any strides, e.g. the mask transformers
            builds for a static cache's step; ``Lq >= 1``, ``slots >= 1``. A row that allows nothing gives ``slots``
            (its queries then attend to nothing).
        batch: ``B``, the batch the result is expanded to (the mask's batch is 1 or ``B``).
        impl: ``"auto"`` (the kernel on CUDA, the reference elsewhere), ``"triton"`` (also on CPU tensors under
            ``TRITON_INTERPRET=1``; raises where the kernel cannot run) or ``"reference"``.

    Returns:
        int64 ``[B]`` on the mask's device.

    Raises:
        ValueError: ``mask`` is not a 4-D boolean tensor with a query row and a slot, its batch is neither 1 nor
            ``batch``, or an unknown ``impl``.
        RuntimeError: ``impl="triton"`` cannot run (the reason is given).

    Example:
        >>> mask = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
        >>> mask[0, ..., :5] = True
        >>> mask[1, ..., 2:7] = True  # left padding, then 5 keys
        >>> static_length_from_mask(mask, 2).tolist()
        [5, 7]
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        raise ValueError(f"mask must be a 4-D boolean tensor [B, H, Lq, slots], got {getattr(mask, 'shape', mask)!r}")
    if mask.shape[2] == 0 or mask.shape[3] == 0:
        raise ValueError(f"mask must have a query row and a slot, got shape {list(mask.shape)}")
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"mask's batch {mask.shape[0]} is neither 1 nor the batch {batch}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    if impl == "triton" and not torch.compiler.is_compiling():  # raise early; traced, the op's body raises
        why = _no_length_kernel(impl, mask)
        if why is not None:
            raise RuntimeError(f"impl='triton' cannot read this mask's length: {why}")
    return torch.ops.moba.static_length(mask, impl).expand(batch)


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
    position 0, which rewrites every chunk as it completes again). Graph-safe: the launches are the same at every
    length (``new_tokens // C + 1`` candidate chunks per row, found from ``length`` on the device), no host
    synchronisation, fixed shapes: it can run under CUDA-graph capture. On the Triton path a candidate the step did not
    complete costs nothing but its program's launch, so a decode step that completes no chunk (all but one in ``C``)
    reads no key; the reference path gathers and averages every candidate and writes back only the completed rows.

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
        >>> from moba_compile.ops import chunk_means
        >>> torch.equal(means[:, :, :2], chunk_means(key[:, :, :40], 16))
        True
    """
    if not isinstance(key, Tensor) or key.dim() != 4 or not key.is_floating_point():
        raise ValueError(f"key must be a floating 4-D tensor [B, Hkv, slots, D], got {getattr(key, 'shape', key)!r}")
    check_moba_params(chunk_size, 1)
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be an int >= 1 (the keys the step wrote), got {new_tokens!r}")
    b = key.shape[0]
    _check_means_buffer(chunk_means, key, chunk_size)
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
    routing: str = "head",
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
        impl, routing: as for :func:`attention`.

    Returns:
        ``[B, Hq, Lq, Dv]`` contiguous in the query's dtype; a row with no attended key gives zeros.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices or parameters (naming the argument), or ``chunk_means`` not
            shaped for ``key`` and ``chunk_size``; an unknown ``routing``.
        RuntimeError: ``impl="triton"`` cannot run the step (the reason is given), or a gradient would be needed.

    Example:
        >>> q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 64, 16)
        >>> means = static_chunk_means_buffer(k, 8)
        >>> update_static_chunk_means_(means, k, torch.tensor(30), new_tokens=30, chunk_size=8)
        >>> out = static_decode(q, k, k, chunk_means=means, length=torch.tensor(30), chunk_size=8, topk=2)
        >>> from moba_compile.ops import attention
        >>> torch.allclose(out, attention(q, k[:, :, :30], k[:, :, :30], chunk_size=8, topk=2), atol=1e-6)
        True
    """
    check_moba_inputs(query, key, value, chunk_size, topk, scale, attn_mask)
    b, slots = key.shape[0], key.shape[2]
    _check_means_buffer(chunk_means, key, chunk_size)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise RuntimeError(
            "static_decode is inference-only (a decode step over a static KV cache): run it under torch.no_grad() "
            "or torch.inference_mode(), or use moba_compile.moba_attention for training"
        )
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    check_routing(routing)
    if not torch.compiler.is_compiling():  # raise early; traced, the op's body decides (and raises) at run time
        bounded = bounded_params(slots, chunk_size, topk)
        resolve_impl(impl, query, key, value, *bounded, attn_mask)
        if impl == "triton":
            why = _no_static_kernel(query, key, value, *bounded, attn_mask, chunk_means)
            if why is not None:
                raise RuntimeError(f"impl='triton' cannot run this static-cache step: {why}")
    out, _ = torch.ops.moba.static_decode(
        query, key, value, chunk_means, _static_length(length, b, query.device), attn_mask, chunk_size, topk,
        _scale(query, scale), impl, routing,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------------------------
# Dense decode on the split-K kernels (the policy's dense_decode = "split_k")
# --------------------------------------------------------------------------------------------------------------------
def _no_dense_decode_kernel(impl: str, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> str | None:
    """Why the split-K dense decode kernel does not take this call under ``impl``, or None when it does."""
    if impl == "reference":
        return "impl='reference' requested"
    if not kernels.triton_available():
        return "triton is not installed"
    if impl == "auto" and query.device.type != "cuda":
        # The interpreter (TRITON_INTERPRET=1) is for testing the kernels, far too slow to pick automatically.
        return f"{query.device.type.upper()} tensors"
    return kernels.dense_decode_unsupported_reason(query, key, value, mask)


def split_k_unsupported_reason(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, *, impl: str = "auto"
) -> str | None:
    """Why :func:`dense_decode` would not run its split-K Triton kernels on this call under ``impl``, or None.

    What the policy's ``dense_decode = "split_k"`` asks before it replaces a dense layer's decode step by
    :func:`dense_decode` (the Hugging Face path at each call, the compile pass on the site's fake tensors): where the
    kernels cannot serve, the step keeps its SDPA call and the report gives this reason. Metadata only.

    Args:
        query, key, value, attn_mask: the step's inputs (real or fake tensors), as for :func:`dense_decode`.
        impl: ``"auto"`` (the kernels on CUDA only), ``"triton"`` (also on CPU tensors under ``TRITON_INTERPRET=1``)
            or ``"reference"`` (never the kernels).

    Returns:
        The reason (``"CPU tensors"``, ``"head dim 96 not in (64, 128)"``, ...), or None.

    Example:
        >>> q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 40, 64)
        >>> split_k_unsupported_reason(q, k, k)
        'CPU tensors'
    """
    return _no_dense_decode_kernel(impl, query, key, value, attn_mask)


@torch.library.custom_op("moba::dense_decode", mutates_args=())
def _dense_decode_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    length: Tensor | None,
    attn_mask: Tensor | None,
    scale: float,
    impl: str,
) -> tuple[Tensor, Tensor]:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    why = _no_dense_decode_kernel(impl, query, key, value, attn_mask)
    if why is not None and impl == "triton":
        raise RuntimeError(f"impl='triton' cannot run this dense decode step: {why}")
    if why is None:
        CALLS["dense_decode:triton"] += 1
        out, lse = kernels.dense_decode_triton(query, key, value, scale, attn_mask, length)
    else:
        # Inputs the kernel does not take (CPU, head dims, fp64, several query rows): masked softmax over every slot,
        # the mask built from the device length, so this path is graph-safe too, at O(Lq * slots) per head.
        CALLS["dense_decode:reference"] += 1
        out, lse = reference.dense_static_decode_forward(query, key, value, length, scale=scale, attn_mask=attn_mask)
    return out.contiguous(), lse.contiguous()


@_dense_decode_op.register_fake
def _dense_decode_fake(query, key, value, length, attn_mask, scale, impl):
    b, hq, lq, _ = query.shape
    return query.new_empty((b, hq, lq, value.shape[-1])), query.new_empty((b, hq, lq), dtype=_lse_dtype(query))


def dense_decode(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    length: Tensor | None = None,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    impl: str = "auto",
) -> Tensor:
    """Dense causal attention of the queries ending a KV cache on MoBA's split-K decode kernels (moba::dense_decode).

    Dense attention equals MoBA with every earlier chunk selected, so a dense layer's decode step can run MoBA's decode
    kernels with that selection and no gate (:func:`moba_compile.kernels.dense_decode_triton`): split-K over the
    keys, so that a small batch still spreads a long cache over the whole GPU, and graph-safe on a static cache (the
    length read on the device, grids and allocations fixed by the shapes: CUDA-graph capture and replay). Exact: the
    result is softmax attention over the row's keys up to its position (fp32 accumulation), the same as SDPA's up to
    rounding. This is what the policy's ``dense_decode = "split_k"`` runs for the dense layers of a decode step.

    Row ``b`` holds ``n = length[b]`` keys (``length=None``: all ``slots`` keys, a dynamic cache) and its ``Lq``
    queries sit at positions ``n - Lq .. n - 1``: query ``p`` attends to keys ``0 .. p``, intersected with
    ``attn_mask``; slots at or after ``n`` are never attended. ``Lq == 1`` with supported inputs (CUDA, or CPU under
    ``TRITON_INTERPRET=1`` with ``impl="triton"``; fp16/bf16/fp32; head dims 64 or 128) runs the Triton kernels;
    anything else (CPU under ``"auto"``, other head dims, fp64, several query rows) runs the reference
    (:func:`moba_compile.reference.dense_static_decode_forward`), also graph-safe but ``O(Lq * slots)`` per head.
    Counted in :data:`CALLS` as ``dense_decode:triton`` / ``dense_decode:reference``.

    Inference only: no gradient is defined (it raises if one would be needed).

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, slots, D]``; value: ``[B, Hkv, slots, Dv]``: one floating dtype and
            device, ``Hq % Hkv == 0`` (GQA/MQA: key/value are never repeated), ``Lq <= slots``.
        length: None, or an integer tensor ``[B]``, ``[1]`` or ``[]`` on the query's device: the keys each row holds
            (e.g. :func:`static_length_from_mask` of a static cache's step mask), ``Lq <= length <= slots`` (clamped
            to that range on the device: it cannot be checked without a host sync).
        scale: softmax scale (None: ``1 / sqrt(D)``, SDPA's default).
        attn_mask: optional boolean mask broadcastable to ``[B, Hq, Lq, slots]`` (True = may attend; e.g. the mask
            transformers builds for a static cache's step, with its padding).
        impl: ``"auto"`` (the kernels on CUDA where they take the inputs, else the reference), ``"triton"`` (raises
            where the kernels cannot run) or ``"reference"``.

    Returns:
        ``[B, Hq, Lq, Dv]`` contiguous in the query's dtype; a row with no attended key gives zeros.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices, ``scale``, ``length`` or ``impl`` (naming the argument).
        RuntimeError: ``impl="triton"`` cannot run the call (the reason is given), or a gradient would be needed.

    Example:
        >>> q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 64, 16)
        >>> out = dense_decode(q, k, k, length=torch.tensor([30]))
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :30], k[:, :, :30], enable_gqa=True)
        >>> torch.allclose(out, ref, atol=1e-6)
        True
    """
    check_moba_inputs(query, key, value, 1, 1, scale, attn_mask)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise RuntimeError(
            "dense_decode is inference-only (a decode step over a KV cache): run it under torch.no_grad() or "
            "torch.inference_mode()"
        )
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    if length is not None:
        length = _static_length(length, query.shape[0], query.device)
    if impl == "triton" and not torch.compiler.is_compiling():  # raise early; traced, the op's body raises
        why = _no_dense_decode_kernel(impl, query, key, value, attn_mask)
        if why is not None:
            raise RuntimeError(f"impl='triton' cannot run this dense decode step: {why}")
    out, _ = torch.ops.moba.dense_decode(query, key, value, length, attn_mask, _scale(query, scale), impl)
    return out
