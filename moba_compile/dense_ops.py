"""Dense SDPA sites at full speed: ``moba::dense_attention`` runs flash where the mask is exactly causal.

On torch 2.11 transformers hands every SDPA call a boolean mask, so a layer the policy keeps dense runs SDPA's masked
kernels (on key/value that ``repeat_kv`` copied) even where the mask is the plain causal one. With the policy's
``dense_sdpa = "flash_when_causal"`` the compile pass replaces such a site by this op, which reads the run-time kind of
its mask (the ``moba::analyse_mask`` result the pass shares per mask node, a CPU scalar: no device read here) and runs

- **flash** when the mask is exactly causal (``MASK_CAUSAL``) and either ``Lq == Lk`` (prefill, training:
  ``is_causal=True``) or ``Lq == 1`` (a decode step, which then needs no mask at all), on the unrepeated key/value
  (the flash kernels take GQA natively): ``aten._scaled_dot_product_flash_attention`` on CUDA,
  ``aten._scaled_dot_product_flash_attention_for_cpu`` on the CPU; its log-sum-exp is kept for the backward;
- otherwise **the SDPA call the site had**: ``F.scaled_dot_product_attention`` with the mask, on key/value repeated
  as the model repeated them, with the call's ``enable_gqa``: the same kernel SDPA picked before, the same numbers.

Both branches are one opaque op with one fake kernel, so the traced graph and the strides of its outputs and gradients
do not depend on the branch (a ``torch.cond`` on the kind failed there: its branches' gradients had different strides).
The output and the gradients are ``[B, H, L, D]`` stored as ``[B, L, H, D]``, whatever the branch and the inputs'
strides: what the flash kernels write for a model's query, and what a model's ``out.transpose(1, 2).contiguous()``
reads without a copy; a kernel that wrote another layout is copied into it.

Ops:

- ``moba::dense_attention(query, key, value, attn_mask, mask_kind, scale, n_rep, enable_gqa) -> (out, lse)``.
- ``moba::dense_attention_backward(grad_out, query, key, value, attn_mask, mask_kind, out, lse, scale, n_rep,
  enable_gqa) -> (dq, dk, dv)``: the flash branch calls the matching ATen flash backward with the saved output and
  log-sum-exp; the masked branch recomputes the SDPA call under autograd (SDPA's own backward kernel, at the price
  of one more forward of that layer).

Executions are counted in :data:`moba_compile.masks.CALLS` as ``dense_attention:flash``, ``dense_attention:masked``,
``dense_attention_backward:flash`` and ``dense_attention_backward:masked``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import CALLS, MASK_CAUSAL

__all__ = [
    "FLASH_CPU_DTYPES",
    "FLASH_CUDA_DTYPES",
    "dense_attention",
    "flash_branch",
    "flash_kernel_unsupported_reason",
    "flash_unsupported_reason",
]

#: Dtypes the flash kernels take: CUDA's flash attention (fp16/bf16 only) and the CPU's flash kernel.
FLASH_CUDA_DTYPES = (torch.float16, torch.bfloat16)
FLASH_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLASH_MAX_HEAD_DIM = 256  # CUDA flash attention's largest head dim


def flash_kernel_unsupported_reason(device: torch.device, dtype: torch.dtype, head_dims: tuple[int, ...]) -> str | None:
    """Why no flash kernel takes inputs of this device, dtype and head dims, or None when one does.

    Reads no shape but the head dims, so the compile pass asks it of a site's fake tensors without a guard on a
    symbolic length; :func:`flash_unsupported_reason` adds the checks of whole shapes at run time.

    Args:
        device: the inputs' device. dtype: their dtype (query, key and value share it).
        head_dims: the head dims of query, key and value.

    Returns:
        The reason, or None.

    Example:
        >>> flash_kernel_unsupported_reason(torch.device("cpu"), torch.int32, (16, 16, 16))
        'flash attention does not take torch.int32 on cpu'
    """
    dtypes = {"cuda": FLASH_CUDA_DTYPES, "cpu": FLASH_CPU_DTYPES}.get(device.type)
    if dtypes is None:
        return f"no flash kernel on {device.type} tensors"
    if dtype not in dtypes:
        return f"flash attention does not take {dtype} on {device.type}"
    d = head_dims[0]
    if any(other != d for other in head_dims):
        return f"flash attention needs one head dim for query, key and value (got {', '.join(map(str, head_dims))})"
    if device.type == "cuda":
        if not torch.backends.cuda.is_flash_attention_available():
            return "this torch build has no CUDA flash attention"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "CUDA flash attention needs compute capability 8.0 or newer"
        if d % 8 != 0 or d > _FLASH_MAX_HEAD_DIM:
            return f"CUDA flash attention needs a head dim that is a multiple of 8 up to 256 (got {d})"
    return None


def flash_unsupported_reason(query: Tensor, key: Tensor, value: Tensor) -> str | None:
    """Why the flash kernels cannot run these inputs (metadata only), or None when they can.

    Both ops ask this of the same tensors, so the forward and its backward always take the same branch; it reads no
    global switch (``torch.backends.cuda.flash_sdp_enabled()``, an ``sdpa_kernel`` block) that could differ between
    the forward and the backward.

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, Lk, D]``; value: ``[B, Hkv, Lk, Dv]``.

    Returns:
        The reason, or None.

    Example:
        >>> q = torch.randn(1, 4, 8, 16)
        >>> flash_unsupported_reason(q, q[:, :2], q[:, :2]) is None
        True
        >>> flash_unsupported_reason(q, q[:, :3], q[:, :3])
        'flash attention needs one batch size and query heads a multiple of key heads'
    """
    if not query.dtype == key.dtype == value.dtype:
        return f"query, key and value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})"
    why = flash_kernel_unsupported_reason(query.device, query.dtype, (query.shape[-1], key.shape[-1], value.shape[-1]))
    if why is not None:
        return why
    if query.shape[0] != key.shape[0] or key.shape[:3] != value.shape[:3] or query.shape[1] % key.shape[1] != 0:
        return "flash attention needs one batch size and query heads a multiple of key heads"
    if any(t.stride(-1) != 1 for t in (query, key, value)):
        return "flash attention needs a unit stride in the head dim"
    return None


def flash_branch(kind: int, query: Tensor, key: Tensor, value: Tensor) -> bool | None:
    """The ``is_causal`` of the flash call that serves a mask of ``kind``, or None when the masked SDPA call must run.

    Args:
        kind: the mask's ``moba::analyse_mask`` kind (a Python int, read from the CPU scalar).
        query, key, value: the op's inputs (key/value unrepeated where the pass saw through ``repeat_kv``).

    Returns:
        True (``Lq == Lk``: causal flash), False (``Lq == 1``: the one query sees every key, no mask) or None.

    Example:
        >>> q = torch.randn(1, 2, 1, 8)
        >>> k = torch.randn(1, 2, 5, 8)
        >>> flash_branch(MASK_CAUSAL, q, k, k)
        False
    """
    lq, lk = query.shape[2], key.shape[2]
    if kind != MASK_CAUSAL or lq == 0 or lk == 0 or flash_unsupported_reason(query, key, value) is not None:
        return None
    if lq == lk:
        return True
    if lq == 1:
        return False
    return None  # chunked prefill (1 < Lq < Lk): bottom-right causality, which flash's is_causal is not


def _repeat(x: Tensor, n_rep: int) -> Tensor:
    """Key/value repeated to the query heads, as transformers' ``repeat_kv`` wrote it (expand, then reshape)."""
    if n_rep == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def _masked_sdpa(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor, scale: float, n_rep: int, enable_gqa: bool
) -> Tensor:
    """The SDPA call the site had: its mask, its repeated key/value, its ``enable_gqa``."""
    return F.scaled_dot_product_attention(
        query, _repeat(key, n_rep), _repeat(value, n_rep), attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa
    )


def _heads_inner(like: Tensor, shape: tuple, device: str | None = None) -> Tensor:
    """An empty ``[B, H, L, D]`` tensor stored as ``[B, L, H, D]``: the op's one layout for its output and gradients.

    Fixed by the shape alone, so the fake kernel and every branch agree whatever strides the inputs arrive with
    (Inductor checks a custom op's output strides against its fake's). It is the layout the flash kernels write for a
    model's query (``view(B, L, H, D).transpose(1, 2)``) and the one its ``out.transpose(1, 2).contiguous()`` reads
    for free.
    """
    b, h, length, d = shape
    return like.new_empty((b, length, h, d), device=device).transpose(1, 2)


def _out_buffer(query: Tensor, value: Tensor, device: str | None = None) -> Tensor:
    """An empty output ``[B, Hq, Lq, Dv]`` in the op's layout (:func:`_heads_inner`)."""
    return _heads_inner(query, (*query.shape[:3], value.shape[-1]), device)


def _lse_buffer(query: Tensor, device: str | None = None) -> Tensor:
    """An empty log-sum-exp in the layout its flash kernel writes: ``[B, H, Lq]`` on CUDA, ``[B, Lq, H]`` transposed
    on the CPU; fp32 (fp64 for fp64 inputs, the CPU kernel's accumulation dtype)."""
    b, h, lq = query.shape[:3]
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    if query.device.type == "cpu":
        return query.new_empty((b, lq, h), dtype=dtype, device=device).transpose(1, 2)
    return query.new_empty((b, h, lq), dtype=dtype, device=device)


def _in_layout(result: Tensor, make: Callable[..., Tensor]) -> Tensor:
    """``result`` itself when it already has the layout the fake kernel promised (``make(device="meta")`` tells, at no
    allocation), else a copy in that layout: Inductor checks a custom op's output strides against its fake's."""
    want = make(device="meta")
    if result.shape == want.shape and result.stride() == want.stride():
        return result
    # Same elements; a shape that differs only by size-1 dims (a decode step's [B, H, 1] log-sum-exp) is reshaped.
    return make().copy_(result.reshape(want.shape))


def _flash_forward(query: Tensor, key: Tensor, value: Tensor, is_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    if query.device.type == "cuda":
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, is_causal, False, scale=scale
        )
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, scale=scale
        )
    return out, lse


def _flash_backward(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor, is_causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    if query.device.type == "cuda":
        # No dropout: the kernel never reads its RNG state, and a dense (not varlen) call has no cumulative lengths
        # (None is the undefined tensor the forward returns there). The lengths are the plain maximum lengths.
        seed = torch.empty(2, dtype=torch.uint64, device=query.device)
        offset = torch.empty((), dtype=torch.uint64, device=query.device)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, query, key, value, out, lse, None, None, query.shape[2], key.shape[2], 0.0, is_causal, seed,
            offset, scale=scale,
        )  # fmt: skip
    else:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, query, key, value, out, lse, 0.0, is_causal, scale=scale
        )
    return grads[0], grads[1], grads[2]


def _kind(mask_kind: Tensor) -> int:
    # A CPU scalar (moba::analyse_mask keeps it there): reading it costs no device synchronisation.
    return int(mask_kind.item())


@torch.library.custom_op("moba::dense_attention", mutates_args=())
def _dense_attention_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor,
    mask_kind: Tensor,
    scale: float,
    n_rep: int,
    enable_gqa: bool,
) -> tuple[Tensor, Tensor]:
    is_causal = flash_branch(_kind(mask_kind), query, key, value)
    if is_causal is None:
        CALLS["dense_attention:masked"] += 1
        out = _masked_sdpa(query, key, value, attn_mask, scale, n_rep, enable_gqa)
        # The masked branch's backward recomputes; its log-sum-exp is never read, but an output is deterministic.
        return _in_layout(out, lambda device=None: _out_buffer(query, value, device)), _lse_buffer(query).zero_()
    CALLS["dense_attention:flash"] += 1
    out, lse = _flash_forward(query, key, value, is_causal, scale)
    out = _in_layout(out, lambda device=None: _out_buffer(query, value, device))
    return out, _in_layout(lse, lambda device=None: _lse_buffer(query, device))


@_dense_attention_op.register_fake
def _dense_attention_fake(query, key, value, attn_mask, mask_kind, scale, n_rep, enable_gqa):
    return _out_buffer(query, value), _lse_buffer(query)


@torch.library.custom_op("moba::dense_attention_backward", mutates_args=())
def _dense_attention_backward_op(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor,
    mask_kind: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    n_rep: int,
    enable_gqa: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    is_causal = flash_branch(_kind(mask_kind), query, key, value)
    if is_causal is None:
        CALLS["dense_attention_backward:masked"] += 1
        dq, dk, dv = _masked_recompute_backward(grad_out, query, key, value, attn_mask, scale, n_rep, enable_gqa)
    else:
        CALLS["dense_attention_backward:flash"] += 1
        dq, dk, dv = _flash_backward(grad_out, query, key, value, out, lse, is_causal, scale)
    return tuple(
        _in_layout(g, lambda device=None, ref=ref: _heads_inner(ref, ref.shape, device))
        for g, ref in ((dq, query), (dk, key), (dv, value))
    )


def _masked_recompute_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor,
    scale: float,
    n_rep: int,
    enable_gqa: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients SDPA's own backward gives the site's masked call: the call recomputed under autograd.

    A custom op's body runs below the autograd dispatch key (torch.library excludes it), so autograd is switched back
    on for this computation alone; the repeat of key/value is differentiated as the model's ``repeat_kv`` was (summed
    over each group).
    """
    leaves = [t.detach().requires_grad_() for t in (query, key, value)]
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False), torch.enable_grad():
        out = _masked_sdpa(*leaves, attn_mask, scale, n_rep, enable_gqa)
        dq, dk, dv = torch.autograd.grad(out, leaves, grad_out)
    return dq, dk, dv


@_dense_attention_backward_op.register_fake
def _dense_attention_backward_fake(
    grad_out, query, key, value, attn_mask, mask_kind, out, lse, scale, n_rep, enable_gqa
):
    return tuple(_heads_inner(t, t.shape) for t in (query, key, value))


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, attn_mask, mask_kind, scale, n_rep, enable_gqa = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, attn_mask, mask_kind, out, lse)
    ctx.params = (scale, n_rep, enable_gqa)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, attn_mask, mask_kind, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.moba.dense_attention_backward(
        grad_out, query, key, value, attn_mask, mask_kind, out, lse, *ctx.params
    )
    return dq, dk, dv, None, None, None, None, None


_dense_attention_op.register_autograd(_backward, setup_context=_setup_context)


def dense_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor,
    mask_kind: Tensor,
    *,
    scale: float,
    n_rep: int = 1,
    enable_gqa: bool = False,
) -> Tensor:
    """A dense SDPA site with a boolean mask: flash when ``mask_kind`` says the mask is exactly causal, else the
    site's own masked SDPA call (see the module docstring); differentiable (first order).

    Args:
        query: ``[B, Hq, Lq, D]``.
        key, value: ``[B, Hkv, Lk, D]`` / ``[B, Hkv, Lk, Dv]``, unrepeated where the model repeated them
            (``n_rep > 1``), else as the SDPA call had them.
        attn_mask: the call's boolean mask, broadcastable to ``[B, Hq, Lq, Lk]``.
        mask_kind: the mask's ``moba::analyse_mask`` result (int64 CPU scalar).
        scale: the softmax scale.
        n_rep: how many times the model repeated each key/value head (``repeat_kv``) before its SDPA call; 1 if not.
        enable_gqa: the SDPA call's own ``enable_gqa``.

    Returns:
        ``[B, Hq, Lq, Dv]``, stored as ``[B, Lq, Hq, Dv]``.

    Example:
        >>> from moba_compile.masks import analyse_mask
        >>> q = torch.randn(1, 2, 4, 8)
        >>> mask = torch.ones(4, 4, dtype=torch.bool).tril()
        >>> kind = torch.tensor(analyse_mask(mask, 4, 4))
        >>> ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        >>> torch.allclose(dense_attention(q, q, q, mask, kind, scale=8**-0.5), ref, atol=1e-6)
        True
    """
    out, _ = torch.ops.moba.dense_attention(query, key, value, attn_mask, mask_kind, scale, n_rep, enable_gqa)
    return out
