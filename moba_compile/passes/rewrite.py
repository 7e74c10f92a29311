"""Decide every SDPA site from the policy and replace the converted ones by ``moba::attention``.

Sites that are not converted are left untouched, so they keep dense SDPA bit for bit; except, when the policy sets
``dense_sdpa = "flash_when_causal"``, the dense sites the pass could have converted that carry a boolean mask: those
become ``moba::dense_attention`` (flash where the mask proves exactly causal at run time, the same SDPA call
elsewhere; :mod:`moba_compile.dense_ops`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import dense_ops, ops
from ..decisions import decide_site, layer_decision, reason
from ..ops import resolve_impl
from ..policy import Decision, Policy, PolicyError
from ..report import FORM_NONE, Report, SiteRecord
from .identity import BlockScope
from .sites import CONTEXT_REGIONS, REWRITABLE_REGIONS, SdpaSite, _meta, find_sdpa_sites, is_exported_graph

__all__ = ["MobaCompileWarning", "rewrite_sdpa"]

logger = logging.getLogger("moba_compile")

_graph_ids = itertools.count()

LAYER_FROM_PATH = "module path"
LAYER_FROM_LAYER_IDX = "module's layer_idx"
LAYER_FROM_ORDER = "order of SDPA calls"


class MobaCompileWarning(UserWarning):
    """A policy or model the pass can apply, but probably not as meant (a rule matching nothing, nothing converted,
    ``dense_last`` or ``num_layers`` not fitting the model, no attention found). Also logged on ``moba_compile``."""


@dataclass
class _Unit:
    """One SDPA call as the policy sees it: a site, or one caller of a subgraph that several callers share."""

    site: SdpaSite
    module: str
    layer: int | None
    variants: tuple[tuple[str, int | None], ...]  # the same call at every layer it may stand for, itself first
    shared: bool  # the graph serves every variant: they must be decided alike
    identified: bool = True  # False: a shared subgraph whose callers could not be told apart


def _example(node: fx.Node) -> object:
    """The real value behind a Dynamo graph input (a parameter or buffer), or None."""
    grapharg = node.meta.get("grapharg")
    try:
        return grapharg.example if grapharg is not None else None
    except Exception:  # a dead weak reference: nothing to identify
        return None


def _caller_variant(site: SdpaSite, call: fx.Node) -> int | None:
    """Which layer of the site's container a higher-order call runs the (shared) subgraph for: the one whose
    parameters the call passes in. None when no single layer owns them."""
    placement = site.placement
    if placement is None or not placement.variant_modules:
        return None
    passed = {id(_example(arg)) for arg in call.all_input_nodes if arg.op == "placeholder"} - {id(None)}
    owners = [
        i
        for i, module in enumerate(placement.variant_modules)
        if any(id(t) in passed for t in itertools.chain(module.parameters(), module.buffers()))
    ]
    return owners[0] if len(owners) == 1 else None


def _units(sites: list[SdpaSite]) -> list[_Unit]:
    units = []
    for site in sites:
        placement = site.placement
        own = (site.module, placement.layer if placement else None)
        variants = placement.variants if placement and placement.variants else (own,)
        shared = bool(placement and placement.shared)
        if site.calls and not shared:
            # A subgraph is traced once, for its first caller (a nested compile region runs for several layers):
            # each caller is the layer whose parameters it passes in.
            found = [_caller_variant(site, call) for call in site.calls]
            if all(i is not None for i in found):
                for i in found:
                    others = tuple(v for v in variants if v != variants[i])
                    units.append(_Unit(site, variants[i][0], variants[i][1], (variants[i], *others), False))
                continue
            if len(site.calls) > 1:
                units.append(_Unit(site, site.module, own[1], variants, True, identified=False))
                continue
        units.append(_Unit(site, site.module, own[1], (own, *(v for v in variants if v != own)), shared))
    return units


def _layers(units: list[_Unit]) -> str:
    """Fill every unit's layer and say where it came from: module paths, else ``layer_idx``, else call order."""
    if units and all(u.layer is not None for u in units):
        return LAYER_FROM_PATH
    from_modules = [u.site.placement.layer_idx if u.site.placement else None for u in units]
    if units and all(layer is not None for layer in from_modules):
        for unit, layer in zip(units, from_modules):
            unit.layer, unit.variants = layer, ((unit.module, layer),)
        return LAYER_FROM_LAYER_IDX
    for order, unit in enumerate(units):
        unit.layer, unit.variants = order, ((unit.module, order),)
    return LAYER_FROM_ORDER


def _attention_layers(units: list[_Unit], source: str, scope: BlockScope | None) -> tuple[list[int], str | None]:
    """The attention layers the policy counts (``dense_last``, negative indices) and, when they are not just the
    layers of this graph's sites, why.

    When the graph shows every layer, the layers with an SDPA call are the attention layers (a hybrid model's others
    have none). A graph that shows only some layers (it starts inside a repeated layer, or graph breaks split the
    model) counts every layer of the container its sites belong to, each as one attention layer.
    """
    if scope is not None:
        return list(scope.attention_layers), "the layers compile_blocks was given"
    seen = sorted({u.layer for u in units if u.layer is not None})
    if source != LAYER_FROM_PATH:
        return seen, None
    hidden = sorted({h for u in units if u.site.placement for h in u.site.placement.hidden} - set(seen))
    partial = [u for u in units if u.shared or (u.site.placement and set(u.site.placement.hidden) - set(seen))]
    if not partial:
        return seen, None
    every = sorted({layer for u in partial for _, layer in u.variants if layer is not None} | set(seen))
    if hidden:
        which = f"layers {_span(hidden)} are" if len(hidden) > 1 else f"layer {hidden[0]} is"
        return every, f"{which} not in this graph (graph breaks); all {len(every)} layers counted"
    return every, f"this graph serves {len(every)} layers"


def _span(layers: Sequence[int]) -> str:
    layers = list(layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))


def _shared_decision(policy: Policy, unit: _Unit, decisions: list[Decision]) -> Decision:
    """The decision for a call whose graph serves several layers (``unit.variants``), which must all be decided alike.

    Dynamo compiles one graph for a block class and reuses it for every block (modules are graph inputs): a graph
    that starts inside a layer (per-block ``compile``, a graph break in the layer loop) cannot hold a different
    decision per layer. A policy that treats those layers alike is applied; one that does not cannot be honoured:
    under the automatic policy the site stays dense, under an explicit one it is an error.
    """
    decision = decisions[0]
    distinct = {(d.mode, d.chunk_size, d.topk, d.routing) for d in decisions}
    layers = sorted({layer for _, layer in unit.variants if layer is not None})
    served = f"layers {_span(layers)}" if layers else ", ".join(path for path, _ in unit.variants)
    if len(distinct) == 1:
        return replace(decision, reason=f"{decision.reason}; this graph serves {served}, decided alike")
    ordered = sorted(zip(unit.variants, decisions), key=lambda vd: (vd[0][1] is None, vd[0][1] or 0, vd[0][0]))
    shown = [
        f"{path}: {d.mode}" + (f" C{d.chunk_size} K{d.topk} {d.routing}" if d.mode == "moba" else "")
        for (path, _), d in ordered
    ]
    differ = "; ".join(shown if len(shown) <= 6 else [*shown[:3], "...", *shown[-2:]])
    where = "a nested compile region shared by several layers" if not unit.identified else "a layer"
    why = (
        f"this graph starts inside {where} ({unit.module!r}), and Dynamo reuses it for every layer of the same class "
        f"({served}), but the policy treats them differently ({differ})"
    )
    if policy.automatic:
        return replace(decision, mode="dense", reason=f"{why}: dense under the default policy")
    raise PolicyError(
        f"{policy.source}: {why}. Compile the whole model in one graph, or compile each block with its own decision: "
        "moba_compile.compile_blocks(model, policy)."
    )


def _split_shared_subgraphs(units: list[_Unit], decide: Callable[[str, int | None], Decision]) -> bool:
    """Give each group of callers that the policy decides differently its own copy of a shared subgraph.

    Returns:
        True when a subgraph was copied (the sites must then be found again).
    """
    split = False
    by_owner: dict[int, list[_Unit]] = {}
    for unit in units:
        if len(unit.site.calls) > 1 and unit.identified and unit.site.owner is not None:
            by_owner.setdefault(id(unit.site.owner), []).append(unit)
    for owned in by_owner.values():
        site = owned[0].site
        per_site = len(site.calls)
        # units of one site are consecutive, one per caller, in caller order
        vectors: dict[fx.Node, list] = {call: [] for call in site.calls}
        for start in range(0, len(owned), per_site):
            for call, unit in zip(site.calls, owned[start : start + per_site]):
                d = decide(unit.module, unit.layer)
                vectors[call].append(None if unit.site.blocker else (d.mode, d.chunk_size, d.topk, d.routing))
        groups: dict[tuple, list[fx.Node]] = {}
        for call, vector in vectors.items():
            groups.setdefault(tuple(vector), []).append(call)
        for calls in list(groups.values())[1:]:
            _copy_subgraph(site.owner, calls)
            split = True
    return split


def _copy_subgraph(sub: fx.GraphModule, calls: list[fx.Node]) -> None:
    """Point ``calls`` (``invoke_subgraph`` nodes) at a copy of their subgraph ``sub``, under a new identifier."""
    graph = calls[0].graph
    parent = graph.owning_module
    copied = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    out, old_output = copied.graph_copy(sub.graph, mapping, return_output_node=True)
    new_output = copied.output(out)
    new_output.meta = dict(old_output.meta)
    for n in itertools.count():
        name = f"{calls[0].args[0].target}_moba_{n}"
        if not hasattr(parent, name):
            break
    parent.register_module(name, fx.GraphModule(sub, copied))
    for call in calls:
        with graph.inserting_before(call):
            attr = graph.get_attr(name)
        old_attr = call.args[0]
        # invoke_subgraph caches traced subgraphs by this identifier: the copy needs its own.
        call.args = (attr, name, *call.args[2:])
        if isinstance(old_attr, fx.Node) and not old_attr.users:
            graph.erase_node(old_attr)
    graph.lint()
    parent.recompile()


def _warn(message: str) -> None:
    logger.warning("%s", message)
    warnings.warn(message, MobaCompileWarning, stacklevel=4)


def _check_policy_fit(
    policy: Policy,
    units: list[_Unit],
    attention_layers: list[int],
    records: list[SiteRecord],
    unmatched: list[str],
    kept_dense: list[str],
    scope: BlockScope | None = None,
    exported: bool = False,
) -> None:
    """Warn about what the report alone shows only at INFO: a policy that does not fit the model.

    ``kept_dense`` are the reasons of the sites that could run MoBA but that the policy's decision (layers, rules,
    ``dense_last``) kept dense. Under :func:`moba_compile.compile_blocks` (``scope``) a graph serves only the blocks
    decided alike, so a group the policy keeps dense on purpose is no mistake: compile_blocks checks the whole model.
    """
    where = f"policy {policy.source}"
    if not units and exported:
        _warn(
            "moba: no attention found in this exported program: no aten.scaled_dot_product_attention call, so nothing "
            "runs MoBA here (apply the pass before ep.run_decompositions(), which writes SDPA as matmul and softmax; "
            "attention written with matmul and softmax, or transformers' attn_implementation='eager', is not SDPA; a "
            "program the pass already rewrote calls moba.attention instead)"
        )
        return
    if not units:
        _warn(
            "moba: no attention found in this graph: no scaled_dot_product_attention call, so nothing runs MoBA here "
            "(a graph break may have put the attention in another graph; attention written with matmul and softmax, "
            "or transformers' attn_implementation='eager', is not SDPA and stays as written)"
        )
        return
    paths = sorted({u.module for u in units if u.module})
    shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "") if paths else "none"
    for rule in unmatched:
        _warn(f"moba: {where}: {rule} matches no attention site of this graph (module paths here: {shown})")
    count = len(attention_layers)
    if count and policy.dense_last > count:
        _warn(f"moba: {where}: dense_last = {policy.dense_last} is larger than the {count} attention layers found")
    if policy.num_layers is not None and count > policy.num_layers:
        _warn(
            f"moba: {where}: num_layers = {policy.num_layers} is smaller than the {count} attention layers found, "
            "so dense_last and negative layer indices count from the wrong end"
        )
    for unit in units:
        region = unit.site.region
        if region is not None and any(part not in REWRITABLE_REGIONS for part in region.split("/")):
            _warn(f"moba: the attention at {unit.module or '(no module)'} stays dense: {unit.site.blocker}")
    convertible = sum(1 for u in units if u.site.blocker is None)
    # Only the policy's own decisions: decode = "dense" and min_seq_len keeping sites dense are choices, not mistakes.
    if (
        scope is None
        and kept_dense
        and len(kept_dense) == convertible
        and not any(r.decision == "moba" for r in records)
    ):
        more = f" (and {len(kept_dense) - 1} more sites kept dense likewise)" if len(kept_dense) > 1 else ""
        _warn(f"moba: {where} converts none of the {len(records)} attention sites of this graph: {kept_dense[0]}{more}")


def rewrite_sdpa(
    gm: fx.GraphModule,
    policy: Policy,
    *,
    impl: str = "auto",
    scope: BlockScope | None = None,
    exported: bool | None = None,
) -> Report:
    """Apply ``policy`` to every SDPA call of a Dynamo graph or an exported program's graph (and of its higher-order
    subgraphs), in place, and report each decision.

    A subgraph that several calls share (a nested compile region run by every layer) is decided per caller; callers
    decided differently get their own copy of it. Warnings (:class:`MobaCompileWarning`, also logged) flag a policy
    that does not fit: a rule matching no site, nothing converted, ``dense_last``/``num_layers`` against the layers
    found, or no attention at all.

    Args:
        gm: a Dynamo-level ``GraphModule``, or the graph module of a ``torch.export`` program (for a whole program
            use :func:`moba_compile.export.apply`, which rewrites a copy and rebuilds the program); it is modified in
            place and recompiled.
        policy: a validated :class:`moba_compile.policy.Policy`.
        impl: implementation the inserted ``moba::attention`` calls ask for (``"auto"``, ``"triton"``, ``"reference"``).
        scope: the blocks a :func:`moba_compile.compile_blocks` backend serves (names and layers of its graphs), or
            None.
        exported: whether ``gm`` is an exported program's graph: module paths come from the names ``torch.export``
            records, and the inserted nodes get ``val`` fake tensors as ``torch.export`` gives every node. None:
            :func:`moba_compile.passes.sites.is_exported_graph` tells.

    Returns:
        A :class:`moba_compile.report.Report` with one record per SDPA call (per caller of a shared subgraph) and the
        rules that matched none.

    Raises:
        RuntimeError: ``impl="triton"`` and a converted site's inputs cannot run on the Triton kernels.
        moba_compile.PolicyError: the graph serves several layers (it starts inside a repeated layer) that an explicit
            policy decides differently.

    Example:
        >>> report = rewrite_sdpa(gm, load_policy(None))  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    graph_id = next(_graph_ids)
    if exported is None:
        exported = is_exported_graph(gm)
    for _ in range(2):  # a second pass after shared subgraphs were split per decision
        sites = find_sdpa_sites(gm, scope, exported=exported)
        units = _units(sites)
        layer_source = _layers(units)
        attention_layers, count_note = _attention_layers(units, layer_source, scope)
        decide = functools.partial(layer_decision, policy, attention_layers=attention_layers)
        if not _split_shared_subgraphs(units, decide):
            break
    matched_rules: set[int] = set()
    mask_checks: dict[tuple[fx.Node, str, str], fx.Node] = {}
    replaced: dict[fx.Node, fx.Node] = {}  # converted SDPA node -> its replacement (a later site may consume it)
    converted: dict[fx.Node, tuple[str, str | None]] = {}  # converted SDPA node -> (impl note, mask tag)
    dense_converted: dict[fx.Node, str] = {}  # dense SDPA node run by moba::dense_attention -> its mask tag
    split_k_converted: set[fx.Node] = set()  # dense static-cache decode steps run by moba::dense_decode
    step_lengths: dict[tuple[fx.Node, str], fx.Node] = {}  # a static cache's step mask -> its moba::static_length
    touched: dict[int, fx.GraphModule] = {id(gm): gm}
    records: list[SiteRecord] = []
    kept_dense: list[str] = []  # why the policy kept a convertible site dense
    for unit in units:
        site, layer = unit.site, unit.layer
        decisions = [decide(path, at) for path, at in unit.variants]
        decision = decisions[0]
        matched_rules.update(d.rule_index for d in decisions if d.rule_index is not None)
        if (unit.shared or scope is not None) and site.blocker is None and len(unit.variants) > 1:
            decision = _shared_decision(policy, unit, decisions)
        # Dense or MoBA, and why, in the words the Hugging Face attention function uses too (moba_compile.decisions).
        decided = decide_site(
            policy,
            module=unit.module,
            layer=layer,
            form=site.form or FORM_NONE,
            blocker=site.blocker,
            decode=site.decode,
            len_k=site.static_len_k,
            decision=decision,
        )
        if decided.mode == "moba" and site.static_cache and policy.min_seq_len > 0:
            decided = decided.dense(reason("static_min_seq_len", min_seq_len=policy.min_seq_len))
        if decided.mode == "dense":
            record = decided.record(unit.module, layer, graph=graph_id)
            if site.blocker is None and site.static_cache:
                # A one-query step over a static cache's buffer, dense (not by anything about the call): the policy's
                # dense_decode (default "split_k") runs it on MoBA's split-K decode kernels with every earlier chunk,
                # as on the Hugging Face path, where they take its inputs; the report says which path runs.
                why_not = _split_k_blocker(site, policy, impl)
                if why_not is None:
                    if site.node not in split_k_converted:
                        _convert_static_dense_step(site, impl, replaced, step_lengths)
                        split_k_converted.add(site.node)
                    if site.owner is not None:
                        touched[id(site.owner)] = site.owner
                    how = "length read from the mask on the device"
                    records.append(replace(record, reason=f"{record.reason}; {reason('dense_split_k', how=how)}"))
                    if decided.by_policy:
                        kept_dense.append(decided.reason)
                    continue
                record = replace(record, reason=f"{record.reason}; {why_not}")
            if policy.dense_sdpa == "flash_when_causal" and site.blocker is None and site.attn_mask is not None:
                # A site the pass could have converted, kept dense: the policy asks for flash where its mask allows.
                why_not = None if site.node in dense_converted else _dense_flash_blocker(site, exported)
                if why_not is None and site.node not in converted:
                    if site.node not in dense_converted:
                        dense_converted[site.node] = _convert_dense(site, mask_checks, replaced, graph_id)
                    if site.owner is not None:
                        touched[id(site.owner)] = site.owner
                    note = reason("dense_flash")
                    record = replace(record, reason=f"{record.reason}; {note}", mask_tag=dense_converted[site.node])
                elif why_not is not None:
                    record = replace(record, reason=f"{record.reason}; {reason('dense_flash_not', why=why_not)}")
            records.append(record)
            if decided.by_policy:
                kept_dense.append(decided.reason)
            continue
        assert decided.chunk_size is not None and decided.topk is not None  # a MoBA decision has both
        if site.node not in converted:  # a shared subgraph's call is converted once for all its callers
            converted[site.node] = _convert(
                site, decided.chunk_size, decided.topk, policy, impl, mask_checks, replaced, graph_id, exported,
                routing=decided.routing or "head", step_lengths=step_lengths,
            )  # fmt: skip
        impl_note, tag = converted[site.node]
        if site.owner is not None:
            touched[id(site.owner)] = site.owner
        notes = []  # what only the pass knows, after the shared reason
        if layer_source != LAYER_FROM_PATH:
            notes.append(f"layer from the {layer_source}")
        if count_note is not None and (policy.dense_last or any(i < 0 for r in policy.rules for i in r.layers or ())):
            notes.append(f"layers counted: {count_note}")
        region = "/".join(p for p in (site.region or "").split("/") if p and p not in CONTEXT_REGIONS)
        if region:
            shared = f", shared by {len(site.calls)} callers" if len(site.calls) > 1 else ""
            notes.append(f"inside a subgraph of {region}{shared}")
        if site.autocast_dtype is not None:
            notes.append(f"inputs cast to {str(site.autocast_dtype).removeprefix('torch.')} as autocast does for SDPA")
        if site.saw_through_repeat:
            notes.append("repeat_kv seen through (key/value not repeated)")
        if site.static_cache:
            notes.append(reason("static_cache_step"))
        elif site.decode:
            # A compiled graph gets the cache as plain tensors, so nothing keeps the means between steps.
            notes.append(reason("means_from_keys"))
        records.append(decided.record(unit.module, layer, notes, graph=graph_id, impl=impl_note, mask_tag=tag))
    for owner in touched.values():
        owner.graph.lint()
        owner.recompile()
    unmatched = [policy.describe_rule(i) for i in range(len(policy.rules)) if i not in matched_rules]
    _check_policy_fit(policy, units, attention_layers, records, unmatched, kept_dense, scope, exported)
    return Report(sites=records, unmatched_rules=unmatched, policy_source=policy.source)


def _impl_note(impl: str, site: SdpaSite, chunk_size: int, topk: int) -> str:
    q, k, v = _meta(site.query), _meta(site.key), _meta(site.value)
    chosen, why = resolve_impl(impl, q, k, v, chunk_size, topk, _meta(site.attn_mask))
    return chosen if why in ("Triton kernels", f"impl={impl!r} requested") else f"{chosen} ({why})"


def _cast(graph: fx.Graph, tensor: fx.Node, dtype: torch.dtype, exported: bool) -> fx.Node:
    """``tensor.to(dtype)`` in the graph's own spelling: a method call in a Dynamo graph, an ATen op when exported."""
    if exported:
        return graph.call_function(torch.ops.aten._to_copy.default, (tensor,), {"dtype": dtype})
    return graph.call_method("to", (tensor, dtype))


def _export_meta(new: fx.Node, sdpa: fx.Node) -> None:
    """Give a node the pass inserted into an exported program what ``torch.export`` records on every node: ``val``
    (from the op's fake kernel, under the program's fake mode, so symbolic sizes stay symbolic), and the SDPA call's
    module stack and stack trace."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in sdpa.meta and key not in new.meta:
            new.meta[key] = sdpa.meta[key]
    if "val" in new.meta:
        return
    args, kwargs = fx.node.map_arg((new.args, new.kwargs), lambda arg: arg.meta["val"])
    fakes = [arg.meta["val"] for arg in new.all_input_nodes if isinstance(arg.meta.get("val"), torch.Tensor)]
    fake_mode = torch._guards.detect_fake_mode(fakes)
    if fake_mode is None:
        new.meta["val"] = new.target(*args, **kwargs)
        return
    with fake_mode:
        new.meta["val"] = new.target(*args, **kwargs)


def _drop_if_dead(node: object, graph: fx.Graph) -> None:
    """Erase a repeat_kv chain the rewrite left without users (only that chain: other dead code may be impure)."""
    while isinstance(node, fx.Node) and not node.users and node.op in ("call_method", "call_function"):
        parent = node.args[0] if node.args else None
        graph.erase_node(node)
        node = parent


def _replace_site(
    site: SdpaSite, out: fx.Node, labelled: tuple[fx.Node, ...], replaced: dict[fx.Node, fx.Node]
) -> None:
    """Put ``out`` in place of the site's SDPA node: module path on the ``labelled`` new nodes, Dynamo's example
    value on ``out``, every use rewired, the node erased and recorded in ``replaced`` (later sites of the graph read
    their arguments through it), and the ``repeat_kv`` chains the site saw through erased if nothing else reads them.
    """
    node = site.node
    graph = node.graph
    for new in labelled:
        new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    if "example_value" in node.meta:
        out.meta["example_value"] = node.meta["example_value"]
    node.replace_all_uses_with(out)
    replaced[node] = out
    graph.erase_node(node)
    if site.saw_through_repeat:
        _drop_if_dead(replaced.get(site.raw_key, site.raw_key), graph)
        _drop_if_dead(replaced.get(site.raw_value, site.raw_value), graph)


def _static_step_length(mask: Tensor, impl: str = "auto") -> Tensor:
    """The keys each batch row of a static cache holds, from the step's boolean mask (``[B or 1]``, on the device)."""
    return ops.static_length_from_mask(mask, mask.shape[0], impl=impl)


def _step_length(
    site: SdpaSite, attn_mask: fx.Node, impl: str, step_lengths: dict[tuple[fx.Node, str], fx.Node]
) -> fx.Node:
    """The graph's one length node of a static cache's step mask: inserted before the site when no earlier site of the
    graph made it (transformers shares the mask node across layers, so every layer's step reads it once between
    them; Inductor cannot merge the per-layer copies across the cache updates between the layers)."""
    length = step_lengths.get((attn_mask, impl))
    if length is None:
        with site.node.graph.inserting_before(site.node):
            length = site.node.graph.call_function(_static_step_length, (attn_mask, impl))
        step_lengths[(attn_mask, impl)] = length
    return length


def _split_k_blocker(site: SdpaSite, policy: Policy, impl: str) -> str | None:
    """None when the policy's ``dense_decode`` runs this dense static-cache step (one query, a boolean mask) on
    ``moba::dense_decode``'s split-K kernels; else the report's note on why it keeps its SDPA call. Decided on the
    site's fake tensors (the dtype an enclosing autocast gives SDPA), as the Hugging Face path decides on its inputs."""
    if policy.dense_decode == "sdpa":
        return reason("dense_decode_sdpa")
    q, k, v, mask = (_meta(n) for n in (site.query, site.key, site.value, site.attn_mask))
    if not all(isinstance(t, Tensor) for t in (q, k, v, mask)):
        why: str | None = "the step's inputs carry no example values"
    elif not all(isinstance(n, int) for n in (*q.shape, *k.shape, *v.shape, *mask.shape)):
        why = "symbolic shapes"
    else:
        if site.autocast_dtype is not None:
            # SDPA casts its inputs to the autocast dtype (the rewrite casts them too): judge tensors of that dtype
            # (fake tensors: the cast runs in their own fake mode, no data).
            q, k, v = (t if t.dtype == site.autocast_dtype else t.to(site.autocast_dtype) for t in (q, k, v))
        why = ops.split_k_unsupported_reason(q, k, v, mask, impl=impl)
    return None if why is None else reason("dense_split_k_not", why=why)


def _convert_static_step(
    site: SdpaSite,
    query: fx.Node,
    key: fx.Node,
    value: fx.Node,
    attn_mask: fx.Node,
    scale: object,
    chunk_size: int,
    topk: int,
    impl: str,
    replaced: dict[fx.Node, fx.Node],
    step_lengths: dict[tuple[fx.Node, str], fx.Node],
    routing: str = "head",
) -> str:
    """Replace a one-query SDPA call over a static KV cache's buffer by ``moba::static_decode`` (Dynamo graphs only).

    The step's length comes from its boolean mask on the device and the gate's means from the whole buffer
    (``ops.chunk_means``, the one means computation, so the scores are the prefill's): no host read and the same work
    at every length, so the step can be captured in a CUDA graph. Slots at or after the length are never selected or
    attended; the mask (padding) is intersected with the selection. Returns the impl the report shows.
    """
    node = site.node
    graph = node.graph
    with graph.inserting_before(node):
        query_in, key_in, value_in = query, key, value
        if site.autocast_dtype is not None:
            query_in, key_in, value_in = (
                _cast(graph, t, site.autocast_dtype, False) if _meta(t).dtype != site.autocast_dtype else t
                for t in (query, key, value)
            )
        length = _step_length(site, attn_mask, impl, step_lengths)
        means = graph.call_function(torch.ops.moba.chunk_means.default, (key_in, chunk_size, impl))
        out = graph.call_function(
            ops.static_decode,
            (query_in, key_in, value_in),
            {
                "chunk_means": means,
                "length": length,
                "chunk_size": chunk_size,
                "topk": topk,
                "scale": scale,
                "attn_mask": attn_mask,
                "impl": impl,
                "routing": routing,
            },
        )
    _replace_site(site, out, (out,), replaced)
    q, k, v = _meta(site.query), _meta(site.key), _meta(site.value)
    chosen, why = resolve_impl(impl, q, k, v, chunk_size, topk, None)
    note = chosen if why in ("Triton kernels", f"impl={impl!r} requested") else f"{chosen} ({why})"
    return f"{note}, static_decode"


def _convert_static_dense_step(
    site: SdpaSite,
    impl: str,
    replaced: dict[fx.Node, fx.Node],
    step_lengths: dict[tuple[fx.Node, str], fx.Node],
) -> None:
    """Replace a dense one-query SDPA call over a static KV cache's buffer by ``moba::dense_decode`` (the policy's
    ``dense_decode = "split_k"``; Dynamo graphs only): dense attention over the row's keys, the length read from the
    step's boolean mask on the device, the mask (padding) applied, so the step stays graph-safe and exact."""
    node = site.node
    graph = node.graph
    args = (site.query, site.key, site.value, site.attn_mask)
    query, key, value, attn_mask = (replaced.get(a, a) if isinstance(a, fx.Node) else a for a in args)
    with graph.inserting_before(node):
        if site.autocast_dtype is not None:
            query, key, value = (
                _cast(graph, t, site.autocast_dtype, False) if _meta(t).dtype != site.autocast_dtype else t
                for t in (query, key, value)
            )
        length = _step_length(site, attn_mask, impl, step_lengths)
        out = graph.call_function(
            ops.dense_decode,
            (query, key, value),
            {"length": length, "scale": site.scale, "attn_mask": attn_mask, "impl": impl},
        )
    _replace_site(site, out, (out,), replaced)


def _mask_check(
    site: SdpaSite,
    query: fx.Node,
    key: fx.Node,
    attn_mask: fx.Node,
    mask_checks: dict[tuple[fx.Node, str, str], fx.Node],
    graph_id: int,
    inserted: list[fx.Node],
) -> fx.Node:
    """The ``moba::analyse_mask`` node of the site's mask: the graph's one check per (mask, Lq, Lk), inserted before
    the site when no earlier site made it (``inserted`` gets it then). Its tag (``args[3]``) names it in reports."""
    # One run-time causality check per (mask, Lq, Lk): Hugging Face shares one mask node across all layers, so MoBA
    # and dense sites of one forward read it once between them.
    q, k = _meta(site.query), _meta(site.key)
    check_key = (attn_mask, str(q.shape[2]), str(k.shape[2]))
    mask_kind = mask_checks.get(check_key)
    if mask_kind is None:
        graph = site.node.graph
        new_tag = f"g{graph_id}:{attn_mask.name}:{len(mask_checks)}"
        with graph.inserting_before(site.node):
            mask_kind = graph.call_function(torch.ops.moba.analyse_mask.default, (attn_mask, query, key, new_tag))
        inserted.append(mask_kind)
        mask_checks[check_key] = mask_kind
    return mask_kind


def _autocast_inputs(
    site: SdpaSite, query: fx.Node, key: fx.Node, value: fx.Node, exported: bool, inserted: list[fx.Node]
) -> tuple[fx.Node, fx.Node, fx.Node]:
    """Query, key and value cast to the site's autocast dtype where SDPA would have cast them (a custom op is not
    autocast), else as given; casts inserted before the site go to ``inserted``."""
    if site.autocast_dtype is None:
        return query, key, value
    graph = site.node.graph
    with graph.inserting_before(site.node):
        cast = [
            _cast(graph, t, site.autocast_dtype, exported) if _meta(t).dtype != site.autocast_dtype else None
            for t in (query, key, value)
        ]
    inserted.extend(c for c in cast if c is not None)
    query, key, value = (t if c is None else c for t, c in zip((query, key, value), cast))
    return query, key, value


def _dense_flash_blocker(site: SdpaSite, exported: bool) -> str | None:
    """Why a dense site with a boolean mask cannot run ``moba::dense_attention``'s flash branch, or None when it can
    (at run time, where its mask proves exactly causal). Reads only static metadata: no guard on a symbolic length."""
    if exported:
        return "not in an exported program"
    if site.static_cache:
        # Its mask hides the buffer's unfilled slots (never exactly causal), and a run-time check would add a host
        # read to a step meant for CUDA-graph capture.
        return "a static KV cache step"
    if not isinstance(site.enable_gqa, bool):
        return "enable_gqa is not a constant"
    q, k, v = _meta(site.query), _meta(site.key), _meta(site.value)
    if not (statically_known_true(q.shape[2] == k.shape[2]) or statically_known_true(q.shape[2] == 1)):
        return "several queries over a longer KV cache: flash's is_causal is top-left aligned"
    if site.saw_through_repeat and not isinstance(_meta(site.raw_key).shape[1], int):
        return "the repeated key heads are symbolic"
    dtype = site.autocast_dtype or q.dtype
    return dense_ops.flash_kernel_unsupported_reason(q.device, dtype, (q.shape[-1], k.shape[-1], v.shape[-1]))


def _convert_dense(
    site: SdpaSite,
    mask_checks: dict[tuple[fx.Node, str, str], fx.Node],
    replaced: dict[fx.Node, fx.Node],
    graph_id: int,
) -> str:
    """Replace a dense site's masked SDPA call by ``moba::dense_attention`` (sharing the graph's mask check) and
    return the check's tag. Key/value go in unrepeated where the pass saw through ``repeat_kv`` (the op repeats them
    again for the masked call only). Dynamo graphs only (:func:`_dense_flash_blocker`)."""
    node = site.node
    graph = node.graph
    inserted: list[fx.Node] = []

    def current(arg: Any) -> Any:
        return replaced.get(arg, arg) if isinstance(arg, fx.Node) else arg

    query, key, value, attn_mask = (current(a) for a in (site.query, site.key, site.value, site.attn_mask))
    mask_kind = _mask_check(site, query, key, attn_mask, mask_checks, graph_id, inserted)
    query, key, value = _autocast_inputs(site, query, key, value, False, inserted)
    n_rep = _meta(site.raw_key).shape[1] // _meta(site.key).shape[1] if site.saw_through_repeat else 1
    args = (query, key, value, attn_mask, mask_kind, site.scale, n_rep, bool(site.enable_gqa))
    with graph.inserting_before(node):
        call = graph.call_function(torch.ops.moba.dense_attention.default, args)
        out = graph.call_function(operator.getitem, (call, 0))
    _replace_site(site, out, (call, out), replaced)
    return mask_kind.args[3]


def _convert(
    site: SdpaSite,
    chunk_size: int,
    topk: int,
    policy: Policy,
    impl: str,
    mask_checks: dict[tuple[fx.Node, str, str], fx.Node],
    replaced: dict[fx.Node, fx.Node],
    graph_id: int,
    exported: bool = False,
    routing: str = "head",
    step_lengths: dict[tuple[fx.Node, str], fx.Node] | None = None,
) -> tuple[str, str | None]:
    """Replace the site's SDPA call by ``moba::attention`` (and a shared mask check), with the decision's gate
    ``routing``; return the impl the report shows and the mask check's tag (None without a mask). In an exported
    program's graph (``exported``) every inserted node is an ATen or ``moba`` op with the metadata ``torch.export``
    gives its nodes."""
    node = site.node
    graph = node.graph
    inserted: list[fx.Node] = []

    def current(arg):
        # Sites were found before any rewrite: an argument that was an SDPA call converted since is its replacement.
        return replaced.get(arg, arg) if isinstance(arg, fx.Node) else arg

    args = (site.query, site.key, site.value, site.attn_mask, site.scale)
    query, key, value, attn_mask, scale = (current(a) for a in args)
    impl_note = _impl_note(impl, site, chunk_size, topk)
    if site.static_cache:
        lengths = {} if step_lengths is None else step_lengths
        note = _convert_static_step(
            site, query, key, value, attn_mask, scale, chunk_size, topk, impl, replaced, lengths, routing
        )
        return note, None
    mask_kind = None
    tag = None
    if attn_mask is not None:
        mask_kind = _mask_check(site, query, key, attn_mask, mask_checks, graph_id, inserted)
        tag = mask_kind.args[3]
    query, key, value = _autocast_inputs(site, query, key, value, exported, inserted)
    with graph.inserting_before(node):
        call = graph.call_function(
            torch.ops.moba.attention.default,
            # chunk_means None: a compiled graph keeps no means between steps; the op averages the keys.
            (query, key, value, attn_mask, mask_kind, chunk_size, topk, scale, policy.min_seq_len, impl, None, routing),
        )
        out = graph.call_function(operator.getitem, (call, 0))
    if exported:
        for new in (*inserted, call, out):
            _export_meta(new, node)
    _replace_site(site, out, (call, out), replaced)
    return impl_note, tag
