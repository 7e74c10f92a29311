"""Triton kernels for MoBA and their launchers: gate, forward, backward, decode.

Public API (used by :mod:`moba_compile.ops`):

- :func:`triton_unsupported_reason`: ``None`` when the Triton path can run a call, else a short reason.
- :func:`moba_forward_triton`: ``(out, lse)`` like ``reference.moba_attention_forward``.
- :func:`moba_backward_triton`: ``(dq, dk, dv)`` like ``reference.moba_attention_backward`` (atomics for dQ by
  default, bitwise reproducible with ``deterministic=True`` or under ``torch.use_deterministic_algorithms``).
- :func:`moba_decode_triton`, :func:`decode_unsupported_reason`, :func:`decode_select_chunks_triton`: the decode
  path (module ``.decode``); :func:`moba_decode_static_triton`: its static-cache form (length on the device), with
  :func:`update_static_means_triton` (the means of the chunks a static-cache step completed) and
  :func:`static_length_triton` / :func:`static_length_unsupported_reason` (each row's length from the step's mask);
  :func:`dense_decode_triton`, :func:`dense_decode_unsupported_reason`: dense causal decode on the same split-K
  kernels, every earlier chunk selected, no gate.
- :func:`chunk_means_triton`, :func:`select_chunks_triton`, :func:`flip_selection`: the gate's building blocks;
  :func:`launch_chunk_means`: the one means launch (prefill gate, decode, ``moba_compile.ops.chunk_means``).

Importing this package never needs Triton, and every launcher is imported lazily on first use. Without Triton the
launchers raise a clear ``RuntimeError`` when called and :func:`triton_unsupported_reason` answers
``"triton is not installed"``; the one exception is ``moba_backward_triton``, whose import then raises
``ImportError`` ("no Triton backward"). :mod:`moba_compile.ops` reaches every launcher as ``kernels.<name>``.
"""

from .support import interpreting, require_triton, triton_available, triton_unsupported_reason

__all__ = [
    "FlipResult",
    "chunk_means_triton",
    "decode_select_chunks_triton",
    "decode_unsupported_reason",
    "dense_decode_triton",
    "dense_decode_unsupported_reason",
    "flip_selection",
    "interpreting",
    "launch_chunk_means",
    "moba_backward_triton",
    "moba_decode_static_triton",
    "moba_decode_triton",
    "moba_forward_triton",
    "select_chunks_triton",
    "static_length_triton",
    "static_length_unsupported_reason",
    "triton_available",
    "triton_unsupported_reason",
    "update_static_means_triton",
]

_LAZY = {
    "moba_forward_triton": "forward",
    "moba_backward_triton": "backward",
    "moba_decode_triton": "decode",
    "moba_decode_static_triton": "decode",
    "update_static_means_triton": "decode",
    "static_length_triton": "decode",
    "static_length_unsupported_reason": "decode",
    "decode_unsupported_reason": "decode",
    "decode_select_chunks_triton": "decode",
    "dense_decode_triton": "decode",
    "dense_decode_unsupported_reason": "decode",
    "chunk_means_triton": "gating",
    "launch_chunk_means": "gating",
    "select_chunks_triton": "gating",
    "flip_selection": "gating",
    "FlipResult": "gating",
}

# Names whose import fails without Triton (instead of returning a stub): `from moba_compile.kernels import
# moba_backward_triton` in a `try: ... except ImportError` is the documented way to ask "is there a Triton backward"
# (moba_compile.ops no longer needs it: it chooses Triton only where triton_unsupported_reason is None).
_IMPORT_ERROR_WITHOUT_TRITON = frozenset({"moba_backward_triton"})


def __getattr__(name: str) -> object:
    # Triton is imported on first use of a launcher, so `import moba_compile.kernels` works without it.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not triton_available():
        if name in _IMPORT_ERROR_WITHOUT_TRITON:
            # `from moba_compile.kernels import moba_backward_triton` then raises ImportError (see the docstring).
            raise AttributeError(f"{name} needs the 'triton' package, which is not installed")

        def _missing(*args: object, **kwargs: object) -> None:
            require_triton()

        _missing.__name__ = name
        _missing.__doc__ = f"Unavailable: {name} needs the 'triton' package; calling it raises RuntimeError."
        return _missing
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function: the ops layer imports a launcher on every call
    return value
