"""Decide every SDPA site from the policy and replace the converted ones by ``moba::attention``.

Sites that are not converted are left untouched, so they keep dense SDPA bit for bit.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import replace

import torch
from torch import fx

from ..ops import resolve_impl
from ..policy import Decision, Policy, PolicyError
from ..report import Report, SiteRecord
from .identity import BlockScope
from .sites import (
    FORM_CAUSAL,
    FORM_DECODE,
    FORM_MASK,
    SdpaSite,
    _meta,
    find_sdpa_sites,
)

__all__ = ["rewrite_sdpa"]

_graph_ids = itertools.count()

_FORM_NOTES = {
    FORM_CAUSAL: "is_causal self-attention",
    FORM_MASK: "boolean mask, checked for causality once per forward",
    FORM_DECODE: "attention over this layer's KV cache",
}

LAYER_FROM_PATH = "module path"
LAYER_FROM_LAYER_IDX = "module's layer_idx"
LAYER_FROM_ORDER = "order of SDPA calls"


def _layers(sites: list[SdpaSite]) -> tuple[list[int | None], str]:
    """Every site's layer and where it came from: module paths, else ``layer_idx`` attributes, else call order."""
    from_paths = [s.placement.layer if s.placement else None for s in sites]
    if sites and all(layer is not None for layer in from_paths):
        return from_paths, LAYER_FROM_PATH
    from_modules = [s.placement.layer_idx if s.placement else None for s in sites]
    if sites and all(layer is not None for layer in from_modules):
        return from_modules, LAYER_FROM_LAYER_IDX
    return [s.index for s in sites], LAYER_FROM_ORDER


def _variants(site: SdpaSite, layer: int | None, source: str) -> tuple[tuple[str, int | None], ...]:
    """(module path, layer) of the site at every layer its placement knows of, itself first."""
    own = (site.module, layer)
    if source != LAYER_FROM_PATH or site.placement is None:
        return (own,)
    return (own, *(v for v in site.placement.variants if v != own))


def _attention_layers(
    sites: list[SdpaSite], layers: list[int | None], source: str, scope: BlockScope | None
) -> tuple[list[int], str | None]:
    """The attention layers the policy counts (``dense_last``, negative indices) and, when they are not just the
    layers of this graph's sites, why.

    When the graph shows every layer, the layers with an SDPA call are the attention layers (a hybrid model's others
    have none). A graph that shows only some layers (it starts inside a repeated layer, or graph breaks split the
    model) counts every layer of the container its sites belong to, each as one attention layer.
    """
    if scope is not None:
        return list(scope.attention_layers), "the layers compile_blocks was given"
    seen = sorted({layer for layer in layers if layer is not None})
    if source != LAYER_FROM_PATH:
        return seen, None
    partial = [s for s in sites if s.placement is not None and (s.placement.shared or s.placement.hidden)]
    if not partial:
        return seen, None
    every = sorted({v for s in partial for _, v in s.placement.variants if v is not None} | set(seen))
    hidden = sorted({h for s in partial for h in s.placement.hidden})
    if hidden:
        why = f"layers {_span(hidden)} are not in this graph (graph breaks); all {len(every)} layers counted"
    else:
        why = f"this graph serves {len(every)} layers"
    return every, why


def _span(layers: list[int]) -> str:
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))


def _shared_decision(
    policy: Policy, site: SdpaSite, decision: Decision, decisions: list[Decision], variants: tuple
) -> Decision:
    """The decision for a site whose graph serves several layers (``variants``), which must all be decided alike.

    Dynamo compiles one graph for a block class and reuses it for every block (modules are graph inputs): a graph
    that starts inside a layer (per-block ``compile``, a graph break in the layer loop) cannot hold a different
    decision per layer. A policy that treats those layers alike is applied; one that does not cannot be honoured:
    under the automatic policy the site stays dense, under an explicit one it is an error.
    """
    distinct = {(d.mode, d.chunk_size, d.topk) for d in decisions}
    layers = sorted({layer for _, layer in variants if layer is not None})
    served = f"layers {_span(layers)}" if layers else ", ".join(path for path, _ in variants)
    if len(distinct) == 1:
        return replace(decision, reason=f"{decision.reason}; this graph serves {served}, decided alike")
    differ = "; ".join(
        f"{path}: {d.mode}" + (f" C{d.chunk_size} K{d.topk}" if d.mode == "moba" else "")
        for (path, _), d in list(zip(variants, decisions))[:4]
    )
    why = (
        f"this graph starts inside a layer ({site.module!r}), and Dynamo reuses it for every layer of the same class "
        f"({served}), but the policy treats them differently ({differ}{'; ...' if len(variants) > 4 else ''})"
    )
    if policy.automatic:
        return replace(decision, mode="dense", reason=f"{why}: dense under the default policy")
    raise PolicyError(
        f"{policy.source}: {why}. Compile the whole model in one graph, or compile each block with its own decision: "
        "moba_compile.compile_blocks(model, policy)."
    )


def _impl_note(impl: str, site: SdpaSite, chunk_size: int, topk: int) -> str:
    q, k, v = _meta(site.query), _meta(site.key), _meta(site.value)
    chosen, why = resolve_impl(impl, q, k, v, chunk_size, topk, _meta(site.attn_mask))
    return chosen if why in ("Triton kernels", f"impl={impl!r} requested") else f"{chosen} ({why})"


def _drop_if_dead(node: object, graph: fx.Graph) -> None:
    """Erase a repeat_kv chain the rewrite left without users (only that chain: other dead code may be impure)."""
    while isinstance(node, fx.Node) and not node.users and node.op in ("call_method", "call_function"):
        parent = node.args[0] if node.args else None
        graph.erase_node(node)
        node = parent


def rewrite_sdpa(gm: fx.GraphModule, policy: Policy, *, impl: str = "auto", scope: BlockScope | None = None) -> Report:
    """Apply ``policy`` to every SDPA call of a Dynamo graph (and of its higher-order subgraphs), in place, and report
    each decision.

    Args:
        gm: a Dynamo-level ``GraphModule``; it is modified in place and recompiled.
        policy: a validated :class:`moba_compile.policy.Policy`.
        impl: implementation the inserted ``moba::attention`` calls ask for (``"auto"``, ``"triton"``, ``"reference"``).
        scope: the blocks a :func:`moba_compile.compile_blocks` backend serves (names and layers of its graphs), or
            None.

    Returns:
        A :class:`moba_compile.report.Report` with one record per SDPA call and the rules that matched none.

    Raises:
        RuntimeError: ``impl="triton"`` and a converted site's inputs cannot run on the Triton kernels.
        moba_compile.PolicyError: the graph serves several layers (it starts inside a repeated layer) that an explicit
            policy decides differently.

    Example:
        >>> report = rewrite_sdpa(gm, load_policy(None))  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    graph_id = next(_graph_ids)
    sites = find_sdpa_sites(gm, scope)
    layers, layer_source = _layers(sites)
    attention_layers, count_note = _attention_layers(sites, layers, layer_source, scope)
    num_layers = len(attention_layers) or None
    matched_rules: set[int] = set()
    mask_checks: dict[tuple[fx.Node, str, str], fx.Node] = {}
    replaced: dict[fx.Node, fx.Node] = {}  # converted SDPA node -> its replacement (a later site may consume it)
    touched: dict[int, fx.GraphModule] = {id(gm): gm}
    records: list[SiteRecord] = []
    for site, layer in zip(sites, layers):
        variants = _variants(site, layer, layer_source)
        decisions = [policy.decide(path, at, num_layers, attention_layers) for path, at in variants]
        decision = decisions[0]
        matched_rules.update(d.rule_index for d in decisions if d.rule_index is not None)
        shared = scope is not None or (site.placement is not None and site.placement.shared)
        if shared and site.blocker is None and len(variants) > 1:
            decision = _shared_decision(policy, site, decision, decisions, variants)
        base = dict(module=site.module, layer=layer, graph=graph_id, form=site.form or "-")
        if site.blocker is not None:
            records.append(SiteRecord(decision="dense", chunk_size=None, topk=None, reason=site.blocker, **base))
            continue
        if decision.mode == "dense":
            records.append(SiteRecord(decision="dense", chunk_size=None, topk=None, reason=decision.reason, **base))
            continue
        if site.decode and policy.decode == "dense":
            reason = "decode/chunked prefill over the KV cache, and the policy has decode = 'dense'"
            records.append(SiteRecord(decision="dense", chunk_size=None, topk=None, reason=reason, **base))
            continue
        if site.static_len_k is not None and site.static_len_k < policy.min_seq_len:
            reason = f"key length {site.static_len_k} < min_seq_len {policy.min_seq_len}"
            records.append(SiteRecord(decision="dense", chunk_size=None, topk=None, reason=reason, **base))
            continue
        record = _convert(site, decision.chunk_size, decision.topk, policy, impl, mask_checks, replaced, base)
        if site.owner is not None:
            touched[id(site.owner)] = site.owner
        notes = [decision.reason, _FORM_NOTES[site.form]]
        if layer_source != LAYER_FROM_PATH:
            notes.append(f"layer from the {layer_source}")
        if count_note is not None and (policy.dense_last or any(i < 0 for r in policy.rules for i in r.layers or ())):
            notes.append(f"layers counted: {count_note}")
        if site.region is not None:
            notes.append(f"inside a {site.region} subgraph")
        if site.autocast_dtype is not None:
            notes.append(f"inputs cast to {str(site.autocast_dtype).removeprefix('torch.')} as autocast does for SDPA")
        if site.saw_through_repeat:
            notes.append("repeat_kv seen through (key/value not repeated)")
        if site.decode:
            # A compiled graph gets the cache as plain tensors, so nothing keeps the means between steps.
            notes.append("each step averages every cached key for the gate (moba_compile.hf.MobaCache avoids this)")
        if site.static_len_k is None and policy.min_seq_len > 0:
            notes.append(f"dense below min_seq_len {policy.min_seq_len} at run time")
        records.append(replace(record, reason="; ".join(notes)))
    for owner in touched.values():
        owner.graph.lint()
        owner.recompile()
    unmatched = [policy.describe_rule(i) for i in range(len(policy.rules)) if i not in matched_rules]
    return Report(sites=records, unmatched_rules=unmatched, policy_source=policy.source)


def _convert(
    site: SdpaSite,
    chunk_size: int,
    topk: int,
    policy: Policy,
    impl: str,
    mask_checks: dict[tuple[fx.Node, str, str], fx.Node],
    replaced: dict[fx.Node, fx.Node],
    base: dict,
) -> SiteRecord:
    node = site.node
    graph = node.graph

    def current(arg):
        # Sites were found before any rewrite: an argument that was an SDPA call converted since is its replacement.
        return replaced.get(arg, arg) if isinstance(arg, fx.Node) else arg

    args = (site.query, site.key, site.value, site.attn_mask, site.scale)
    query, key, value, attn_mask, scale = (current(a) for a in args)
    impl_note = _impl_note(impl, site, chunk_size, topk)
    mask_kind = None
    tag = None
    if attn_mask is not None:
        # One run-time causality check per (mask, Lq, Lk): Hugging Face shares one mask node across all layers.
        q, k = _meta(site.query), _meta(site.key)
        check_key = (attn_mask, str(q.shape[2]), str(k.shape[2]))
        mask_kind = mask_checks.get(check_key)
        if mask_kind is None:
            new_tag = f"g{base['graph']}:{attn_mask.name}:{len(mask_checks)}"
            with graph.inserting_before(node):
                mask_kind = graph.call_function(torch.ops.moba.analyse_mask.default, (attn_mask, query, key, new_tag))
            mask_checks[check_key] = mask_kind
        tag = mask_kind.args[3]
    if site.autocast_dtype is not None:
        # SDPA under autocast runs in the autocast dtype; a custom op is not autocast, so cast as SDPA would.
        with graph.inserting_before(node):
            query, key, value = (
                graph.call_method("to", (t, site.autocast_dtype)) if _meta(t).dtype != site.autocast_dtype else t
                for t in (query, key, value)
            )
    with graph.inserting_before(node):
        call = graph.call_function(
            torch.ops.moba.attention.default,
            (query, key, value, attn_mask, mask_kind, chunk_size, topk, scale, policy.min_seq_len, impl),
        )
        out = graph.call_function(operator.getitem, (call, 0))
    for new in (call, out):
        new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    if "example_value" in node.meta:
        out.meta["example_value"] = node.meta["example_value"]
    node.replace_all_uses_with(out)
    replaced[node] = out
    graph.erase_node(node)
    if site.saw_through_repeat:
        _drop_if_dead(current(site.raw_key), graph)
        _drop_if_dead(current(site.raw_value), graph)
    return SiteRecord(
        decision="moba", chunk_size=chunk_size, topk=topk, reason="", impl=impl_note, mask_tag=tag, **base
    )
