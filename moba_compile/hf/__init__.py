"""Hugging Face transformers integration: MoBA as an attention implementation, chosen per layer by the same policy.

- :mod:`moba_compile.hf.attention`: :func:`register` (the attention function, :class:`MobaAttention`, and its mask
  function), :func:`annotate`.
- :mod:`moba_compile.hf.cache`: :class:`MobaCache` (a ``DynamicCache`` keeping the gate's chunk means) and
  :func:`cache_keyword`.
- :mod:`moba_compile.hf.models`: the model library of the command line, the examples and the benchmarks (``PRESETS``,
  :func:`load_hf_config`, :func:`build_hf_model`, :func:`hf_example_inputs`).

Importing this package does not import transformers (an optional extra, ``moba-compile[hf]``): the functions import it
when called, and ``MobaCache``, a subclass of a transformers class, is created on first access of the name.

Example:
    >>> import moba_compile.hf  # doctest: +SKIP
    >>> attention = moba_compile.hf.register("policy.toml")  # doctest: +SKIP
    >>> model.set_attn_implementation("moba")  # doctest: +SKIP
    >>> model.generate(ids, cache=moba_compile.hf.MobaCache(), max_new_tokens=8)  # doctest: +SKIP
    >>> print(attention.report())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from . import cache
from .attention import MobaAttention, annotate, register
from .cache import cache_keyword
from .models import PRESETS, CliError, build_hf_model, hf_example_inputs, load_hf_config

__all__ = [
    "CliError",
    "MobaAttention",
    "MobaCache",
    "PRESETS",
    "annotate",
    "build_hf_model",
    "cache_keyword",
    "hf_example_inputs",
    "load_hf_config",
    "register",
]


def __getattr__(name: str) -> Any:
    # MobaCache subclasses a transformers class, created on first access (see moba_compile.hf.cache): importing this
    # package must not import transformers.
    if name == "MobaCache":
        return cache.MobaCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # MobaCache is listed although it is created on first access (see __getattr__).
    return sorted({*globals(), "MobaCache"})
