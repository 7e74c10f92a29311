"""The launch prologue the forward and backward launchers share: device context, GPU architecture, mask arguments and
buffer allocation. Importing this module does not import Triton.

Every launcher needs the same few decisions before its first kernel: run on the query's CUDA device
(:func:`on_device`), pick tiles for the GPU it runs on (:func:`device_capability`), turn an optional boolean mask into
kernel arguments (:class:`MaskArgs`), and allocate its buffers (:func:`empty`). (Row slabs, which bounded the former
fp32 per-slot partial buffers, are gone with those buffers: the forward merges each slot into a per-row running state
and deterministic dQ adds each slot into one buffer; see docs/kernels.md.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .support import mask_bytes

__all__ = [
    "POISON_BUFFERS",
    "TUNED_CAPABILITY",
    "MaskArgs",
    "device_capability",
    "empty",
    "on_device",
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
