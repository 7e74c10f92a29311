"""What the Triton MoBA kernels can run, and the small helpers their launchers share.

This module imports ``triton`` lazily and never fails to import: ``moba_compile.kernels`` must be importable on a
machine without Triton (the ops layer then routes to the reference and says why).
"""

import functools
import importlib.util
import os

import torch
from torch import Tensor

from ..validation import bounded_params, check_routing

__all__ = [
    "HEAD_DIMS",
    "bounded_params",
    "check_routing",
    "MAX_CHUNK",
    "MAX_TOPK",
    "dot_precision",
    "interpreting",
    "list_tile_rows",
    "mask_bytes",
    "next_pow2",
    "require_triton",
    "triton_available",
    "triton_unsupported_reason",
]

# Head dims the kernels are compiled for: tl.arange needs powers of two and tl.dot needs >= 16.
HEAD_DIMS = (16, 32, 64, 128, 256)
# Chunk sizes: multiples of 16 so a chunk is a whole number of key blocks (block_n is a power of two >= 16 that
# divides it); the upper bound keeps the per-chunk loops and the launch arithmetic in the range that was reasoned about.
MIN_CHUNK, MAX_CHUNK = 16, 8192
# The running top-(K-1) lives in registers as a [BLOCK_M, next_pow2(K-1)] int64 tile: 64 keeps it at <= 64 columns.
MAX_TOPK = 64
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _find_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether ``import triton`` can succeed (checked without importing it; answered once per process, since every
    kernel call asks and ``find_spec`` costs microseconds a decode step's host time cannot spare).

    A constant to torch.compile (``assume_constant_result``): code that Dynamo traces (the Hugging Face attention
    function deciding whether a dense decode step can run the split-K kernels) may ask it; Dynamo cannot trace
    ``find_spec`` itself.

    Returns:
        ``True`` when a ``triton`` package is importable.

    Example:
        >>> isinstance(triton_available(), bool)
        True
    """
    return _find_triton()


def require_triton() -> None:
    """Raise a clear error when Triton is missing; a no-op otherwise.

    Raises:
        RuntimeError: ``triton`` is not installed (``pip install triton``; Linux only).

    Example:
        >>> require_triton() if triton_available() else None
    """
    if not triton_available():
        raise RuntimeError(
            "the MoBA Triton kernels need the 'triton' package (pip install triton); "
            "use impl='reference' on machines without it"
        )


@torch.compiler.assume_constant_result
def interpreting() -> bool:
    """Whether Triton runs in interpreter mode (``TRITON_INTERPRET`` set to a true value); a constant to torch.compile
    (read when a graph is traced), as :func:`triton_available`.

    Returns:
        ``True`` when kernels execute on the CPU through the Triton interpreter.

    Example:
        >>> isinstance(interpreting(), bool)
        True
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``).

    Example:
        >>> next_pow2(5), next_pow2(16), next_pow2(0)
        (8, 16, 1)
    """
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the attention kernels' ``tl.dot``: ``"ieee"`` for fp32 inputs, else ``"tf32"``.

    fp32 inputs get IEEE dots, so the result matches an fp32 reference (tf32 would lose 13 mantissa bits); for
    fp16/bf16 operands the setting is ignored.

    Example:
        >>> dot_precision(torch.float32), dot_precision(torch.bfloat16)
        ('ieee', 'tf32')
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def list_tile_rows(block_m: int, entries_per_plane: int, n_past_chunks: int) -> int:
    """Rows of a key-major tile cut from the index flip's per-chunk lists.

    Tiles are cut per chunk: when few rows choose each chunk (decode, short Lq), a full tile would be mostly padding.
    The tile is sized to the mean list length, between 16 (the ``tl.dot`` minimum) and the configured ``block_m``.

    Example:
        >>> list_tile_rows(128, 100, 10), list_tile_rows(128, 10**6, 10), list_tile_rows(128, 0, 0)
        (16, 128, 16)
    """
    mean_rows = -(-entries_per_plane // max(1, n_past_chunks))
    return max(16, min(block_m, next_pow2(mean_rows)))


def mask_bytes(attn_mask: Tensor, b: int, hq: int, lq: int, lk: int) -> Tensor:
    """uint8 view of a boolean mask broadcast to ``[B, Hq, Lq, Lk]``, as the forward and backward kernels read it.

    Broadcast dims keep zero strides (one byte read per attended (row, key)); the view is made contiguous only when
    its key offsets would overflow the kernels' int32 in-block offsets.

    Example:
        >>> mask_bytes(torch.ones(1, 1, 1, 8, dtype=torch.bool), 1, 2, 4, 8).stride()
        (8, 0, 0, 1)
    """
    mask = attn_mask.expand(b, hq, lq, lk).view(torch.uint8)
    if mask.stride(3) * lk >= 2**31:  # in-kernel key offsets are int32
        mask = mask.contiguous()
    return mask


def shared_unsupported_reason(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    chunk_size: int,
    topk: int,
    attn_mask: Tensor | None,
    *,
    head_dims: tuple[int, ...],
) -> str | None:
    """The checks every Triton MoBA kernel shares (installation, dtypes, devices, shapes, chunk size, top-k, mask).

    Only metadata is read. ``head_dims`` are the head dims the calling kernel supports. ``chunk_size`` and ``topk``
    are judged after :func:`moba_compile.validation.bounded_params` (what the launchers run). Returns ``None`` when
    these checks pass, else a short reason; each kernel's own ``*_unsupported_reason`` adds its specific limits.

    Example:
        >>> q = torch.randn(1, 2, 8, 72)
        >>> shared_unsupported_reason(q, q, q, 16, 3, None, head_dims=(64, 128))
        'head dim 72 not in (64, 128)'
    """
    if not triton_available():
        return "triton is not installed"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            return f"{name} must be a 4-D tensor"
    if not (query.dtype == key.dtype == value.dtype):
        return f"mixed dtypes {query.dtype}, {key.dtype}, {value.dtype}"
    if query.dtype not in _DTYPES:
        return f"dtype {str(query.dtype).removeprefix('torch.')} routed to the reference"
    dev = query.device
    if not (dev == key.device == value.device):
        return "query, key and value are on different devices"
    if dev.type == "cpu":
        if not interpreting():
            return "CPU tensors need TRITON_INTERPRET=1"
    elif dev.type != "cuda":
        return f"device type {dev.type!r} is not supported by the Triton kernels"
    b, hq, lq, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[3]
    if key.shape[0] != b or value.shape[0] != b or key.shape[3] != d or value.shape[1] != hkv or value.shape[2] != lk:
        return "query, key and value shapes do not match"
    if hkv == 0 or hq % hkv != 0:
        return f"query heads ({hq}) are not a multiple of key heads ({hkv})"
    if d not in head_dims:
        return f"head dim {d} not in {head_dims}"
    if dv not in head_dims:
        return f"value head dim {dv} not in {head_dims}"
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        return f"chunk_size {chunk_size!r} is not an int >= 1"
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        return f"topk {topk!r} is not an int >= 1"
    # The launchers run the clamped values (the same call): judge those, so topk=10**6 on a short input still runs.
    chunk_size, topk = bounded_params(lk, chunk_size, topk)
    if chunk_size % 16 != 0:
        return f"chunk_size {chunk_size} is not a multiple of 16"
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        return f"chunk_size {chunk_size} not in [{MIN_CHUNK}, {MAX_CHUNK}]"
    if topk > MAX_TOPK:
        return f"topk {topk} > {MAX_TOPK}"
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool:
            return "attn_mask is not a boolean tensor"
        if attn_mask.device != dev:
            return f"attn_mask is on {attn_mask.device}, query on {dev}"
        try:
            fits = tuple(torch.broadcast_shapes(attn_mask.shape, (b, hq, lq, lk))) == (b, hq, lq, lk)
        except RuntimeError:
            fits = False
        if attn_mask.dim() > 4 or not fits:
            return f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to {[b, hq, lq, lk]}"
    return None


def triton_unsupported_reason(
    query: Tensor, key: Tensor, value: Tensor, chunk_size: int, topk: int, attn_mask: Tensor | None
) -> str | None:
    """Why the Triton MoBA forward cannot run these inputs, or ``None`` when it can.

    Only metadata is read (dtype, device, shapes), so fake/meta tensors work. Shape errors that the public API
    rejects anyway (ranks, ``Hq % Hkv``, ``Lq > Lk``) are reported too, so a caller never launches on them.

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, Lk, D]``; value: ``[B, Hkv, Lk, Dv]``.
        chunk_size: MoBA chunk size ``C``; supported: a multiple of 16 in ``[16, 8192]`` after clamping to the key
            length (:func:`moba_compile.validation.bounded_params`: any ``C >= Lk`` is one chunk).
        topk: chunks per query including its own; supported: ``1 <= topk <= 64`` after clamping to the chunk count.
        attn_mask: ``None`` or a boolean tensor broadcastable to ``[B, Hq, Lq, Lk]`` on the query's device.

    Returns:
        ``None`` if :func:`moba_compile.kernels.moba_forward_triton` supports the call, else a short reason such as
        ``"head dim 72 not in (16, 32, 64, 128, 256)"``, ``"dtype float64 routed to the reference"``,
        ``"chunk_size 100 is not a multiple of 16"``, ``"topk 65 > 64"``, ``"CPU tensors need TRITON_INTERPRET=1"``
        or ``"triton is not installed"``.

    Example:
        >>> q = torch.randn(1, 2, 8, 72)
        >>> triton_unsupported_reason(q, q, q, 16, 3, None)
        'head dim 72 not in (16, 32, 64, 128, 256)'
    """
    reason = shared_unsupported_reason(query, key, value, chunk_size, topk, attn_mask, head_dims=HEAD_DIMS)
    if reason is not None:
        return reason
    hq, lq = query.shape[1], query.shape[2]
    hkv, lk = key.shape[1], key.shape[2]
    chunk_size, topk = bounded_params(lk, chunk_size, topk)  # as the shared checks judged them
    if lq > lk:
        return f"Lq={lq} > Lk={lk}"
    # Entry ids inside one (batch, key head) plane are int32: G * Lq * (K - 1) must fit.
    if (hq // hkv) * lq * max(topk - 1, 1) >= 2**31:
        return f"{hq // hkv} query heads per key head x Lq={lq} x (topk-1)={topk - 1} entries overflow int32 ids"
    return None


def speed_up_interpreter() -> None:
    """Give the Triton interpreter two fast paths that change no result (idempotent; no-op if unavailable).

    1. Integer XOR reductions: ``tl.sort``, ``tl.topk`` and ``tl.bitonic_merge`` swap elements through ``xor_sum``
       over size-2 axes, which the interpreter (triton 3.9) evaluates one element at a time in Python: a [64, 16] top-k
       then takes ~0.1 s per program. ``np.bitwise_xor.reduce`` gives the identical result, so the kernels keep the
       exact code path the GPU runs while interpreted tests stay fast. Only reductions whose combine function is
       Triton's own ``_xor_combine`` along one axis are redirected; everything else goes to the interpreter unchanged.
    2. Device-function calls: the interpreter re-patches ``triton.language`` on every call of a ``@triton.jit``
       helper from a kernel (``_patch_lang``), and each patch scans every member of ``tl``, ``tl.core``, ``tl.math``
       and ``tl.tensor`` with ``inspect.getmembers`` for Triton builtins to wrap. Inside a launch they are already
       wrapped, so the scan finds nothing to do, yet it took ~20% of an interpreted forward + backward. The names of a
       namespace's builtins are found once (a Python module or class gains no builtins at run time) and each later
       patch checks only those names: the same members are wrapped in the same cases, without the scan.

    Example:
        >>> speed_up_interpreter()
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    _fast_xor_reduce(np, tl, interpreter)
    _fast_builtin_patch(tl, interpreter)


def _fast_xor_reduce(np, tl, interpreter) -> None:  # noqa: ANN001 - interpreter internals
    ops = getattr(interpreter, "ReduceOps", None)
    xor_combine = getattr(getattr(tl, "standard", None), "_xor_combine", None)
    if ops is None or xor_combine is None or getattr(ops, "_moba_fast_xor", False):
        return
    slow = ops.apply_impl

    def apply_impl(self, input):  # noqa: ANN001, ANN202 - interpreter internals
        if self.combine_fn is xor_combine and self.axis is not None and len(input) == 1:
            x = input[0]
            data = np.bitwise_xor.reduce(x.handle.data, axis=self.axis, keepdims=self.keep_dims)
            return self.to_tensor(data, x.dtype)
        return slow(self, input)

    ops.apply_impl = apply_impl
    ops._moba_fast_xor = True


def _fast_builtin_patch(tl, interpreter) -> None:  # noqa: ANN001 - interpreter internals
    slow = getattr(interpreter, "_patch_builtin", None)
    patch_attr = getattr(interpreter, "_patch_attr", None)
    is_builtin = getattr(getattr(tl, "core", None), "is_builtin", None)
    if slow is None or patch_attr is None or is_builtin is None or getattr(slow, "_moba_fast", False):
        return
    import inspect

    builtin_names: dict[object, list[str]] = {}  # namespace (module or class) -> names of its Triton builtins

    def patch_builtin(pkg, builder, scope):  # noqa: ANN001, ANN202 - interpreter internals
        names = builtin_names.get(pkg)
        if names is None:
            names = [name for name, member in inspect.getmembers(pkg) if is_builtin(member)]
            if not names:  # already wrapped (or none): scan again next time rather than remember "none"
                return
            builtin_names[pkg] = names
        for name in names:
            member = getattr(pkg, name)
            if is_builtin(member):  # not wrapped yet by an enclosing launch
                patch_attr(pkg, name, member, builder, scope)

    patch_builtin._moba_fast = True
    interpreter._patch_builtin = patch_builtin
