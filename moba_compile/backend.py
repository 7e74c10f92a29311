"""The ``moba`` torch.compile backend: rewrite SDPA sites by policy, log the report, hand the graph to a compiler.

Registered in the ``torch_dynamo_backends`` entry-point group (so ``backend="moba"`` works after ``pip install``) and by
``import moba_compile``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .ops import IMPLS
from .passes import rewrite_sdpa
from .policy import Policy, load_policy
from .report import Report

__all__ = ["BackendOptions", "moba_backend", "parse_options", "make_backend", "collect_reports", "VALID_OPTIONS"]

logger = logging.getLogger("moba_compile")

VALID_OPTIONS = ("policy", "impl", "compiler", "inductor_config")
_COMPILERS = ("inductor", "aot_eager", "eager")

# Reports of the compilations running inside `collect_reports()` blocks (explain() uses one).
_collectors: list[list[Report]] = []


@dataclass(frozen=True)
class BackendOptions:
    """Validated backend options.

    Attributes:
        policy: the per-layer policy (default: chunk 4096, top-k 12, last 3 layers dense).
        impl: ``"auto"``, ``"triton"`` or ``"reference"``, as in :func:`moba_compile.moba_attention`.
        compiler: what compiles the rewritten graph: ``"inductor"`` (default), ``"aot_eager"`` (AOTAutograd without
            code generation, for debugging) or ``"eager"`` (run the rewritten graph as is).
        inductor_config: Inductor config patches, merged over those of the torch.compile ``mode``.
    """

    policy: Policy
    impl: str = "auto"
    compiler: str = "inductor"
    inductor_config: Mapping[str, Any] | None = None


def parse_options(options: Mapping[str, Any] | None) -> BackendOptions:
    """Validate the ``options=`` of ``torch.compile(..., backend="moba")``.

    Args:
        options: None or a mapping with keys from :data:`VALID_OPTIONS`: ``policy`` (path to a TOML/JSON file, dict,
            :class:`moba_compile.Policy` or None), ``impl``, ``compiler``, ``inductor_config`` (dict).

    Returns:
        :class:`BackendOptions`.

    Raises:
        ValueError: an unknown key (the message lists the valid ones) or a bad value.
        moba_compile.PolicyError: the policy is malformed (file, key and allowed values named).

    Example:
        >>> parse_options({"policy": {"chunk_size": 512, "topk": 3}}).policy.chunk_size
        512
    """
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict, got {type(options).__name__}: {options!r}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(VALID_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for backend 'moba'; valid options: "
            f"{', '.join(VALID_OPTIONS)}"
        )
    impl = options.get("impl", "auto")
    if impl not in IMPLS:
        raise ValueError(f"option 'impl' = {impl!r} is not valid; allowed: {', '.join(map(repr, IMPLS))}")
    compiler = options.get("compiler", "inductor")
    if compiler not in _COMPILERS:
        raise ValueError(f"option 'compiler' = {compiler!r} is not valid; allowed: {', '.join(map(repr, _COMPILERS))}")
    inductor_config = options.get("inductor_config")
    if inductor_config is not None and not isinstance(inductor_config, Mapping):
        raise ValueError(f"option 'inductor_config' must be a dict of Inductor config patches, got {inductor_config!r}")
    return BackendOptions(
        policy=load_policy(options.get("policy")), impl=impl, compiler=compiler, inductor_config=inductor_config
    )


@contextlib.contextmanager
def collect_reports() -> Iterator[list[Report]]:
    """Collect the report of every ``moba`` compilation inside the block (all graphs, every backend instance).

    Example:
        >>> with collect_reports() as reports:  # doctest: +SKIP
        ...     torch.compile(model, backend="moba")(x)
    """
    reports: list[Report] = []
    _collectors.append(reports)
    try:
        yield reports
    finally:
        _collectors.remove(reports)


def _compile(gm: fx.GraphModule, example_inputs: list, opts: BackendOptions, mode: str | None) -> Callable:
    if opts.compiler == "eager":
        return gm.forward
    if opts.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    import torch._inductor.compile_fx as compile_fx  # the submodule, not the function re-exported by torch._inductor

    patches: dict[str, Any] = {}
    if mode not in (None, "default"):
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(opts.inductor_config or {})
    return compile_fx.compile_fx(gm, example_inputs, config_patches=patches or None)


def _run(gm: fx.GraphModule, example_inputs: list, opts: BackendOptions, mode: str | None) -> Callable:
    report = rewrite_sdpa(gm, opts.policy, impl=opts.impl)
    logger.info("%s", report)
    for reports in _collectors:
        reports.append(report)
    return _compile(gm, example_inputs, opts, mode)


def make_backend(options: Mapping[str, Any] | None = None, mode: str | None = None) -> Callable:
    """A backend callable with validated options bound, for ``torch.compile(model, backend=make_backend(...))``.

    Validating here (rather than at the first call) raises option and policy errors at once, outside the compiler.

    Example:
        >>> backend = make_backend({"policy": {"dense_last": 1}})
        >>> callable(backend)
        True
    """
    opts = parse_options(options)

    def backend(gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
        return _run(gm, example_inputs, opts, kwargs.get("mode", mode))

    return backend


def moba_backend(gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
    """The ``moba`` backend: ``torch.compile(model, backend="moba", options={"policy": "policy.toml"})``.

    Every ``scaled_dot_product_attention`` call of the captured graph is classified and decided from the policy
    (layer by layer); converted calls become ``moba::attention``, the others stay dense SDPA untouched. The decisions
    are logged through the ``moba_compile`` logger (INFO) and returned by :func:`moba_compile.explain`. The rewritten
    graph goes to Inductor (``mode`` is passed on), so training (``loss.backward()``) works through converted layers.

    Args:
        gm: the Dynamo graph. example_inputs: its example inputs.
        options: see :func:`parse_options`. mode: the torch.compile mode, passed on to Inductor.

    Raises:
        ValueError: unknown keyword arguments or options (listing the valid ones).
        moba_compile.PolicyError: malformed policy. (Dynamo wraps both in ``BackendCompilerFailed`` with the message.)

    Example:
        >>> compiled = torch.compile(model, backend="moba", options={"policy": "policy.toml"})  # doctest: +SKIP
    """
    unknown = sorted(set(kwargs) - {"options", "mode"})
    if unknown:
        raise ValueError(f"unexpected argument(s) {unknown} to backend 'moba'; it takes options= and mode=")
    return _run(gm, example_inputs, parse_options(kwargs.get("options")), kwargs.get("mode"))


def register() -> None:
    """Register ``moba`` with Dynamo unless the entry point (or an earlier import) already did."""
    from torch._dynamo.backends import registry

    # Discover entry points first: when the installed entry point provides "moba", Dynamo loads it lazily, and
    # registering it here as well would make that load fail with "duplicate name".
    registry._lazy_import()
    if "moba" in registry._COMPILER_FNS or registry._BACKENDS.get("moba") is not None:
        return
    registry.register_backend(moba_backend, name="moba")
