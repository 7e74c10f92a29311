"""Exact causal attention of a shard's queries over a longer key prefix, on the flash kernels, merged by log-sum-exp.

Under context parallelism (:mod:`moba_compile.context_parallel`) rank ``r`` holds queries ``[r S, (r + 1) S)`` and
attends, causally, to the gathered keys ``[0, (r + 1) S)``: the query rows sit bottom-right. SDPA's flash kernel only
aligns a causal mask top-left, so one flash call cannot serve ``Lq < Lk``; what SDPA does instead (a
``causal_lower_right`` bias) runs the memory-efficient kernel. Here the key range is split in two:

- the ``P = Lk - Lq`` keys of earlier positions, which every local query sees: full attention, no mask;
- the ``Lq`` own keys: square causal attention (``is_causal=True`` with ``Lq == Lk``, where top-left is bottom-right).

Both run on ATen's flash kernel (``aten._scaled_dot_product_flash_attention`` on CUDA,
``aten._scaled_dot_product_flash_attention_for_cpu`` on the CPU), which returns each part's log-sum-exp ``lse_i``;
the merged ``lse = logaddexp(lse_a, lse_b)`` and ``out = sum_i exp(lse_i - lse) * out_i`` are exactly the softmax over
all ``Lk`` keys. Backward (the exact rule of ring attention): each part's flash backward is called with the MERGED
output and the MERGED lse, so that its ``P = exp(S - lse)`` and ``D = rowsum(dO * O)`` are the whole softmax's;
``dq`` is the sum of the parts' and ``dk``/``dv`` are the parts' concatenated. Grouped heads (GQA) go to both kernels
as they are: both accept ``Hq % Hkv == 0`` and reduce the key/value gradients over the group themselves.

The two passes are the ``moba::cp_dense_flash`` / ``moba::cp_dense_flash_backward`` custom ops (opaque to
``torch.compile``; fake kernels give the shapes), counted in :data:`moba_compile.ops.CALLS` as
``"cp_dense:flash"`` and ``"cp_dense_backward:flash"``. :func:`flash_unsupported_reason` says when the kernels cannot
take the inputs (fp32 on CUDA, head dims flash refuses, other devices); callers then keep their SDPA path. The
ATen calls themselves (the CUDA/CPU flash forward and backward) are :mod:`moba_compile.dense_ops`' (the dense sites'
``moba::dense_attention``, which serves ``Lq == Lk`` and one-query decode; this module serves ``Lq < Lk``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .dense_ops import _flash_backward, _flash_forward, _in_layout, _out_buffer
from .masks import CALLS

__all__ = ["causal_flash_attention", "flash_unsupported_reason"]

# The CPU flash kernel takes every floating dtype; CUDA's (FlashAttention-2) only the 16-bit ones.
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.bfloat16, torch.float16)
# The merge's fp32 temporaries are bounded to about this many bytes per block of query rows (not the whole shard: at
# 512K tokens per rank one fp32 [B, H, S, D] tensor of the 1.2B model is 4 GiB).
_MERGE_BLOCK_BYTES = 1 << 28


@torch.compiler.assume_constant_result
def _cuda_flash_available(index: int) -> bool:
    # A constant for torch.compile (a host query, not a tensor property): FlashAttention-2 needs sm80+ and a build
    # with it; ROCm's flash has other conventions and is not used here.
    if torch.version.hip is not None or not torch.backends.cuda.is_flash_attention_available():
        return False
    return torch.cuda.get_device_capability(index) >= (8, 0)


def flash_unsupported_reason(query: Tensor, key: Tensor, value: Tensor) -> str | None:
    """Why :func:`causal_flash_attention` cannot take these inputs, or None when it can.

    Args:
        query: ``[B, Hq, Lq, D]``. key: ``[B, Hkv, Lk, D]``. value: ``[B, Hkv, Lk, Dv]``.

    Returns:
        None, or a short reason: a device without a flash kernel, a dtype it does not take (fp32/fp64 on CUDA),
        mixed dtypes, ``Dv != D``, a head dim CUDA's flash refuses (not a multiple of 8, above 256), ``Hq % Hkv``,
        an empty batch or sequence, ``Lk < Lq``, or a head dim that is not contiguous.

    Example:
        >>> q = torch.randn(1, 4, 8, 16); k = v = torch.randn(1, 2, 16, 16)
        >>> flash_unsupported_reason(q, k, v) is None
        True
        >>> flash_unsupported_reason(q.double(), k, v)
        'mixed dtypes torch.float64, torch.float32, torch.float32'
    """
    device = query.device.type
    dtypes = (query.dtype, key.dtype, value.dtype)
    if len(set(dtypes)) != 1:
        return "mixed dtypes " + ", ".join(str(d) for d in dtypes)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "not [B, H, L, D] tensors"
    b, hq, lq, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[3]
    if dv != d:
        return f"value head dim {dv} differs from the query's {d}"
    if hq % hkv:
        return f"{hq} query heads are not a multiple of {hkv} key/value heads"
    if b == 0 or lq == 0:
        return "an empty batch or sequence"
    if lk < lq:
        return f"fewer keys ({lk}) than queries ({lq})"
    if any(t.stride(-1) != 1 for t in (query, key, value)):
        return "a head dim without unit stride"
    if device == "cpu":
        if query.dtype not in _CPU_DTYPES:
            return f"{query.dtype} on the CPU"
        return None
    if device != "cuda":
        return f"no flash kernel on {device}"
    if query.dtype not in _CUDA_DTYPES:
        return f"{query.dtype} on CUDA (flash takes fp16/bf16)"
    if d % 8 or d > 256:
        return f"head dim {d} (CUDA flash takes multiples of 8 up to 256)"
    if not _cuda_flash_available(query.device.index or 0):
        return "no flash kernel on this GPU or build (sm80+, not ROCm)"
    return None


def _lse_dtype(query: Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _merge(out: Tensor, parts: tuple[tuple[Tensor, Tensor], ...], lse: Tensor) -> None:
    """``out[..., rows, :] = sum_i exp(lse_i - lse) * out_i`` in the lse's precision, one block of rows at a time."""
    b, h, lq, d = out.shape
    rows = max(1, _MERGE_BLOCK_BYTES // max(1, b * h * d * 4))
    for start in range(0, lq, rows):
        end = min(lq, start + rows)
        block = None
        for part_out, part_lse in parts:
            weight = torch.exp(part_lse[:, :, start:end] - lse[:, :, start:end]).unsqueeze(-1)
            term = part_out[:, :, start:end] * weight
            block = term if block is None else block.add_(term)
        assert block is not None
        out[:, :, start:end] = block


# The output is [B, Hq, Lq, Dv] stored as [B, Lq, Hq, Dv] (dense_ops' layout): what the attention output is
# transposed to next (for free), and what CUDA's flash backward wants its output and output gradient in (no copy).
@torch.library.custom_op("moba::cp_dense_flash", mutates_args=())
def _cp_dense_flash_op(query: Tensor, key: Tensor, value: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    CALLS["cp_dense:flash"] += 1
    prefix = key.shape[2] - query.shape[2]
    if prefix == 0:
        part, lse = _flash_forward(query, key, value, True, scale)
        # CUDA's flash writes this layout already (no copy); the CPU kernel writes [B, H, L, D] (one copy).
        return _in_layout(part, lambda device=None: _out_buffer(query, value, device)), lse.contiguous()
    out = _out_buffer(query, value)
    # Earlier keys: every local row sees all of them. Own keys: Lq == Lk, so the top-left causal mask is right.
    out_a, lse_a = _flash_forward(query, key[:, :, :prefix], value[:, :, :prefix], False, scale)
    out_b, lse_b = _flash_forward(query, key[:, :, prefix:], value[:, :, prefix:], True, scale)
    # Neither lse is -inf (every row sees >= 1 key in each part), so the merge has no 0 * inf.
    lse = torch.logaddexp(lse_a, lse_b).contiguous()
    _merge(out, ((out_a, lse_a), (out_b, lse_b)), lse)
    return out, lse


@_cp_dense_flash_op.register_fake
def _cp_dense_flash_fake(query: Tensor, key: Tensor, value: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    b, hq, lq, _ = query.shape
    return _out_buffer(query, value), query.new_empty((b, hq, lq), dtype=_lse_dtype(query))


@torch.library.custom_op("moba::cp_dense_flash_backward", mutates_args=())
def _cp_dense_flash_backward_op(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    CALLS["cp_dense_backward:flash"] += 1
    prefix = key.shape[2] - query.shape[2]
    if prefix == 0:
        dq, dk, dv = _flash_backward(grad_out, query, key, value, out, lse, True, scale)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    # Each part with the MERGED output and lse: its probabilities and rowsum(dO * O) are the whole softmax's, so its
    # gradients are exactly this part's share (dq summed, dk/dv per key range).
    earlier, own = (key[:, :, :prefix], value[:, :, :prefix]), (key[:, :, prefix:], value[:, :, prefix:])
    dq_a, dk_a, dv_a = _flash_backward(grad_out, query, *earlier, out, lse, False, scale)
    dq_b, dk_b, dv_b = _flash_backward(grad_out, query, *own, out, lse, True, scale)
    # 16-bit sums are computed in fp32 and rounded once.
    dq = torch.add(dq_a, dq_b).contiguous()
    return dq, torch.cat([dk_a, dk_b], dim=2), torch.cat([dv_a, dv_b], dim=2)


@_cp_dense_flash_backward_op.register_fake
def _cp_dense_flash_backward_fake(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    query, key, value, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor | None) -> tuple[Tensor, Tensor, Tensor, None]:
    query, key, value, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.moba.cp_dense_flash_backward(grad_out, query, key, value, out, lse, ctx.scale)
    return dq, dk, dv, None


_cp_dense_flash_op.register_autograd(_backward, setup_context=_setup_context)


def causal_flash_attention(query: Tensor, key: Tensor, value: Tensor, *, scale: float | None = None) -> Tensor:
    """Causal attention with the query rows aligned bottom-right (row ``i`` at key position ``Lk - Lq + i``), exactly,
    on the flash kernels: full attention over the first ``Lk - Lq`` keys and square causal attention over the last
    ``Lq``, merged by their log-sum-exps; differentiable (the op's backward, see the module docstring).

    Args:
        query: ``[B, Hq, Lq, D]``. key: ``[B, Hkv, Lk, D]``. value: ``[B, Hkv, Lk, D]``; ``Lk >= Lq``,
            ``Hq % Hkv == 0`` (grouped heads are passed to the kernels as they are), one floating dtype. Views are
            fine (the last dimension contiguous).
        scale: the softmax scale; None = ``D ** -0.5``.

    Returns:
        ``[B, Hq, Lq, D]`` in the query's dtype, stored as ``[B, Lq, Hq, D]`` (``.transpose(1, 2)`` of it is
        contiguous).

    Raises:
        ValueError: :func:`flash_unsupported_reason` has a reason (call SDPA instead).

    Example:
        >>> q = torch.randn(1, 4, 8, 16); k = v = torch.randn(1, 2, 24, 16)
        >>> out = causal_flash_attention(q, k, v)
        >>> from torch.nn.attention.bias import causal_lower_right
        >>> ref = torch.nn.functional.scaled_dot_product_attention(
        ...     q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=causal_lower_right(8, 24))
        >>> torch.allclose(out, ref, atol=1e-5)
        True
    """
    reason = flash_unsupported_reason(query, key, value)
    if reason is not None:
        raise ValueError(f"causal_flash_attention cannot take these inputs: {reason}")
    if scale is None:
        scale = query.shape[-1] ** -0.5
    out, _ = torch.ops.moba.cp_dense_flash(query, key, value, float(scale))
    return out
