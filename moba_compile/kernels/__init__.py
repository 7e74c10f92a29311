"""Triton kernels for MoBA and their launchers (forward only so far).

Public API (used by :mod:`moba_compile.ops`):

- :func:`triton_unsupported_reason`: ``None`` when the Triton path can run a call, else a short reason.
- :func:`moba_forward_triton`: ``(out, lse)`` like ``reference.moba_attention_forward``.
- :func:`chunk_means_triton`, :func:`select_chunks_triton`, :func:`flip_selection`: the gate's building blocks.

Importing this package never needs Triton: without it the launchers raise a clear ``RuntimeError`` when called and
:func:`triton_unsupported_reason` answers ``"triton is not installed"``. There is no ``moba_backward_triton`` yet, so
``from moba_compile.kernels import moba_backward_triton`` raises ``ImportError`` (the ops layer then uses the
reference's backward formulas).
"""

from .support import interpreting, require_triton, triton_available, triton_unsupported_reason

__all__ = [
    "FlipResult",
    "chunk_means_triton",
    "flip_selection",
    "interpreting",
    "moba_forward_triton",
    "select_chunks_triton",
    "triton_available",
    "triton_unsupported_reason",
]

_LAZY = {
    "moba_forward_triton": "forward",
    "chunk_means_triton": "gating",
    "select_chunks_triton": "gating",
    "flip_selection": "gating",
    "FlipResult": "gating",
}


def __getattr__(name: str) -> object:
    # Triton is imported on first use of a launcher, so `import moba_compile.kernels` works without it.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not triton_available():

        def _missing(*args: object, **kwargs: object) -> None:
            require_triton()

        _missing.__name__ = name
        _missing.__doc__ = f"Unavailable: {name} needs the 'triton' package; calling it raises RuntimeError."
        return _missing
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
