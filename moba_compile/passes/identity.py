"""Who an SDPA call belongs to: its module path and layer, derived from the module objects.

Dynamo records, on every node, ``nn_module_stack``: ``{str(id(module)): (source, class)}`` for the modules entered,
outermost first. The ``source`` strings are Dynamo's spelling of how the compiled frame reached the module
(``L['self'].layers.0``, ``L['args'][0].model`` when transformers wraps ``forward``, ``G['model']`` for a global,
``L['self']._modules['layers']['0']`` on older releases), and that spelling changes between torch and transformers
releases. So the path is read from the objects: the keys are the ids of live modules (they are alive while their graph
compiles), the path between two recorded modules is where one is registered under the other, and the path from the
frame's root to the outermost recorded module is the part of its source that the registrations confirm. A new spelling
of the root reference cannot change the result; only names the objects confirm are used.

The objects also tell where the graph's root sits in the whole model: a graph rooted inside one element of a
``ModuleList`` of equal layers (per-block ``compile``, a graph break in the layer loop) is reused by Dynamo for every
such layer, whatever the layer index, because modules are graph inputs. :class:`Placement` records that, with the
same site at every layer of its container, so the policy can be checked against all of them.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

__all__ = [
    "BlockScope",
    "ModuleIndex",
    "Placement",
    "exported_path",
    "layer_from_path",
    "place_exported",
    "place_nodes",
    "source_components",
]

# One component of a Dynamo source: ['name'], ["name"], [0], or a dotted/leading identifier.
_TOKEN = re.compile(r"\[\s*'([^']*)'\s*\]|\[\s*\"([^\"]*)\"\s*\]|\[\s*([^\]'\"]*?)\s*\]|(\w+)")
_MAX_DEPTH = 64  # module nesting searched between two recorded modules; real models nest < 20 deep


def layer_from_path(path: str) -> int | None:
    """The layer index in a module path: its last integer component (``model.layers.7.self_attn`` -> 7).

    Args:
        path: a dotted module path.

    Returns:
        The last all-digit component as an int, or None when there is none.

    Example:
        >>> layer_from_path("model.layers.7.self_attn"), layer_from_path("attn")
        (7, None)
    """
    ints = [int(part) for part in path.split(".") if part.isdigit()]
    return ints[-1] if ints else None


def source_components(source: str) -> list[str]:
    """The module-path components of a Dynamo module source, after the root reference.

    The root reference is the leading name with the subscripts written directly after it (``L['self']``,
    ``L['args'][0]``, ``L['kwargs']['m']``, ``G['model']``): the frame variable and the container it was passed in.
    Attribute and index steps after it are path components; ``_modules`` (how older releases spell submodule access)
    is dropped.

    Args:
        source: the source string of an ``nn_module_stack`` entry.

    Returns:
        The components, e.g. ``['model', 'layers', '0']`` for ``"L['args'][0].model.layers[0]"``.

    Example:
        >>> source_components("L['self']._modules['layers']['0'].attn")
        ['layers', '0', 'attn']
    """
    tokens: list[tuple[str, bool]] = []  # (text, written as a subscript)
    for match in _TOKEN.finditer(source):
        sub = next((g for g in match.groups()[:3] if g is not None), None)
        tokens.append((sub, True) if sub is not None else (match.group(4), False))
    start = 1
    while start < len(tokens) and tokens[start][1]:
        start += 1
    return [text for text, _ in tokens[start:] if text != "_modules"]


def _unwrap(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else the module itself."""
    while isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        module = module._orig_mod
    return module


@dataclass(frozen=True)
class BlockScope:
    """The blocks one backend instance serves, as :func:`moba_compile.compile_blocks` compiles them.

    A graph rooted in one of these blocks is reused by Dynamo for all of them (they share one backend), so its sites
    are named and decided as the block's own (``paths``/``layers``) and checked against every block of the scope.

    Attributes:
        blocks: ``id(block) -> (module path of the block, layer index)`` for every block compiled with this backend.
        num_layers: the number of attention layers the policy counts (``dense_last``, negative indices).
        attention_layers: the layer indices of the model's attention layers, in order.
    """

    blocks: Mapping[int, tuple[str, int]]
    num_layers: int
    attention_layers: tuple[int, ...]


@dataclass(frozen=True)
class Placement:
    """Where one SDPA call sits.

    Attributes:
        module: its module path: relative to the compiled root, or from the outermost module holding the root when the
            graph starts inside a repeated layer (a path relative to one layer would name no layer). "" when unknown.
        layer: the layer index from the path (or the block's index under a :class:`BlockScope`), else None.
        layer_idx: ``layer_idx`` of the innermost module around the call that has one (transformers' attention
            layers), else None.
        variants: ``(module path, layer)`` of this call at every layer of the container its layer belongs to, itself
            included (hidden layers of a graph split by graph breaks too); just itself when no container is known.
        shared: True when this graph serves every variant (it starts inside a repeated layer, or is a block graph
            under a :class:`BlockScope`): one decision must hold for all of them.
        hidden: the variants' layers whose modules do not appear in this graph (graph breaks split the model).
        modules: the recorded module objects, outermost first (None where an id could not be resolved).
        variant_modules: the layer module of each variant (the container's elements), when known.
    """

    module: str
    layer: int | None
    layer_idx: int | None = None
    variants: tuple[tuple[str, int | None], ...] = ()
    shared: bool = False
    hidden: tuple[int, ...] = ()
    modules: tuple[nn.Module | None, ...] = field(default=(), repr=False, compare=False)
    variant_modules: tuple[nn.Module, ...] = field(default=(), repr=False, compare=False)

    @property
    def innermost(self) -> nn.Module | None:
        """The innermost recorded module (the one whose code calls SDPA), or None."""
        return self.modules[-1] if self.modules else None


class ModuleIndex:
    """The live ``nn.Module`` objects of the process, by id, with where each is registered.

    Built by one scan of the garbage collector's objects (~0.1 s with a transformers model loaded), once per graph:
    ``nn_module_stack`` keys are module ids, and finding a module's parents needs every module anyway.
    """

    def __init__(self) -> None:
        self._by_id: dict[int, nn.Module] = {}
        self._parents: dict[int, list[tuple[nn.Module, str]]] = {}
        for obj in gc.get_objects():
            # type() never runs user code (isinstance may, through a __class__ property or a dead weakref proxy).
            if issubclass(type(obj), nn.Module):
                self._by_id[id(obj)] = obj
        for parent in self._by_id.values():
            children = parent.__dict__.get("_modules")
            if not isinstance(children, dict):
                continue
            for name, child in children.items():
                if child is not None:
                    self._parents.setdefault(id(child), []).append((parent, name))

    def resolve(self, key: object, cls: object) -> nn.Module | None:
        """The live module an ``nn_module_stack`` key names, if it exists and is an instance of ``cls``."""
        try:
            obj = self._by_id.get(int(key))  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return None
        if obj is None or (isinstance(cls, type) and not isinstance(obj, cls)):
            return None
        return obj

    def parents(self, module: nn.Module) -> list[tuple[nn.Module, str]]:
        """``(parent, name)`` for every module that registers ``module``; ``torch.compile`` wrappers are transparent."""
        out: list[tuple[nn.Module, str]] = []
        for parent, name in self._parents.get(id(module), []):
            if isinstance(parent, torch._dynamo.eval_frame.OptimizedModule):
                out.extend(self.parents(parent))
            else:
                out.append((parent, name))
        return out

    def relative(self, ancestor: nn.Module, module: nn.Module) -> list[str] | None:
        """The path components from ``ancestor`` down to ``module`` (``[]`` when they are one), or None."""
        frontier: list[tuple[nn.Module, list[str]]] = [(module, [])]
        for _ in range(_MAX_DEPTH):
            following: list[tuple[nn.Module, list[str]]] = []
            for node, names in frontier:
                if node is ancestor or _unwrap(node) is _unwrap(ancestor):
                    return names
                following.extend((parent, [name, *names]) for parent, name in self.parents(node))
            if not following:
                return None
            frontier = following
        return None

    def ancestry(self, module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
        """``(parent, name, child)`` links from ``module`` up to its outermost holder, innermost first.

        The walk stops at a module that no module registers, or at one registered in several places (a shared
        module: which path is meant cannot be told).
        """
        links: list[tuple[nn.Module, str, nn.Module]] = []
        node = module
        for _ in range(_MAX_DEPTH):
            parents = self.parents(node)
            if len(parents) != 1:
                break
            parent, name = parents[0]
            links.append((parent, name, node))
            node = parent
        return links

    def root_relative(self, source: str, module: nn.Module | None) -> tuple[list[str], nn.Module | None]:
        """The path of ``module`` below the compiled frame's root, and the root module.

        Walking up from ``module``, a component of ``source`` (see :func:`source_components`) is kept while a
        registration confirms it, from the last one backwards; the root is where the walk stops. The walk never goes
        past the components after the root reference, so the frame variable's own name never becomes part of a path;
        a component no registration confirms (a new spelling of the root reference, a plain Python list holding
        modules) ends it. Without the object, the source's components are used and the root is unknown (None).
        """
        components = source_components(source)
        if module is None:
            return components, None
        return self._confirm(module, components)

    def _confirm(self, module: nn.Module, components: list[str]) -> tuple[list[str], nn.Module]:
        best: tuple[list[str], nn.Module] = ([], module)
        if components:
            for parent, name in self.parents(module):
                if name == components[-1]:
                    above, root = self._confirm(parent, components[:-1])
                    if len(above) + 1 > len(best[0]):
                        best = ([*above, name], root)
        return best

    @staticmethod
    def siblings(parent: nn.Module, child: nn.Module) -> list[tuple[str, nn.Module]]:
        """The children of ``parent`` of ``child``'s class (compile wrappers unwrapped), ``child`` included."""
        cls = type(_unwrap(child))
        return [
            (name, module)
            for name, module in parent.__dict__.get("_modules", {}).items()
            if module is not None and type(_unwrap(module)) is cls
        ]


def _stack_objects(index: ModuleIndex, node: fx.Node) -> list[tuple[str, nn.Module | None]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, value in stack.items():
        source, cls = (value[0], value[1]) if isinstance(value, (tuple, list)) and len(value) >= 2 else (value, None)
        out.append((str(source), index.resolve(key, cls)))
    return out


def _site_path(index: ModuleIndex, entries: list[tuple[str, nn.Module | None]]) -> tuple[list[str], nn.Module | None]:
    """Path components of the innermost recorded module below the frame's root, and the root when known."""
    if not entries:
        return [], None
    if any(obj is None for _, obj in entries):
        # Some id is not a live module (an old Dynamo keyed the stack otherwise): the source string is all there is.
        return source_components(entries[-1][0]), None
    path, root = index.root_relative(entries[0][0], entries[0][1])
    for (_, outer), (source, inner) in zip(entries, entries[1:]):
        step = index.relative(outer, inner)  # type: ignore[arg-type]
        if step is None:  # not registered below the previous module (a module passed in as an argument)
            return source_components(source), None
        path += step
    return path, root


def _layer_idx(modules: Sequence[nn.Module | None]) -> int | None:
    for module in reversed(modules):
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and not isinstance(index, bool):
            return index
    return None


def _repeated_link(
    index: ModuleIndex, links: list[tuple[nn.Module, str, nn.Module]]
) -> tuple[int, list[tuple[str, nn.Module]]] | None:
    """The link to a layer: the innermost one whose child has siblings of its class, preferring an indexed one.

    ``layers.3`` in a ``ModuleList`` is a layer; a module with a sibling of its class under another name (two norms,
    an encoder and a decoder stack of one class) is one only when no indexed container holds it.
    """
    named = None
    for position, (parent, name, child) in enumerate(links):
        siblings = index.siblings(parent, child)
        if len(siblings) < 2:
            continue
        if name.isdigit():
            return position, siblings
        named = named or (position, siblings)
    return named


def _variants(
    prefix: list[str], siblings: list[tuple[str, nn.Module]], suffix: list[str]
) -> tuple[tuple[str, int | None], ...]:
    out = []
    for name, _ in siblings:
        path = ".".join([*prefix, name, *suffix])
        out.append((path, int(name) if name.isdigit() else layer_from_path(path)))
    return tuple(out)


# A module called more than once is recorded as ``name@1``, ``name@2``, ... by torch.export (keys and, on some releases,
# paths): the call count is not part of the module's path.
_CALL_COUNT = re.compile(r"@\d+$")


def exported_path(node: fx.Node) -> str:
    """The module path of a node of an exported program (``model.layers.7.self_attn``), "" when it has none.

    ``torch.export`` records ``nn_module_stack`` as ``{key: (fully qualified name, class name)}``, outermost first,
    the names relative to the exported root, whether the program was traced strictly (keys are module ids) or not
    (keys are names): the innermost entry's name is the path, no live module is needed.

    Example:
        >>> exported_path(node)  # doctest: +SKIP
        'model.layers.7.self_attn'
    """
    stack = node.meta.get("nn_module_stack") or {}
    for value in reversed(list(stack.values())):
        path = value[0] if isinstance(value, (tuple, list)) and value else value
        if isinstance(path, str):
            return ".".join(_CALL_COUNT.sub("", part) for part in path.split(".") if part)
    return ""


def place_exported(nodes: Sequence[fx.Node]) -> list[Placement]:
    """The :class:`Placement` of SDPA calls of an exported program (``torch.export``), read from ``nn_module_stack``.

    An exported program is the whole model in one graph, traced once per layer: each call is its own layer's, so
    there is nothing to vary (no shared graph, no hidden layers). The layer is the last integer of the path, as for a
    Dynamo graph; the module objects are not at hand (``layer_idx`` is None).

    Args:
        nodes: the SDPA call nodes.

    Returns:
        One placement per node, in order.
    """
    out = []
    for node in nodes:
        path = exported_path(node)
        layer = layer_from_path(path)
        out.append(Placement(path, layer, None, ((path, layer),)))
    return out


def place_nodes(
    nodes: Sequence[fx.Node], graph_module_ids: set[int], scope: BlockScope | None = None
) -> list[Placement]:
    """The :class:`Placement` of every node in ``nodes`` (SDPA calls of one graph and its subgraphs).

    Args:
        nodes: the SDPA call nodes.
        graph_module_ids: ids of every module recorded on any node of the graph (to tell which layers the graph shows).
        scope: the blocks a :func:`moba_compile.compile_blocks` backend serves, or None.

    Returns:
        One placement per node, in order.
    """
    index = ModuleIndex()
    return [_place(index, node, graph_module_ids, scope) for node in nodes]


def _place(index: ModuleIndex, node: fx.Node, graph_module_ids: set[int], scope: BlockScope | None) -> Placement:
    entries = _stack_objects(index, node)
    modules = tuple(obj for _, obj in entries)
    components, root = _site_path(index, entries)
    layer_idx = _layer_idx(modules)
    path = ".".join(components)
    if root is None:
        return Placement(path, layer_from_path(path), layer_idx, ((path, layer_from_path(path)),), modules=modules)
    links = index.ancestry(root)
    if scope is not None:
        placed = _place_in_scope(scope, root, links, components, layer_idx, modules)
        if placed is not None:
            return placed
    above = [name for _, name, _ in reversed(links)]  # path of the root from its outermost holder
    found = _repeated_link(index, links)
    if found is not None:
        # The graph starts inside one of several equal layers: Dynamo reuses it for all of them.
        position, siblings = found
        prefix = above[: len(links) - 1 - position]
        suffix = above[len(links) - position :] + components
        full = ".".join([*above, *components])
        own = links[position][1]
        layer = int(own) if own.isdigit() else layer_from_path(full)
        variants = _variants(prefix, siblings, suffix)
        return Placement(full, layer, layer_idx, variants, True, (), modules, tuple(m for _, m in siblings))
    # The graph holds the root: the layer container, if any, is below the root, on the way to the innermost module.
    inner = modules[-1] if modules else None
    below = index.ancestry(inner) if inner is not None else []
    depth = len(components)
    inside = below[:depth]  # the links from the innermost module up to the root
    if any(name != components[depth - 1 - p] for p, (_, name, _) in enumerate(inside)):
        inside = []  # registered elsewhere as well (a shared module): no container to vary
    found = _repeated_link(index, inside)
    layer = layer_from_path(path)
    if found is None:
        return Placement(path, layer, layer_idx, ((path, layer),), modules=modules)
    position, siblings = found
    prefix = components[: depth - 1 - position]
    suffix = components[depth - position :]
    hidden = tuple(int(name) for name, module in siblings if name.isdigit() and not _appears(module, graph_module_ids))
    variants = _variants(prefix, siblings, suffix)
    return Placement(path, layer, layer_idx, variants, False, hidden, modules, tuple(m for _, m in siblings))


def _appears(module: nn.Module, graph_module_ids: set[int]) -> bool:
    """Whether the graph ran any code of ``module`` (it is recorded on some node)."""
    return any(id(m) in graph_module_ids for m in _modules_of(module))


def _modules_of(module: nn.Module) -> Iterator[nn.Module]:
    yield module
    if module is not _unwrap(module):
        yield _unwrap(module)
    yield from (m for _, m in _unwrap(module).named_modules() if m is not module)


def _place_in_scope(
    scope: BlockScope,
    root: nn.Module,
    links: list[tuple[nn.Module, str, nn.Module]],
    components: list[str],
    layer_idx: int | None,
    modules: tuple[nn.Module | None, ...],
) -> Placement | None:
    """The placement under a :class:`BlockScope` when the root is one of its blocks or inside one, else None."""
    candidates: list[tuple[nn.Module, list[str]]] = [(root, [])]
    inner: list[str] = []
    for parent, name, _ in links:
        inner = [name, *inner]
        candidates.append((parent, inner))
    for block, names in candidates:
        entry = scope.blocks.get(id(block)) or scope.blocks.get(id(_unwrap(block)))
        if entry is None:
            continue
        suffix = [*names, *components]
        variants = tuple((".".join([path, *suffix]).strip("."), layer) for path, layer in scope.blocks.values())
        full = ".".join([entry[0], *suffix]).strip(".")
        return Placement(full, entry[1], layer_idx, variants, True, (), modules)
    return None
