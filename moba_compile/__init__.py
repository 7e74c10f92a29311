"""moba-compile: MoBA (Mixture of Block Attention) for any PyTorch model through ``torch.compile(backend="moba")``.

Example:
    >>> import torch, moba_compile
    >>> compiled = torch.compile(model, backend="moba", options={"policy": "policy.toml"})  # doctest: +SKIP
    >>> print(moba_compile.explain(model, input_ids, policy="policy.toml"))  # doctest: +SKIP
"""

import importlib
from typing import Any

from . import ops, reference
from .api import moba_attention
from .backend import CompiledBlock, CompileMode, Compiler, compile_blocks, make_backend, moba_backend, register
from .explain import explain
from .ops import Impl
from .passes.rewrite import MobaCompileWarning
from .policy import DEFAULT_POLICY, Decision, Policy, PolicyError, Rule, load_policy
from .report import Report, SiteRecord

__all__ = [
    "CompileMode",
    "CompiledBlock",
    "Compiler",
    "DEFAULT_POLICY",
    "Decision",
    "Impl",
    "MobaCompileWarning",
    "Policy",
    "PolicyError",
    "Report",
    "Rule",
    "SiteRecord",
    "compile_blocks",
    "explain",
    "export",
    "hf",
    "load_policy",
    "make_backend",
    "moba_attention",
    "moba_backend",
    "ops",
    "reference",
]

__version__ = "0.1.0"

# Submodules reached as attributes but imported on first use: `moba_compile.hf` needs transformers (an optional extra)
# and costs its import time only to those who use it; `moba_compile.export` (torch.export programs) likewise.
_LAZY_SUBMODULES = ("hf", "export")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register()
