"""The launch prologue the forward and backward launchers share: device context, GPU architecture, mask arguments and
row slabs. Importing this module does not import Triton.

Every launcher needs the same few decisions before its first kernel: run on the query's CUDA device
(:func:`on_device`), pick tiles for the GPU it runs on (:func:`device_capability`), turn an optional boolean mask into
kernel arguments (:class:`MaskArgs`), and bound its fp32 partial buffers by cutting the query rows into slabs
(:func:`row_slab`, :func:`slabs`). A slab ``[r0, r1)`` is the same MoBA problem with ``Lq' = r1 - r0`` and keys cut at
``Lk' = Lk - Lq + r1`` (its last row's position + 1): rows are independent, and the earlier chunks of the slab's rows
are complete within ``Lk'``, so one set of chunk means serves every slab.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .support import mask_bytes

__all__ = [
    "PARTIAL_BUFFER_BYTES",
    "POISON_BUFFERS",
    "TUNED_CAPABILITY",
    "MaskArgs",
    "device_capability",
    "empty",
    "on_device",
    "partial_buffer_budget",
    "row_slab",
    "slabs",
    "tuned_for",
]

# Test hook: when True, every buffer a launcher allocates (outputs and scratch) starts as NaN (floats) or the largest
# integer (ints) instead of uninitialised memory, so an entry no kernel wrote fails a test instead of passing on
# whatever the allocator returned (often zeros, which look like a valid masked row or gradient). Tests set it.
POISON_BUFFERS = False


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty`` for the launchers' outputs and scratch buffers; poisoned when :data:`POISON_BUFFERS` is set.

    Example:
        >>> empty(2, 3, dtype=torch.float32, device=torch.device("cpu")).shape
        torch.Size([2, 3])
    """
    out = torch.empty(*shape, dtype=dtype, device=device)
    if POISON_BUFFERS:
        out.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max)
    return out


# The architecture the launch tables were timed and compile-checked on (H100/H200, sm_90). Elsewhere the launchers take
# a safe default: the same maths, tiles that fit smaller shared memories (see each table).
TUNED_CAPABILITY = (9, 0)


# Keyed by device index, not by any tensor: a device's compute capability is fixed for the life of the process.
@lru_cache(maxsize=16)
def _capability(device_index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device_index))  # type: ignore[return-value]


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability ``(major, minor)`` of ``device``, or ``None`` for a non-CUDA device.

    ``None`` (CPU tensors: the interpreter, or a compile check for the GPU on a CPU machine) selects the tuned table,
    as the launchers chose before the tables knew about architectures.

    Example:
        >>> device_capability(torch.device("cpu")) is None
        True
    """
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def tuned_for(capability: tuple[int, int] | None) -> bool:
    """Whether the tuned launch tables apply: ``capability`` is ``None`` (no GPU to ask) or of the sm_90 family.

    Example:
        >>> tuned_for(None), tuned_for((9, 0)), tuned_for((8, 6))
        (True, True, False)
    """
    return capability is None or capability[0] == TUNED_CAPABILITY[0]


def on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """``torch.cuda.device(device)`` for a CUDA device (kernels launch on the current device), else a no-op context.

    Example:
        >>> with on_device(torch.device("cpu")):
        ...     pass
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class MaskArgs:
    """An optional boolean mask as kernel arguments: the uint8 view (or a never-read placeholder) and its strides.

    Attributes:
        mask: the uint8 ``[B, Hq, Lq, Lk]`` view of :func:`.support.mask_bytes`, or ``None``.
        arg: what the kernel's ``mask_ptr`` receives: ``mask``, or ``placeholder`` (never read when ``HAS_MASK`` is
            False, but Triton needs a tensor).
        strides: ``mask``'s four strides, zeros without a mask.
    """

    mask: Tensor | None
    arg: Tensor
    strides: tuple[int, int, int, int]

    @classmethod
    def build(cls, attn_mask: Tensor | None, shape: tuple[int, int, int, int], placeholder: Tensor) -> MaskArgs:
        """Mask arguments of a call whose attention is ``shape = (B, Hq, Lq, Lk)``.

        Example:
            >>> MaskArgs.build(None, (1, 2, 4, 8), torch.zeros(1)).strides
            (0, 0, 0, 0)
        """
        mask = mask_bytes(attn_mask, *shape) if attn_mask is not None else None
        return cls.of(mask, placeholder)

    @classmethod
    def of(cls, mask: Tensor | None, placeholder: Tensor) -> MaskArgs:
        """Arguments for an already built uint8 view (or ``None``).

        Example:
            >>> MaskArgs.of(None, torch.zeros(1)).mask is None
            True
        """
        strides = tuple(mask.stride()) if mask is not None else (0, 0, 0, 0)
        return cls(mask, mask if mask is not None else placeholder, strides)  # type: ignore[arg-type]

    @property
    def present(self) -> bool:
        """Whether a mask is applied (the kernels' ``HAS_MASK``)."""
        return self.mask is not None

    def slab(self, r0: int, r1: int, len_k: int, placeholder: Tensor) -> MaskArgs:
        """The arguments for query rows ``[r0, r1)`` and keys ``[0, len_k)`` (a row slab).

        Example:
            >>> MaskArgs.of(None, torch.zeros(1)).slab(0, 2, 4, torch.zeros(1)).present
            False
        """
        return MaskArgs.of(self.mask[:, :, r0:r1, :len_k] if self.mask is not None else None, placeholder)


# Override of the fp32 partial-buffer budget in bytes (None: a quarter of the GPU's memory, 1 GiB when interpreted).
PARTIAL_BUFFER_BYTES: int | None = None


def partial_buffer_budget(device: torch.device) -> int:
    """Bytes a launcher may spend on its fp32 partials (forward outputs, deterministic dQ) before it cuts row slabs.

    The forward's buffer holds ``B * Hq * rows * (K-1) * (Dv + 1) * 4`` bytes. Fewer, larger slabs keep each chunk's
    list of choosing rows long (full 128-row key-major tiles) at the cost of memory: a quarter of the device's memory
    (20 GB on an 80 GB H100) holds a 128K-token, 32-head, K=12 call in two slabs, and FlashMoBA's 512K-token B=2, H=16,
    K=8 setting (60 GB of partials) in three. ``PARTIAL_BUFFER_BYTES`` overrides it.

    Example:
        >>> partial_buffer_budget(torch.device("cpu")) > 0
        True
    """
    if PARTIAL_BUFFER_BYTES is not None:
        return int(PARTIAL_BUFFER_BYTES)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return 1 << 30


def row_slab(len_q: int, km1: int, bytes_per_row: int, device: torch.device) -> int:
    """Rows per slab: all of them without partials (``km1 == 0``), else as many as :func:`partial_buffer_budget`
    holds at ``bytes_per_row`` (at least one).

    Example:
        >>> row_slab(100, 0, 10**9, torch.device("cpu")), row_slab(100, 2, 2**29, torch.device("cpu"))
        (100, 2)
    """
    if km1 == 0:
        return len_q
    return max(1, min(len_q, partial_buffer_budget(device) // bytes_per_row))


def slabs(len_q: int, len_k: int, slab: int) -> Iterator[tuple[int, int, int]]:
    """``(r0, r1, Lk')`` of every row slab: rows ``[r0, r1)`` see keys ``[0, Lk')``, ``Lk' = Lk - Lq + r1``.

    Example:
        >>> list(slabs(5, 9, 2))
        [(0, 2, 6), (2, 4, 8), (4, 5, 9)]
    """
    for r0 in range(0, len_q, slab):
        r1 = min(len_q, r0 + slab)
        yield r0, r1, len_k - len_q + r1
