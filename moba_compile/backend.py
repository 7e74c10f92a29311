"""The ``moba`` torch.compile backend: rewrite SDPA sites by policy, log the report, hand the graph to a compiler.

Registered in the ``torch_dynamo_backends`` entry-point group (so ``backend="moba"`` works after ``pip install``) and by
``import moba_compile``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import fx, nn

from .ops import IMPLS, Impl
from .passes import rewrite_sdpa
from .passes.identity import BlockScope, ModuleIndex
from .passes.rewrite import MobaCompileWarning
from .policy import Policy, load_policy
from .report import Report

__all__ = [
    "BackendOptions",
    "COMPILERS",
    "CompileMode",
    "CompiledBlock",
    "Compiler",
    "VALID_OPTIONS",
    "collect_reports",
    "compile_blocks",
    "make_backend",
    "moba_backend",
    "parse_options",
]

logger = logging.getLogger("moba_compile")

VALID_OPTIONS = ("policy", "impl", "compiler", "inductor_config", "mode")
#: What compiles the rewritten graph (the ``compiler`` option).
Compiler = Literal["inductor", "aot_eager", "eager"]
COMPILERS: tuple[str, ...] = get_args(Compiler)
#: torch.compile's modes, as the ``mode`` option and :func:`make_backend` take them (Inductor settings).
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

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
        mode: a torch.compile mode (``"reduce-overhead"``, ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``,
            ``"default"``) applied to Inductor, or None. ``torch.compile`` refuses ``mode=`` together with
            ``options=``; this option is how a policy and a mode go together with ``backend="moba"``.
    """

    policy: Policy
    impl: Impl = "auto"
    compiler: Compiler = "inductor"
    inductor_config: Mapping[str, Any] | None = None
    mode: CompileMode | None = None


def parse_options(options: Mapping[str, Any] | None) -> BackendOptions:
    """Validate the ``options=`` of ``torch.compile(..., backend="moba")``.

    Args:
        options: None or a mapping with keys from :data:`VALID_OPTIONS`: ``policy`` (path to a TOML/JSON file, dict,
            :class:`moba_compile.Policy` or None), ``impl``, ``compiler``, ``inductor_config`` (dict), ``mode`` (a
            torch.compile mode; needs ``compiler="inductor"``).

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
    if compiler not in COMPILERS:
        raise ValueError(f"option 'compiler' = {compiler!r} is not valid; allowed: {', '.join(map(repr, COMPILERS))}")
    inductor_config = options.get("inductor_config")
    if inductor_config is not None and not isinstance(inductor_config, Mapping):
        raise ValueError(f"option 'inductor_config' must be a dict of Inductor config patches, got {inductor_config!r}")
    mode = _check_mode(options.get("mode"), compiler, "option 'mode'")
    return BackendOptions(
        policy=load_policy(options.get("policy")),
        impl=impl,
        compiler=compiler,
        inductor_config=inductor_config,
        mode=mode,
    )


def _check_mode(mode: object, compiler: str, what: str) -> str | None:
    """A valid torch.compile mode for ``compiler``, or None for none (``"default"`` included)."""
    if mode is None or mode == "default":
        return None
    modes = sorted(torch._inductor.list_mode_options())
    if not isinstance(mode, str) or mode not in modes:
        raise ValueError(f"{what} = {mode!r} is not valid; allowed: {', '.join(map(repr, modes))}")
    if compiler != "inductor":
        # Modes are Inductor settings (CUDA graphs, autotuning): with another compiler they would be ignored.
        raise ValueError(f"{what} = {mode!r} needs compiler 'inductor' (it configures Inductor), got {compiler!r}")
    return mode


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


def _run(
    gm: fx.GraphModule, example_inputs: list, opts: BackendOptions, mode: str | None, scope: BlockScope | None = None
) -> Callable:
    report = rewrite_sdpa(gm, opts.policy, impl=opts.impl, scope=scope)
    logger.info("%s", report)
    for reports in _collectors:
        reports.append(report)
    return _compile(gm, example_inputs, opts, mode)


def _bound(opts: BackendOptions, scope: BlockScope | None = None) -> Callable:
    """A backend callable for validated options (and, for :func:`compile_blocks`, the blocks it serves)."""

    def backend(gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
        unknown = sorted(set(kwargs) - {"options", "mode"})
        if unknown or kwargs.get("options"):
            raise ValueError(
                f"a moba backend made by make_backend takes no further options ({sorted(kwargs)} given); pass them "
                "to make_backend"
            )
        mode = _check_mode(kwargs.get("mode"), opts.compiler, "torch.compile mode")
        if mode is not None and opts.mode is not None and mode != opts.mode:
            raise ValueError(f"torch.compile mode {mode!r} contradicts the backend's mode {opts.mode!r}")
        return _run(gm, example_inputs, opts, mode or opts.mode, scope)

    # Dynamo names the backend by its __name__ in messages ("backend='moba' raised ...").
    backend.__name__ = backend.__qualname__ = "moba"
    backend.options = opts  # type: ignore[attr-defined]
    return backend


def make_backend(
    options: Mapping[str, Any] | None = None, mode: CompileMode | None = None, **option_kwargs: Any
) -> Callable:
    """A backend callable with validated options bound: ``torch.compile(model, backend=make_backend(...))``.

    The options are validated here, so a bad option or policy raises :class:`ValueError` /
    :class:`moba_compile.PolicyError` at once, not wrapped by Dynamo in ``BackendCompilerFailed`` at the first call.
    The options are those of ``backend="moba"`` (see :func:`parse_options`), given as a mapping, as keywords, or both
    (a key given twice is an error). ``mode`` may also be given to ``torch.compile`` itself, since no ``options=`` is
    passed there.

    Args:
        options: a mapping of backend options, or None.
        mode: a torch.compile mode applied to Inductor (``"reduce-overhead"``, ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``), or None; the same as the ``mode`` option.
        **option_kwargs: backend options as keywords: ``policy``, ``impl``, ``compiler``, ``inductor_config``.

    Returns:
        A callable ``backend(gm, example_inputs, **kwargs)`` for ``torch.compile``/``nn.Module.compile``.

    Raises:
        ValueError: an unknown or repeated option, a bad value, a mode with a compiler other than Inductor.
        moba_compile.PolicyError: a malformed policy.

    Example:
        >>> backend = make_backend(policy={"dense_last": 1}, mode="max-autotune-no-cudagraphs")
        >>> compiled = torch.compile(torch.nn.Linear(2, 2), backend=backend)
        >>> backend.options.mode
        'max-autotune-no-cudagraphs'
    """
    merged = dict(options or {}) if options is None or isinstance(options, Mapping) else options
    if isinstance(merged, dict):
        twice = sorted(set(merged) & set(option_kwargs))
        if twice:
            raise ValueError(f"option(s) {', '.join(map(repr, twice))} given both in options and as keywords")
        merged.update(option_kwargs)
        if mode is not None:
            if merged.get("mode") not in (None, mode):
                raise ValueError(f"mode={mode!r} contradicts option 'mode' = {merged['mode']!r}")
            merged["mode"] = mode
    return _bound(parse_options(merged))


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
    opts = parse_options(kwargs.get("options"))
    mode = _check_mode(kwargs.get("mode"), opts.compiler, "torch.compile mode")
    return _run(gm, example_inputs, opts, mode or opts.mode)


@dataclass(frozen=True)
class CompiledBlock:
    """One block compiled by :func:`compile_blocks`.

    Attributes:
        path: the block's module path (relative to the model given, e.g. ``"model.layers.3"``).
        layer: its layer index, as the policy counts it.
        group: blocks with the same group number share one backend, so Dynamo compiles one graph for them: the policy
            decides every module of those blocks alike.
    """

    path: str
    layer: int
    group: int


def _find_blocks(model: nn.Module, blocks: str | None) -> tuple[str, list[tuple[str, nn.Module]]]:
    if blocks is not None:
        container = model.get_submodule(blocks)
        return blocks, list(container.named_children())
    lists = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(
            f"compile_blocks: {type(model).__name__} holds no nn.ModuleList of blocks; pass the blocks themselves or "
            "name their container with blocks='...'"
        )
    longest = max(len(m) for _, m in lists)
    best = [(path, m) for path, m in lists if len(m) == longest]
    if len(best) > 1:
        names = ", ".join(repr(path) for path, _ in best)
        raise ValueError(f"compile_blocks: several lists of {longest} blocks ({names}); choose one with blocks='...'")
    path, container = best[0]
    return path, list(container.named_children())


def _named_blocks(
    model_or_blocks: nn.Module | Sequence[nn.Module], blocks: str | None
) -> list[tuple[str, int, nn.Module]]:
    """``(path, layer, block)`` for every block to compile."""
    if isinstance(model_or_blocks, nn.Module) and not isinstance(model_or_blocks, nn.ModuleList):
        prefix, children = _find_blocks(model_or_blocks, blocks)
        named = [(f"{prefix}.{name}".strip("."), name, block) for name, block in children]
    else:
        if blocks is not None:
            raise ValueError("compile_blocks: blocks='...' names a container inside a model; a list was given")
        items = list(model_or_blocks)
        if not all(isinstance(b, nn.Module) for b in items):
            raise ValueError("compile_blocks: every block must be an nn.Module")
        index = ModuleIndex()  # a list of registered blocks: name them as the model that holds them does
        named = []
        for position, block in enumerate(items):
            links = index.ancestry(block)
            path = ".".join(name for _, name, _ in reversed(links)) or str(position)
            named.append((path, path.rsplit(".", 1)[-1], block))
    return [
        (path, int(name) if name.isdigit() else position, block) for position, (path, name, block) in enumerate(named)
    ]


def compile_blocks(
    model_or_blocks: nn.Module | Sequence[nn.Module],
    policy: str | Mapping[str, Any] | Policy | None = None,
    *,
    blocks: str | None = None,
    attention_layers: Sequence[int] | None = None,
    impl: Impl = "auto",
    compiler: Compiler = "inductor",
    inductor_config: Mapping[str, Any] | None = None,
    mode: CompileMode | None = None,
    **compile_kwargs: Any,
) -> list[CompiledBlock]:
    """Compile every block (decoder layer) of a model on its own, each with the policy's decision for that layer.

    Dynamo compiles one graph per block class and reuses it for every block (modules are graph inputs), so a graph of
    one block cannot hold per-layer decisions; ``torch.compile`` of a single block, or a graph break in the layer loop,
    therefore refuses a policy that treats layers differently. This function is the supported way to compile per block
    (as FSDP2 and activation-checkpointed training do): blocks whose modules the policy decides alike share one
    backend (and one compiled graph), and each other decision gets its own. Module paths, layer indices and the
    number of layers are the whole model's, as the policy expects; reports name sites by their full path.

    Dynamo keeps one compiled entry per backend for the block class's code: when there are more distinct decisions
    than ``torch._dynamo.config.recompile_limit`` allows (8), the limit is raised to twice their number, since past it
    the remaining blocks would silently run uncompiled, that is, dense.

    Args:
        model_or_blocks: the model (its blocks are the longest ``nn.ModuleList`` in it, or the one named by
            ``blocks``; paths are relative to the model), or the blocks themselves (an ``nn.ModuleList`` or a list of
            modules, named as the model holding them names them, else by position).
        policy: the policy (file path, dict, :class:`moba_compile.Policy`, or None for the default policy).
        blocks: the module path of the blocks' container in ``model_or_blocks`` (e.g. ``"model.layers"``).
        attention_layers: the layer indices of the blocks that hold attention (for hybrid models; ``dense_last`` and
            negative indices count these); default every block.
        impl, compiler, inductor_config, mode: backend options, as for ``backend="moba"`` (see :func:`parse_options`).
        **compile_kwargs: passed to ``nn.Module.compile`` for every block (``dynamic``, ``fullgraph``, ...).

    Returns:
        One :class:`CompiledBlock` (path, layer, group) per block, in order.

    Raises:
        ValueError: no blocks found, an ambiguous container, bad options.
        moba_compile.PolicyError: a malformed policy.

    Example:
        >>> plan = compile_blocks(model, {"chunk_size": 2048, "topk": 3, "dense_last": 1})  # doctest: +SKIP
        >>> [(b.path, b.group) for b in plan]  # doctest: +SKIP
        [('layers.0', 0), ('layers.1', 0), ('layers.2', 0), ('layers.3', 1)]
    """
    opts = parse_options(
        {"policy": policy, "impl": impl, "compiler": compiler, "inductor_config": inductor_config, "mode": mode}
    )
    named = _named_blocks(model_or_blocks, blocks)
    if not named:
        raise ValueError("compile_blocks: no blocks to compile")
    layers = sorted({layer for _, layer, _ in named}) if attention_layers is None else sorted(set(attention_layers))
    num_layers = len(layers)
    groups: dict[tuple, list[tuple[str, int, nn.Module]]] = {}
    for path, layer, block in named:
        # Every module of the block may call SDPA: the block's decisions are those of all its module paths.
        signature = tuple(
            (rel, d.mode, d.chunk_size, d.topk, d.routing)
            for rel, _ in block.named_modules()
            for d in [opts.policy.decide(f"{path}.{rel}".strip("."), layer, num_layers, layers)]
        )
        groups.setdefault(signature, []).append((path, layer, block))
    if all(mode == "dense" for signature in groups for _, mode, *_ in signature):
        # The per-graph check cannot see this (each graph serves one group), so the whole model is checked here.
        message = f"moba: compile_blocks: policy {opts.policy.source} keeps all {len(named)} blocks dense"
        logger.warning("%s", message)
        warnings.warn(message, MobaCompileWarning, stacklevel=2)
    plan: dict[int, CompiledBlock] = {}
    for group, members in enumerate(groups.values()):
        scope = BlockScope({id(block): (path, layer) for path, layer, block in members}, num_layers, tuple(layers))
        backend = _bound(opts, scope)
        for path, layer, block in members:
            block.compile(backend=backend, **compile_kwargs)
            plan[id(block)] = CompiledBlock(path, layer, group)
    limit = torch._dynamo.config.recompile_limit
    if 2 * len(groups) > limit:
        logger.info("compile_blocks: recompile_limit %d -> %d (%d decisions)", limit, 2 * len(groups), len(groups))
        torch._dynamo.config.recompile_limit = 2 * len(groups)
    return [plan[id(block)] for _, _, block in named]


def register() -> None:
    """Register ``moba`` with Dynamo unless the entry point (or an earlier import) already did."""
    from torch._dynamo.backends import registry

    # Discover entry points first: when the installed entry point provides "moba", Dynamo loads it lazily, and
    # registering it here as well would make that load fail with "duplicate name".
    registry._lazy_import()
    if "moba" in registry._COMPILER_FNS or registry._BACKENDS.get("moba") is not None:
        return
    registry.register_backend(moba_backend, name="moba")
