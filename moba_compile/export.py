"""MoBA for ``torch.export`` programs: the pass on an ``ExportedProgram``, ready for AOTInductor.

:func:`apply` finds the ``aten.scaled_dot_product_attention`` calls of an exported program, decides each one from the
policy and rewrites the chosen ones into ``moba::attention``, exactly as the ``moba`` backend does for a Dynamo graph:
the same site classification (:mod:`moba_compile.passes.sites`), the same decisions and wording
(:func:`moba_compile.decisions.decide_site`), the same report (:class:`moba_compile.Report`) and warnings. Only the
layer identity comes from elsewhere: the module names ``torch.export`` records on every node (``nn_module_stack``), not
live module objects. The result is a new ``ExportedProgram`` (the input is left as it was): run it
(``program.module()(...)``), save it (``torch.export.save``), or compile it ahead of time::

    program, report = moba_compile.export.export(model, (input_ids,), policy="policy.toml")
    path = torch._inductor.aoti_compile_and_package(program, package_path="model.pt2")

    import moba_compile  # registers the moba:: ops the package calls: needed before loading
    runner = torch._inductor.aoti_load_package("model.pt2")
    logits = runner(input_ids)

Dynamic shapes declared with ``torch.export.Dim`` stay dynamic: the ``moba::`` ops have fake kernels, and sites are
classified without specialising a symbolic size. See docs/export.md.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, overload

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, TensorArgument

from .ops import IMPLS, Impl
from .passes.rewrite import rewrite_sdpa
from .passes.sites import is_exported_graph
from .policy import Policy, load_policy
from .report import Report

__all__ = ["apply", "export"]


@overload
def apply(
    program: ExportedProgram, policy: str | dict | Policy | None = None, *, impl: Impl = "auto"
) -> tuple[ExportedProgram, Report]: ...


@overload
def apply(
    program: fx.GraphModule, policy: str | dict | Policy | None = None, *, impl: Impl = "auto"
) -> tuple[fx.GraphModule, Report]: ...


def apply(
    program: ExportedProgram | fx.GraphModule,
    policy: str | dict | Policy | None = None,
    *,
    impl: Impl = "auto",
) -> tuple[ExportedProgram | fx.GraphModule, Report]:
    """Rewrite the SDPA calls of an exported program that the policy puts on MoBA into ``moba::attention``.

    The pass of the ``moba`` backend, on the graph ``torch.export`` made: every ``aten.scaled_dot_product_attention``
    call (causal, boolean mask, ``enable_gqa``, key/value repeated by the ``repeat_kv`` idiom or ``repeat_interleave``,
    calls inside ``torch.no_grad()``/``torch.autocast`` regions and other rewritable subgraphs) is classified and
    decided as the backend decides it, with the layer taken from the module path ``torch.export`` records
    (``model.layers.7.self_attn`` is layer 7). Calls that are not converted keep dense SDPA.

    Args:
        program: a ``torch.export.ExportedProgram`` (from ``torch.export.export``, before ``run_decompositions()``,
            which writes SDPA as matmul and softmax); it is not modified. Or the graph module of one (``ep.module()``,
            ``ep.graph_module``), which is rewritten in place.
        policy: policy file path, dict, :class:`moba_compile.Policy`, or None for the default policy.
        impl: the implementation the inserted ``moba::attention`` calls ask for at run time: ``"auto"`` (Triton kernels
            on CUDA where they support the inputs, else the reference), ``"triton"`` or ``"reference"``.

    Returns:
        ``(rewritten, report)``: a new ``ExportedProgram`` (the same inputs, outputs, parameters, range constraints and
        module call graph; a graph module in, the same graph module out) and a :class:`moba_compile.Report` with one
        record per SDPA call (graph 0), as ``explain`` gives for the same model, policy and input form.

    Raises:
        TypeError: ``program`` is neither an ``ExportedProgram`` nor an exported graph module (a model: export it
            first, or use :func:`export`; a Dynamo graph: that is the ``moba`` backend's).
        ValueError: an unknown ``impl``.
        moba_compile.PolicyError: a malformed policy (unknown keys, bad values).
        RuntimeError: ``impl="triton"`` and a converted call's inputs cannot run on the Triton kernels.

    Warns:
        moba_compile.MobaCompileWarning: as the backend warns: a rule that matches no site, a policy that converts
        nothing, ``dense_last``/``num_layers`` not fitting the layers found, no attention at all.

    Example:
        >>> program = torch.export.export(model, (input_ids,))  # doctest: +SKIP
        >>> program, report = moba_compile.export.apply(program, "policy.toml")  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    if impl not in IMPLS:
        raise ValueError(f"impl = {impl!r} is not valid; allowed: {', '.join(map(repr, IMPLS))}")
    if isinstance(program, ExportedProgram):
        loaded = load_policy(policy)
        gm = copy.deepcopy(program.graph_module)  # the graph only: parameters are inputs of an exported graph
        report = rewrite_sdpa(gm, loaded, impl=impl, exported=True)
        return _rebuild(program, gm), _numbered(report)
    if isinstance(program, fx.GraphModule):
        if not is_exported_graph(program):
            raise TypeError(
                "moba_compile.export.apply: this GraphModule is a Dynamo graph, not an exported program's: "
                'torch.compile(model, backend="moba") rewrites those'
            )
        report = rewrite_sdpa(program, load_policy(policy), impl=impl, exported=True)
        return program, _numbered(report)
    hint = (
        "; export it first (torch.export.export(model, args)) or call moba_compile.export.export(model, args, ...)"
        if isinstance(program, torch.nn.Module)
        else ""
    )
    raise TypeError(
        f"moba_compile.export.apply takes a torch.export.ExportedProgram (or its graph module), got "
        f"{type(program).__name__}{hint}"
    )


def export(
    model: torch.nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    strict: bool = False,
    policy: str | dict | Policy | None = None,
    impl: Impl = "auto",
) -> tuple[ExportedProgram, Report]:
    """``torch.export.export(model, args, kwargs, ...)``, then :func:`apply` with ``policy``.

    Args:
        model, args, kwargs, dynamic_shapes, strict: as for ``torch.export.export`` (``dynamic_shapes`` declared with
            ``torch.export.Dim`` stay dynamic through the rewrite).
        policy, impl: as for :func:`apply`; the policy is checked before the (possibly long) export.

    Returns:
        ``(program, report)`` as :func:`apply` returns them.

    Raises:
        As :func:`apply`, and whatever ``torch.export.export`` raises for the model.

    Example:
        >>> L = torch.export.Dim("L", max=4096)  # doctest: +SKIP
        >>> program, report = export(model, (ids,), dynamic_shapes=({1: L},), policy="policy.toml")  # doctest: +SKIP
    """
    if impl not in IMPLS:
        raise ValueError(f"impl = {impl!r} is not valid; allowed: {', '.join(map(repr, IMPLS))}")
    loaded = load_policy(policy)
    program = torch.export.export(
        model, tuple(args), dict(kwargs) if kwargs is not None else None, dynamic_shapes=dynamic_shapes, strict=strict
    )
    return apply(program, loaded, impl=impl)


def _numbered(report: Report) -> Report:
    """The report with its sites in graph 0: a program is one graph (the pass numbers graphs process-wide)."""
    sites = [dataclasses.replace(site, graph=0) for site in report.sites]
    return Report(sites, report.unmatched_rules, report.policy_source)


def _rebuild(program: ExportedProgram, gm: fx.GraphModule) -> ExportedProgram:
    """A new ``ExportedProgram`` around the rewritten graph module, with everything else of ``program``.

    The rewrite keeps the graph's inputs; an output that was an SDPA call is now the ``moba::attention`` result, so
    the signature's output names are read again from the graph.
    """
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    returned = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    specs = []
    for spec, value in zip(program.graph_signature.output_specs, returned):
        if isinstance(spec.arg, TensorArgument) and isinstance(value, fx.Node) and spec.arg.name != value.name:
            spec = dataclasses.replace(spec, arg=TensorArgument(name=value.name))
        specs.append(spec)
    signature = ExportGraphSignature(input_specs=list(program.graph_signature.input_specs), output_specs=specs)
    return ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=signature,
        state_dict=program.state_dict,
        range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs,
        constants=program.constants,
        verifiers=program.verifiers,
    )
