"""``explain``: compile a model with the ``moba`` backend, run it once, and return what was decided where."""

from __future__ import annotations

import difflib
import inspect
import itertools
import linecache
from dataclasses import replace
from typing import Any

import torch

from . import ops
from .backend import Compiler, collect_reports, make_backend
from .ops import Impl
from .policy import Policy, load_policy
from .report import Report

__all__ = ["explain"]

_explain_calls = itertools.count()


def explain(
    model: torch.nn.Module | Any,
    *args: Any,
    policy: str | dict | Policy | None = None,
    impl: Impl = "auto",
    compiler: Compiler = "aot_eager",
    **kwargs: Any,
) -> Report:
    """Compile ``model`` with the ``moba`` backend, run ``model(*args, **kwargs)`` once, and report every SDPA site.

    Args:
        model: an ``nn.Module`` or any callable torch.compile accepts.
        *args, **kwargs: the inputs of one call (e.g. ``input_ids``).
        policy: policy file path, dict, :class:`moba_compile.Policy`, or None for the default policy.
        impl: implementation the converted sites ask for (see :func:`moba_compile.moba_attention`).
        compiler: what compiles the rewritten graph; ``"aot_eager"`` (default) skips Inductor's code generation,
            which does not change any decision.

    Returns:
        :class:`moba_compile.Report` merged over all graphs (graph breaks give several): ``report.sites`` has one record
        per SDPA call (``module``, ``layer``, ``decision``, ``chunk_size``, ``topk``, ``reason``, ...), sites whose
        boolean mask proved non-causal during the run are reported dense, dense sites run by ``moba::dense_attention``
        (``dense_sdpa = "flash_when_causal"``) say whether flash or their masked SDPA call ran, and
        ``report.unmatched_rules`` lists the policy rules that matched no site. ``print(report)`` shows a table.

    Raises:
        moba_compile.PolicyError: malformed policy. ValueError: bad ``impl``/``compiler``.
        TypeError: a keyword the model's ``forward`` does not take (a misspelt ``policy=`` would otherwise reach the
            model, or be dropped by it); checked where the signature tells (a ``**kwargs`` forward takes anything).

    Example:
        >>> report = explain(model, input_ids, policy="policy.toml")  # doctest: +SKIP
        >>> [(s.layer, s.decision) for s in report.sites]  # doctest: +SKIP
    """
    _check_model_keywords(model, kwargs)
    loaded = load_policy(policy)
    backend = make_backend({"policy": loaded, "impl": impl, "compiler": compiler})
    compiled = torch.compile(_fresh_caller(model), backend=backend)
    before = dict(ops.MASK_OBSERVATIONS)
    ops.MASK_OBSERVATIONS.clear()
    try:
        with (
            collect_reports() as reports,
            torch.no_grad(),
            torch._dynamo.config.patch(fail_on_recompile_limit_hit=True),
        ):
            compiled(*args, **kwargs)
        observed = dict(ops.MASK_OBSERVATIONS)
    finally:
        ops.MASK_OBSERVATIONS.clear()
        ops.MASK_OBSERVATIONS.update(before)
    if not reports:
        raise RuntimeError(
            "explain: torch.compile produced no graph for this call (was the model already compiled with another "
            "backend and run eagerly, or is it excluded from compilation?)"
        )
    merged = Report(policy_source=loaded.source)
    for number, report in enumerate(reports):  # number graphs from 0 within this call
        report = Report([replace(s, graph=number) for s in report.sites], report.unmatched_rules, report.policy_source)
        merged = merged.merge(report)
    return merged.with_mask_observations(
        observed, ops.MASK_KIND_REASONS, {ops.MASK_DOCUMENTS: ops.MASK_DOCUMENTS_NOTE}, flash_kinds=(ops.MASK_CAUSAL,)
    )


_OWN_KEYWORDS = ("policy", "impl", "compiler")


def _check_model_keywords(model: Any, kwargs: dict[str, Any]) -> None:
    """Refuse keywords that ``model`` cannot take, naming them and explain's own keywords."""
    if not kwargs:
        return
    target = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature: nothing to tell
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    names = [
        p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = [key for key in kwargs if key not in names]
    if not unknown:
        return
    what = (
        f"{type(model).__name__}.forward"
        if isinstance(model, torch.nn.Module)
        else getattr(model, "__name__", "the model")
    )
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, [*_OWN_KEYWORDS, *names], n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(
        f"explain: {what} takes no keyword argument {', '.join(hints)}; explain's own keywords are "
        f"{', '.join(_OWN_KEYWORDS)}, and the model's are {', '.join(names) or 'none'}"
    )


def _fresh_caller(model: Any) -> Any:
    """A new function (with its own code object) that calls ``model``.

    Dynamo keeps its compiled code per code object, and each ``explain`` brings a new backend: compiling the model's
    own ``forward`` again and again would reach Dynamo's recompile limit, after which it silently runs eagerly and
    nothing would be reported. A fresh code object starts with an empty cache.
    """
    namespace: dict[str, Any] = {"model": model}
    # A unique file name too: Dynamo's automatic-dynamic memory is keyed by file, line and name, and shapes seen by an
    # earlier explain must not make this one's dimensions symbolic.
    source = "def call(*args, **kwargs):\n    return model(*args, **kwargs)\n"
    filename = f"<moba-explain-{next(_explain_calls)}>"
    # Registered as source: torch 2.11's torch.compile wraps a function whose source file it cannot find in one shared
    # helper frame (external_utils.inner), which would collect every explain's entry and hit the recompile limit again.
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), namespace)
    return namespace["call"]
