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
from ..policy import Policy
from ..report import Report, SiteRecord
from .sites import (
    FORM_CAUSAL,
    FORM_DECODE,
    FORM_MASK,
    SdpaSite,
    _meta,
    find_sdpa_sites,
    layer_from_path,
    module_layer_index,
)

__all__ = ["rewrite_sdpa"]

_graph_ids = itertools.count()

_FORM_NOTES = {
    FORM_CAUSAL: "is_causal self-attention",
    FORM_MASK: "boolean mask, checked for causality once per forward",
    FORM_DECODE: "attention over this layer's KV cache",
}


def _layers(sites: list[SdpaSite]) -> tuple[list[int | None], str]:
    from_paths = [layer_from_path(s.module) for s in sites]
    if sites and all(layer is not None for layer in from_paths):
        return from_paths, "module path"
    from_modules = [module_layer_index(s.node) for s in sites]
    if sites and all(layer is not None for layer in from_modules):
        return from_modules, "module's layer_idx"
    return [s.index for s in sites], "order of SDPA calls"


def _layer_independent(policy: Policy, site: SdpaSite, layer: int | None, num_layers: int | None, decision):
    """The decision for a graph that starts inside a layer, which Dynamo reuses for every layer of the same class.

    Such a graph sees module paths without a layer index; the layer it was traced for is known (``layer_idx``) but the
    same compiled graph will also run the other layers. A policy that treats layers alike is safe to apply; one that
    does not cannot be honoured: under the default policy the site stays dense, under an explicit one it is an error.
    """
    n = num_layers if num_layers is not None else (layer + 1 if layer is not None else 1)
    seen = {(d.mode, d.chunk_size, d.topk) for d in (policy.decide(site.module, i, n) for i in range(n))}
    if len(seen) == 1:
        return decision
    why = (
        f"this graph starts inside a layer (module path {site.module!r} has no layer index), and Dynamo reuses it "
        f"for every layer of the same class, but the policy treats layers 0..{n - 1} differently"
    )
    if policy.automatic:
        return replace(decision, mode="dense", reason=f"{why}: dense under the default policy")
    raise ValueError(
        f"{policy.source}: {why}. Compile the whole model in one graph, or compile each layer with its own backend "
        "(moba_compile.make_backend with that layer's policy)."
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


def rewrite_sdpa(gm: fx.GraphModule, policy: Policy, *, impl: str = "auto") -> Report:
    """Apply ``policy`` to every SDPA call of a Dynamo graph, in place, and report each decision.

    Args:
        gm: a Dynamo-level ``GraphModule``; it is modified in place and recompiled.
        policy: a validated :class:`moba_compile.policy.Policy`.
        impl: implementation the inserted ``moba::attention`` calls ask for (``"auto"``, ``"triton"``, ``"reference"``).

    Returns:
        A :class:`moba_compile.report.Report` with one record per SDPA call and the rules that matched none.

    Raises:
        RuntimeError: ``impl="triton"`` and a converted site's inputs cannot run on the Triton kernels.

    Example:
        >>> report = rewrite_sdpa(gm, load_policy(None))  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    graph_id = next(_graph_ids)
    sites = find_sdpa_sites(gm)
    layers, layer_source = _layers(sites)
    known = [layer for layer in layers if layer is not None]
    num_layers = policy.num_layers or (max(known) + 1 if known else None)
    matched_rules: set[int] = set()
    mask_checks: dict[tuple[str, str, str], fx.Node] = {}
    records: list[SiteRecord] = []
    for site, layer in zip(sites, layers):
        decision = policy.decide(site.module, layer, num_layers)
        if layer_source == "module's layer_idx":
            decision = _layer_independent(policy, site, layer, num_layers, decision)
        if decision.rule_index is not None:
            matched_rules.add(decision.rule_index)
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
        records.append(_convert(gm.graph, site, decision.chunk_size, decision.topk, policy, impl, mask_checks, base))
        last = records[-1]
        notes = [decision.reason, _FORM_NOTES[site.form]]
        if layer_source != "module path":
            notes.append(f"layer from the {layer_source}")
        if site.autocast_dtype is not None:
            notes.append(f"inputs cast to {str(site.autocast_dtype).removeprefix('torch.')} as autocast does for SDPA")
        if site.saw_through_repeat:
            notes.append("repeat_kv seen through (key/value not repeated)")
        if site.decode:
            # A compiled graph gets the cache as plain tensors, so nothing keeps the means between steps.
            notes.append("each step averages every cached key for the gate (moba_compile.hf.MobaCache avoids this)")
        if site.static_len_k is None and policy.min_seq_len > 0:
            notes.append(f"dense below min_seq_len {policy.min_seq_len} at run time")
        records[-1] = SiteRecord(**{**last.__dict__, "reason": "; ".join(notes)})
    gm.graph.lint()
    gm.recompile()
    unmatched = [policy.describe_rule(i) for i in range(len(policy.rules)) if i not in matched_rules]
    return Report(sites=records, unmatched_rules=unmatched, policy_source=policy.source)


def _convert(
    graph: fx.Graph,
    site: SdpaSite,
    chunk_size: int,
    topk: int,
    policy: Policy,
    impl: str,
    mask_checks: dict[tuple[str, str, str], fx.Node],
    base: dict,
) -> SiteRecord:
    node = site.node
    impl_note = _impl_note(impl, site, chunk_size, topk)
    mask_kind = None
    tag = None
    if site.attn_mask is not None:
        # One run-time causality check per (mask, Lq, Lk): Hugging Face shares one mask node across all layers.
        q, k = _meta(site.query), _meta(site.key)
        check_key = (site.attn_mask.name, str(q.shape[2]), str(k.shape[2]))
        mask_kind = mask_checks.get(check_key)
        if mask_kind is None:
            new_tag = f"g{base['graph']}:{site.attn_mask.name}:{len(mask_checks)}"
            with graph.inserting_before(node):
                mask_kind = graph.call_function(
                    torch.ops.moba.analyse_mask.default, (site.attn_mask, site.query, site.key, new_tag)
                )
            mask_checks[check_key] = mask_kind
        tag = mask_kind.args[3]
    old_key, old_value = node.kwargs.get("key", node.args[1]), node.kwargs.get("value", node.args[2])
    query, key, value = site.query, site.key, site.value
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
            (
                query,
                key,
                value,
                site.attn_mask,
                mask_kind,
                chunk_size,
                topk,
                site.scale,
                policy.min_seq_len,
                impl,
            ),
        )
        out = graph.call_function(operator.getitem, (call, 0))
    for new in (call, out):
        new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    if site.saw_through_repeat:
        _drop_if_dead(old_key, graph)
        _drop_if_dead(old_value, graph)
    return SiteRecord(
        decision="moba", chunk_size=chunk_size, topk=topk, reason="", impl=impl_note, mask_tag=tag, **base
    )
