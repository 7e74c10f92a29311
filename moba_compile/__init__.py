"""moba-compile: MoBA (Mixture of Block Attention) for any PyTorch model through ``torch.compile(backend="moba")``.

Example:
    >>> import torch, moba_compile
    >>> compiled = torch.compile(model, backend="moba", options={"policy": "policy.toml"})  # doctest: +SKIP
    >>> print(moba_compile.explain(model, input_ids, policy="policy.toml"))  # doctest: +SKIP
"""

from . import ops, reference
from .api import moba_attention
from .backend import CompiledBlock, compile_blocks, make_backend, moba_backend, register
from .explain import explain
from .passes.rewrite import MobaCompileWarning
from .policy import DEFAULT_POLICY, Decision, Policy, PolicyError, Rule, load_policy
from .report import Report, SiteRecord

__all__ = [
    "CompiledBlock",
    "DEFAULT_POLICY",
    "Decision",
    "MobaCompileWarning",
    "Policy",
    "PolicyError",
    "Report",
    "Rule",
    "SiteRecord",
    "compile_blocks",
    "explain",
    "load_policy",
    "make_backend",
    "moba_attention",
    "moba_backend",
    "ops",
    "reference",
]

__version__ = "0.1.0"

register()
