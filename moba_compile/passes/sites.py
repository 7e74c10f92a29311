"""Find the SDPA calls of an FX graph, normalise their arguments, and classify each one.

Two kinds of graph: a Dynamo graph (the ``moba`` backend: Python-level calls, ``example_value`` fake tensors,
``nn_module_stack`` keyed by live module ids) and the graph of a ``torch.export`` program (ATen ops such as
``aten.scaled_dot_product_attention.default``, ``val`` fake tensors, ``nn_module_stack`` holding each module's fully
qualified name). Both spellings of every idiom are recognised here, and both kinds of graph are classified by the same
code; only where the module path comes from differs (:func:`~moba_compile.passes.identity.place_exported`).

A site is classified without specialising symbolic sizes: equalities are asked of the shape environment with
``statically_known_true``, never by ``int()`` on a SymInt, so one compile under ``mark_dynamic`` (or one export with
``torch.export.Dim``) serves every length.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..decisions import reason
from ..report import FORM_CAUSAL, FORM_DECODE, FORM_MASK, Form
from .identity import BlockScope, Placement, layer_from_path, place_exported, place_nodes

__all__ = [
    "CONTEXT_REGIONS",
    "REWRITABLE_REGIONS",
    "SDPA_TARGETS",
    "SdpaSite",
    "find_sdpa_sites",
    "is_exported_graph",
    "layer_from_path",
    "module_path",
]

# Every spelling of SDPA a Dynamo graph can hold: the functional API, its C binding, and the ATen op called directly
# (torch.ops.aten.scaled_dot_product_attention[.default]); all take the same arguments in the same order.
SDPA_TARGETS = (
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten.scaled_dot_product_attention,
)
# torch's own attention modules reach a Dynamo graph as one call that holds the projections, the masks and the
# attention together (nn.MultiheadAttention, and the fused eval-mode paths of nn.MultiheadAttention and
# nn.TransformerEncoderLayer): the pass cannot rewrite what is inside, so each is a site that stays dense, with why.
OPAQUE_ATTENTION_TARGETS = {
    F.multi_head_attention_forward: "torch.nn.MultiheadAttention (F.multi_head_attention_forward",
    torch._native_multi_head_attention: "torch.nn.MultiheadAttention's fused eval path (_native_multi_head_attention",
    torch._transformer_encoder_layer_fwd: "torch.nn.TransformerEncoderLayer's fused eval path "
    "(_transformer_encoder_layer_fwd",
}
_OPAQUE_REASON = (
    "{what}, one call holding projections, masks and attention): not rewritten, so dense; for MoBA, call "
    "F.scaled_dot_product_attention(q, k, v, is_causal=True) in the model"
)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

# Forms a convertible site can take (spec section 3): the values SiteRecord.form reports, shared with the Hugging Face
# attention function (report.FORMS documents them). A site over this layer's KV cache is FORM_DECODE, with or without
# a mask.

# Higher-order ops whose subgraphs are plain forward code run once per call (or per branch), so an SDPA call inside can
# become moba::attention like one outside: activation checkpointing (tag_activation_checkpoint), wrap, nested compile
# regions (invoke_subgraph) and torch.cond branches; in exported programs also the regions torch.export makes of
# ``torch.no_grad()``/``torch.enable_grad()`` and ``torch.autocast`` blocks inside the model
# (wrap_with_set_grad_enabled, wrap_with_autocast: the autocast dtype is applied as for an autocast region of a Dynamo
# graph). Others
# (autograd_function_apply, whose backward the user wrote for dense attention; loops; maps) keep their SDPA dense with
# the reason.
REWRITABLE_REGIONS = (
    "tag_activation_checkpoint",
    "wrap",
    "invoke_subgraph",
    "cond",
    "wrap_with_set_grad_enabled",
    "wrap_with_autocast",
)
# The regions torch.export makes of a context manager in the model's code: no subgraph in the code the user wrote, so
# the report does not name them (a Dynamo graph marks the same blocks with enter/exit nodes).
CONTEXT_REGIONS = ("wrap_with_set_grad_enabled", "wrap_with_autocast")


@dataclass
class SdpaSite:
    """One SDPA call: its normalised arguments and whether (and in which form) it can become MoBA."""

    node: fx.Node
    index: int  # order among the graph's SDPA calls
    module: str  # module path (see Placement.module), "" when the graph carries none
    query: fx.Node | None  # None for an opaque attention-module call (OPAQUE_ATTENTION_TARGETS)
    key: fx.Node | None  # seen through repeat_kv where possible
    value: fx.Node | None
    attn_mask: fx.Node | None
    scale: float | fx.Node | None  # a Node: a traced float, passed to the op at run time
    form: Form | None  # FORM_CAUSAL / FORM_MASK / FORM_DECODE when convertible
    blocker: str | None  # why it cannot be MoBA (None when convertible)
    saw_through_repeat: bool = False
    static_len_k: int | None = None  # Lk when it is a plain int
    decode: bool = False  # Lq may be shorter than Lk (KV cache)
    static_cache: bool = False  # a decode step over a static KV cache's whole buffer (moba::static_decode)
    autocast_dtype: torch.dtype | None = None  # SDPA runs in this dtype (an enclosing autocast region)
    placement: Placement | None = None  # module objects, layer and the layers the graph serves
    raw_key: object = None  # the key/value arguments as written (before seeing through repeat_kv)
    raw_value: object = None
    enable_gqa: object = False  # the call's enable_gqa as written (a dense site's masked call keeps it)
    owner: fx.GraphModule | None = field(default=None, repr=False)  # the (sub)graph module holding the call
    region: str | None = None  # the higher-order op whose subgraph holds the call ("tag_activation_checkpoint", ...)
    calls: tuple[fx.Node, ...] = ()  # the higher-order calls that run ``owner`` (several for a shared subgraph)


def _meta(node: object):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def is_exported_graph(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is the graph of a ``torch.export`` program (or its ``module()``), not a Dynamo graph.

    Dynamo records an ``example_value`` on its nodes (placeholders included); an exported program records ``val``
    only.
    """
    return not any("example_value" in node.meta for node in gm.graph.nodes)


def _aten(node: object, *names: str) -> bool:
    """Whether ``node`` calls one of the ATen ops ``names`` (any overload): how an exported program spells a call."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return False
    target = node.target
    return (
        isinstance(target, torch._ops.OpOverload)
        and target.namespace == "aten"
        and target.overloadpacket.__name__ in names
    )


def _target_name(node: fx.Node) -> object:
    """A call's name without its overload (``index_copy_`` for ``aten.index_copy_.default``, a method's name)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", target)


def _through_full_slices(node: object) -> object:
    """``node`` seen through ATen slices that keep every element (``x[:, :]`` in an exported program)."""
    while _aten(node, "slice"):
        args = list(node.args) + [0, None, None, 1][len(node.args) - 1 :]
        _, _, start, end, step = args[:5]
        if start not in (None, 0) or step != 1 or not (end is None or (isinstance(end, int) and end >= 2**62)):
            break
        node = node.args[0]
    return node


def module_path(node: fx.Node) -> str:
    """The dotted module path of a node (``model.layers.7.self_attn``) relative to the compiled root; "" if none.

    Read from the module objects that ``nn_module_stack`` records (see :mod:`moba_compile.passes.identity`), so it
    does not depend on how Dynamo spells the root (``L['self']``, ``L['args'][0]``, ``G['model']``, ...).

    Example:
        >>> module_path(node)  # doctest: +SKIP
        'model.layers.7.self_attn'
    """
    return place_nodes([node], set())[0].module


def _normalise(node: fx.Node) -> dict[str, object]:
    """SDPA's arguments by name, whatever mix of positional and keyword arguments the call used."""
    bound = dict(_SDPA_DEFAULTS)
    for name, arg in zip(_SDPA_PARAMS, node.args):
        bound[name] = arg
    bound.update(node.kwargs)
    return bound


def _is_repeat_kv(node: fx.Node) -> fx.Node | None:
    """The unrepeated key/value behind ``x[:, :, None].expand(B, H, n, L, D).reshape(B, H * n, L, D)`` or
    ``x.repeat_interleave(n, dim=1)``; None when ``node`` is neither."""
    aten_reshape = _aten(node, "reshape", "view", "_unsafe_view")
    if (
        node.op == "call_method"
        and node.target in ("reshape", "view")
        or (node.op == "call_function" and node.target is torch.reshape)
        or aten_reshape
    ):
        expand = node.args[0]
        if aten_reshape and _aten(expand, "clone"):  # reshape of a non-viewable tensor, decomposed: copy, then view
            expand = expand.args[0]
        if not (
            isinstance(expand, fx.Node)
            and (expand.op == "call_method" and expand.target == "expand" or _aten(expand, "expand"))
        ):
            return None
        unsq = _through_full_slices(expand.args[0])
        if not isinstance(unsq, fx.Node):
            return None
        src = None
        if _aten(unsq, "unsqueeze") and unsq.args[1:] == (2,):  # x[:, :, None] in an exported program
            src = _through_full_slices(unsq.args[0])
        elif unsq.op == "call_function" and unsq.target is operator.getitem:
            idx = unsq.args[1]
            if (
                isinstance(idx, tuple)
                and len(idx) >= 3
                and idx[2] is None
                and all(isinstance(i, slice) and i == slice(None) for i in idx[:2])
                and all(isinstance(i, slice) and i == slice(None) for i in idx[3:])
            ):
                src = unsq.args[0]
        elif unsq.op == "call_method" and unsq.target == "unsqueeze" and unsq.args[1:] == (2,):
            src = unsq.args[0]
        if not isinstance(src, fx.Node):
            return None
        s, e, r = _meta(src), _meta(expand), _meta(node)
        if s is None or e is None or r is None or s.dim() != 4 or e.dim() != 5 or r.dim() != 4:
            return None
        same = [
            statically_known_true(e.shape[0] == s.shape[0]),
            statically_known_true(e.shape[1] == s.shape[1]),
            statically_known_true(e.shape[3] == s.shape[2]),
            statically_known_true(e.shape[4] == s.shape[3]),
            statically_known_true(r.shape[1] == s.shape[1] * e.shape[2]),
            statically_known_true(r.shape[2] == s.shape[2]),
        ]
        return src if all(same) else None
    if node.target in ("repeat_interleave", torch.repeat_interleave) or _aten(node, "repeat_interleave"):
        src = node.args[0]
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        if isinstance(src, fx.Node) and dim in (1, -3) and isinstance(reps, int):
            return src
    return None


def _cached_keys_of_layer(key: fx.Node, sdpa: fx.Node) -> bool:
    """True when ``key`` is ``torch.cat([cache, new], dim=-2)`` and ``new`` was computed in the SDPA call's module."""
    if not (key.op == "call_function" and key.target is torch.cat or _aten(key, "cat")):
        return False
    parts = key.args[0]
    dim = key.kwargs.get("dim", key.args[1] if len(key.args) > 1 else 0)
    if not isinstance(parts, (list, tuple)) or len(parts) < 2 or dim not in (2, -2):
        return False
    new = parts[-1]
    if not isinstance(new, fx.Node):
        return False
    new_stack, sdpa_stack = new.meta.get("nn_module_stack"), sdpa.meta.get("nn_module_stack")
    if not (new_stack and sdpa_stack):
        return False  # without module records there is no telling whose keys these are
    # Dynamo keys the records by module id (torch.export by name): the new keys were computed inside the module that
    # calls SDPA.
    return list(sdpa_stack)[-1] in new_stack


def _static_cache_buffer(key: fx.Node) -> bool:
    """True when ``key`` is written in place by ``index_copy_`` in this graph: a static KV cache's fixed buffer
    (transformers' ``StaticCache`` writes the new keys at ``cache_position`` into ``max_cache_len`` slots), whose
    filled length is a run-time value, so it cannot be read as the key sequence."""
    return any(
        user.op in ("call_method", "call_function")
        and _target_name(user) in ("index_copy_", "index_put_", "copy_")
        and user.args
        and user.args[0] is key
        for user in key.users
    )


def _is_float_node(value: object) -> bool:
    """A graph value that is a Python float at run time: under ``dynamic=True`` Dynamo may trace a float attribute
    (``module.scaling``) as a graph input, a ``SymFloat``, instead of baking it in."""
    if not isinstance(value, fx.Node):
        return False
    example = value.meta.get("example_value", value.meta.get("val"))
    return isinstance(example, (float, torch.SymFloat))


def _static_step_blocker(bound: dict[str, object], q, mask_meta, exported: bool) -> str | None:
    """Why an SDPA call over a static KV cache buffer cannot run ``moba::static_decode``, or None.

    The step's length is read from its boolean mask on the device (``ops.static_length_from_mask``): one query per
    step (several would need the graph-safe reference, ``O(Lq * slots)``: a prefill into the buffer stays dense), a
    boolean mask, and a Dynamo graph (the length helper is Python, not an ATen op an exported program could hold).
    """
    if exported:
        return "not in an exported program"
    if bound["attn_mask"] is None or mask_meta is None or mask_meta.dtype != torch.bool:
        return "this call has no boolean mask to read the length from"
    if bound["is_causal"]:
        return "this call also sets is_causal"
    if not statically_known_true(q.shape[2] == 1):
        return f"this call has {q.shape[2]} queries"
    return None


def _classify(
    bound: dict[str, object],
    sdpa: fx.Node,
    q,
    k,
    v,
    mask_meta,
    key_source: object,
    autocast: torch.dtype | None,
    exported: bool = False,
) -> tuple[Form | None, str | None, bool]:
    """(form, blocker, decode) for normalised SDPA arguments, their fake tensors, the unrepeated key node, the
    dtype an enclosing autocast region gives SDPA (None outside autocast), and whether the graph is exported."""
    dropout = bound["dropout_p"]
    if not (isinstance(dropout, (int, float)) and dropout == 0):
        return None, reason("dropout", p=dropout), False
    if not isinstance(bound["is_causal"], bool):
        return None, "is_causal is not a constant", False
    scale = bound["scale"]
    if scale is not None and not isinstance(scale, (int, float)) and not _is_float_node(scale):
        return None, f"scale is neither a number nor a traced float ({type(scale).__name__})", False
    if q is None or k is None or v is None or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None, "inputs are not 4-D [B, H, L, D] tensors", False
    if not isinstance(q.shape[-1], int):
        return None, "head dim is symbolic", False
    floating = q.is_floating_point() and k.is_floating_point() and v.is_floating_point()
    # Under autocast SDPA casts its inputs to the autocast dtype, so mixed dtypes are fine there (the rewrite casts).
    if not floating or (autocast is None and not q.dtype == k.dtype == v.dtype):
        return None, f"dtypes {q.dtype}/{k.dtype}/{v.dtype} are not one floating dtype", False
    hq, hkv = q.shape[1], k.shape[1]
    if not statically_known_true(hq % hkv == 0):
        return None, reason("heads", hq=hq, hkv=hkv), False
    if not statically_known_true(hq == hkv) and not bound["enable_gqa"]:
        return None, f"query heads {hq} != key heads {hkv} without enable_gqa", False
    same_len = statically_known_true(q.shape[2] == k.shape[2])
    if isinstance(key_source, fx.Node) and _static_cache_buffer(key_source):
        why = _static_step_blocker(bound, q, mask_meta, exported)
        if why is not None:
            return None, reason("static_cache_buffer", why=why), False
        return FORM_DECODE, None, True
    cached = isinstance(key_source, fx.Node) and _cached_keys_of_layer(key_source, sdpa)
    mask = bound["attn_mask"]
    if mask is not None:
        if mask_meta is None or mask_meta.dtype != torch.bool:
            dtype = None if mask_meta is None else mask_meta.dtype
            return None, reason("float_mask", dtype=dtype), False
        if bound["is_causal"]:
            return None, "both attn_mask and is_causal given", False
        if same_len:
            return FORM_MASK, None, False
        if cached:
            return FORM_DECODE, None, True
        return None, "mask with Lq != Lk and keys not from this layer's KV cache (cross-attention)", False
    if bound["is_causal"]:
        if same_len:
            return FORM_CAUSAL, None, False
        return None, "is_causal=True with Lq != Lk is top-left aligned, not MoBA's causality", False
    if cached:
        if statically_known_true(q.shape[2] == 1):
            return FORM_DECODE, None, not same_len
        # Without a mask, SDPA lets every new query see every new key: bottom-right causality would change the result.
        return None, "non-causal attention over the KV cache with several queries (no mask, is_causal=False)", False
    if same_len:
        return None, reason("non_causal", how="no mask, is_causal=False: encoder-style"), False
    return None, "non-causal attention with Lq != Lk and keys not from a KV cache (cross-attention)", False


def _autocast_dtype(
    regions: list[tuple[fx.Node, str, torch.dtype | None]], q, exported: bool = False
) -> torch.dtype | None:
    """The dtype the innermost autocast region for ``q``'s device gives SDPA, or None (no region, or disabled).

    An exported program holds every autocast region it runs under; only a Dynamo graph can run under an autocast
    entered outside it.
    """
    if q is None:
        return None
    for _, device_type, dtype in reversed(regions):
        if device_type == q.device.type:
            return dtype
    if exported:
        return None
    # No region in the graph: autocast entered around the compiled call is global state, which Dynamo guards on.
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


@dataclass
class _Found:
    node: fx.Node
    owner: fx.GraphModule
    autocast: list[tuple[fx.Node, str, torch.dtype | None]]
    region: str | None
    calls: list[fx.Node]


def _region_name(node: fx.Node) -> str | None:
    """The name of the higher-order op a node calls (``"cond"``, ``"invoke_subgraph"``, ...), else None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    return node.target.name()


def _subgraphs(owner: fx.GraphModule, node: fx.Node) -> Iterator[fx.GraphModule]:
    """The graph modules a higher-order call runs: its ``get_attr`` arguments that name a ``GraphModule``."""
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            sub = getattr(owner, str(arg.target), None)
            if isinstance(sub, fx.GraphModule):
                yield sub


def _walk(
    gm: fx.GraphModule,
    autocast: list[tuple[fx.Node, str, torch.dtype | None]],
    region: str | None,
    calls: list[fx.Node],
    found: list[_Found],
    seen: dict[int, list[_Found]],
    module_ids: set[int],
) -> None:
    """Collect the SDPA calls of ``gm`` and of the subgraphs its higher-order calls run, in the order they run.

    ``calls`` are the higher-order call nodes that run ``gm`` (empty for the top graph).
    """
    autocast = list(autocast)  # open regions: (enter node, device type, dtype); a subgraph inherits its caller's
    for node in gm.graph.nodes:
        for key in node.meta.get("nn_module_stack") or {}:
            try:
                module_ids.add(int(key))
            except (TypeError, ValueError):
                pass
        if node.op == "call_function" and node.target is torch.amp.autocast_mode._enter_autocast:
            device_type, dtype, enabled = (list(node.args) + [None, None, True])[:3]
            autocast.append((node, device_type, dtype if enabled else None))
            continue
        if node.op == "call_function" and node.target is torch.amp.autocast_mode._exit_autocast:
            autocast = [open_region for open_region in autocast if open_region[0] is not node.args[0]]
            continue
        name = _region_name(node)
        if name is not None:
            inner_autocast = autocast
            if name == "wrap_with_autocast":  # torch.export's autocast region: (device_type, dtype, enabled, ...)
                device_type, dtype, enabled = (list(node.args) + [None, None, True])[:3]
                if device_type is not None and dtype is None:
                    dtype = torch.get_autocast_dtype(device_type)
                inner_autocast = [*autocast, (node, device_type, dtype if enabled else None)]
            for sub in _subgraphs(gm, node):
                if id(sub) in seen:  # a shared subgraph (nested compile region invoked again): one more caller
                    for entry in seen[id(sub)]:
                        entry.calls.append(node)
                    continue
                before = len(found)
                inner = name if region is None else f"{region}/{name}"
                _walk(sub, inner_autocast, inner, [node], found, seen, module_ids)
                seen[id(sub)] = [entry for entry in found[before:] if entry.owner is sub]
            continue
        if node.op == "call_function" and (node.target in SDPA_TARGETS or node.target in OPAQUE_ATTENTION_TARGETS):
            found.append(_Found(node, gm, list(autocast), region, list(calls)))


def _opaque_site(node: fx.Node, index: int, placement, reason: str, entry: _Found) -> SdpaSite:
    """A site for one of torch's attention-module calls: recorded (dense, with ``reason``), never rewritten."""
    return SdpaSite(
        node=node,
        index=index,
        module=placement.module,
        query=None,
        key=None,
        value=None,
        attn_mask=None,
        scale=None,
        form=None,
        blocker=reason,
        placement=placement,
        owner=entry.owner,
        region=entry.region,
        calls=tuple(entry.calls),
    )


def find_sdpa_sites(
    gm: fx.GraphModule, scope: BlockScope | None = None, *, exported: bool | None = None
) -> list[SdpaSite]:
    """Every ``scaled_dot_product_attention`` call in a Dynamo graph or an exported program's graph, in the order they
    run, normalised and classified.

    Calls inside the subgraphs of higher-order ops (activation checkpointing, nested compile regions, ``torch.cond``
    branches, ...) are included; a subgraph several calls share is visited once (``SdpaSite.calls`` lists its callers).

    Args:
        gm: a Dynamo-level ``GraphModule`` (nodes carry ``example_value`` fake tensors and ``nn_module_stack``), or
            the graph module of a ``torch.export`` program (``val`` fake tensors, ``nn_module_stack`` by name).
        scope: the blocks of a :func:`moba_compile.compile_blocks` backend, which name the sites; None otherwise.
        exported: whether ``gm`` is an exported program's graph (module paths from the names ``torch.export``
            records, no live modules); None: :func:`is_exported_graph` tells.

    Returns:
        One :class:`SdpaSite` per call. ``form`` is set for convertible calls (causal self-attention, a boolean mask to
        be checked at run time, or attention over this layer's KV cache); otherwise ``blocker`` says why not.
        ``placement`` holds the module path, the layer and the layers the graph serves.

    Example:
        >>> sites = find_sdpa_sites(gm)  # doctest: +SKIP
        >>> [(s.module, s.form or s.blocker) for s in sites]  # doctest: +SKIP
    """
    if exported is None:
        exported = is_exported_graph(gm)
    found: list[_Found] = []
    module_ids: set[int] = set()
    _walk(gm, [], None, [], found, {}, module_ids)
    if exported:
        placements = place_exported([f.node for f in found])
    else:
        placements = place_nodes([f.node for f in found], module_ids, scope) if found else []
    sites: list[SdpaSite] = []
    for entry, placement in zip(found, placements):
        node = entry.node
        if node.target in OPAQUE_ATTENTION_TARGETS:
            reason = _OPAQUE_REASON.format(what=OPAQUE_ATTENTION_TARGETS[node.target])
            sites.append(_opaque_site(node, len(sites), placement, reason, entry))
            continue
        bound = _normalise(node)
        query, key, value = bound["query"], bound["key"], bound["value"]
        q, k, v = _meta(query), _meta(key), _meta(value)
        mask = bound["attn_mask"] if isinstance(bound["attn_mask"], fx.Node) else None
        mask_meta = _meta(mask)
        src_k = _is_repeat_kv(key) if isinstance(key, fx.Node) else None
        src_v = _is_repeat_kv(value) if isinstance(value, fx.Node) else None
        saw = src_k is not None and src_v is not None
        cast = _autocast_dtype(entry.autocast, q, exported)
        if entry.region is not None and any(part not in REWRITABLE_REGIONS for part in entry.region.split("/")):
            blocked = next(part for part in entry.region.split("/") if part not in REWRITABLE_REGIONS)
            blocker = f"inside a subgraph of torch.ops.higher_order.{blocked}, which the pass does not rewrite"
            form, decode = None, False
        elif bound["attn_mask"] is not None and mask is None:
            form, blocker, decode = None, "attn_mask is not a tensor", False
        else:
            form, blocker, decode = _classify(bound, node, q, k, v, mask_meta, src_k if saw else key, cast, exported)
        key_node = src_k if saw else key
        static = form is not None and isinstance(key_node, fx.Node) and _static_cache_buffer(key_node)
        scale = bound["scale"]
        if form is not None and scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        len_k = k.shape[2] if k is not None else None
        sites.append(
            SdpaSite(
                node=node,
                index=len(sites),
                module=placement.module,
                query=query,
                key=src_k if saw else key,
                value=src_v if saw else value,
                attn_mask=mask,
                scale=scale if scale is None or isinstance(scale, fx.Node) else float(scale),
                form=form,
                blocker=blocker,
                saw_through_repeat=saw,
                static_len_k=len_k if isinstance(len_k, int) else None,
                decode=decode,
                static_cache=static,
                autocast_dtype=cast,
                placement=placement,
                raw_key=key,
                raw_value=value,
                enable_gqa=bound["enable_gqa"],
                owner=entry.owner,
                region=entry.region,
                calls=tuple(entry.calls),
            )
        )
    return sites
