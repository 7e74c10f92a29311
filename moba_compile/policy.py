"""The per-layer MoBA policy: which attention sites run MoBA, with which chunk size, top-k and routing.

A policy is a frozen :class:`Policy` (top-level defaults plus ordered :class:`Rule` objects). It can be written in code,
or loaded from a TOML or JSON file (same schema, ``version = 1``) or a plain dict by :func:`load_policy`. Every
validation error is a :class:`PolicyError` whose message names the source (file path or ``"<dict>"``), the key path
(e.g. ``rules[1].mode``), the bad value and the allowed values. See ``docs/policy.md`` for the schema.

Example:
    >>> policy = load_policy({"chunk_size": 2048, "topk": 3, "rules": [{"layers": [0], "mode": "dense"}]})
    >>> policy.decide("model.layers.0.self_attn", 0, 32).mode
    'dense'
    >>> policy.decide("model.layers.7.self_attn", 7, 32)
    Decision(mode='moba', chunk_size=2048, topk=3, reason='default policy', rule_index=None, routing='head')
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, get_args

from .validation import ROUTINGS as _ROUTING_VALUES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "DEFAULT_POLICY",
    "DENSE_DECODE",
    "DENSE_SDPA",
    "MAX_INT",
    "MODES",
    "ROUTINGS",
    "Decision",
    "DenseSdpa",
    "Mode",
    "Policy",
    "PolicyError",
    "Routing",
    "Rule",
    "load_policy",
]

#: The largest value of every integer in a policy (``chunk_size``, ``topk``, ``dense_last``, ``num_layers``,
#: ``min_seq_len``, a rule's ``chunk_size``/``topk``) and the largest magnitude of a layer index: 2**31 - 1. No run
#: has a longer key sequence (one bf16 head of 2**31 keys at head dim 128 is 512 GiB) or more layers, so a larger
#: value can only mean the same as this one (one chunk, every chunk, always dense) or be a typo; and above the int64
#: range the ops' integer arguments take, it would fail inside the compiled graph instead of here.
MAX_INT = 2**31 - 1

#: The two decisions a site can get (a rule's ``mode``, a :class:`Decision`'s ``mode``, the policy's ``decode``).
Mode = Literal["moba", "dense"]
#: The values of :data:`Mode`, in the order messages list them.
MODES: tuple[Mode, ...] = get_args(Mode)
#: How the compile backend runs the dense SDPA sites it could have converted (the policy's ``dense_sdpa``):
#: ``"as_is"`` leaves the call untouched, bit for bit (spec section 3); ``"flash_when_causal"`` runs flash attention on
#: unrepeated key/value wherever the call's boolean mask is found exactly causal at run time (``is_causal=True`` with
#: ``Lq == Lk``; no mask for a one-query decode step), and the call as it was elsewhere (:mod:`moba_compile.dense_ops`).
DenseSdpa = Literal["as_is", "flash_when_causal"]
#: The values of :data:`DenseSdpa`, in the order messages list them.
DENSE_SDPA: tuple[DenseSdpa, ...] = get_args(DenseSdpa)
#: How the dense layers of a one-query decode step run (the policy's ``dense_decode``; the Hugging Face path, and the
#: compile backend's static-cache steps):
#: ``"split_k"`` (the default) runs MoBA's split-K decode kernels with every earlier chunk selected and no gate
#: (``moba::dense_decode``) where they take the step's inputs (CUDA, head dims 64/128, fp16/bf16/fp32): the same
#: attention, split over the keys so that a small batch fills the GPU, graph-safe on a static cache; elsewhere the
#: layer's SDPA call, the report saying why. ``"sdpa"`` (the opt-out) always runs the layer's own SDPA call.
DenseDecode = Literal["sdpa", "split_k"]
#: The values of :data:`DenseDecode`, in the order messages list them.
DENSE_DECODE: tuple[DenseDecode, ...] = get_args(DenseDecode)
#: How a MoBA site's gate selects chunks (spec section 6): ``"head"`` (the default, the MoBA paper's: every query head
#: chooses its own chunks) or ``"group"`` (GQA/MQA: one choice per key head and position, from the scores summed
#: over the group's query heads, shared by them).
Routing = Literal["head", "group"]
#: The values of :data:`Routing`, in the order messages list them (the ops accept exactly these).
ROUTINGS: tuple[Routing, ...] = get_args(Routing)
if ROUTINGS != _ROUTING_VALUES:  # pragma: no cover - one list for the policy and the ops
    raise ImportError(f"policy routings {ROUTINGS} differ from the ops' {_ROUTING_VALUES}")

_REGEX_PREFIX = "re:"
_AUTOMATIC_SOURCE = "<default>"  # the source of DEFAULT_POLICY, the policy used when none is given
_SUFFIXES: tuple[str, ...] = (".toml", ".json")
_TOP_KEYS: tuple[str, ...] = (
    "chunk_size",
    "decode",
    "dense_decode",
    "dense_last",
    "dense_sdpa",
    "min_seq_len",
    "num_layers",
    "routing",
    "rules",
    "topk",
    "version",
)
_RULE_KEYS: tuple[str, ...] = ("chunk_size", "layers", "mode", "module", "routing", "topk")
_RULE_SELECTORS: tuple[str, ...] = ("layers", "module")
_RULE_SETTINGS: tuple[str, ...] = ("mode", "chunk_size", "topk", "routing")


class PolicyError(ValueError):
    """A policy that cannot be used: a bad value, an unknown key, or a file that cannot be read or parsed.

    The message always names the source (file path, ``"<dict>"``, or ``"<Policy>"``/``"<Rule>"`` for objects built in
    code), the key path and, for bad values, the allowed values.

    Args:
        message: The full, human-readable explanation.

    Example:
        >>> try:
        ...     load_policy({"decode": "sparse"})
        ... except PolicyError as err:
        ...     print(err)
        <dict>: decode = 'sparse' is not valid; allowed: 'moba', 'dense'
    """


# --------------------------------------------------------------------------------------------------------------------
# Validation helpers (shared by the constructors and the loader, so both give the same messages)
# --------------------------------------------------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _fail(where: str, path: str, value: object, allowed: str) -> NoReturn:
    raise PolicyError(f"{where}: {path} = {value!r} is not valid; allowed: {allowed}")


def _check_int(where: str, path: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
        _fail(where, path, value, f"an integer from {minimum} to {MAX_INT}")
    return value


def _check_choice(where: str, path: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        _fail(where, path, value, ", ".join(repr(c) for c in choices))
    return value


def _check_keys(
    where: str, table: Mapping[Any, Any], valid: tuple[str, ...], place: str, misplaced: tuple[str, ...], hint: str
) -> None:
    for key in table:
        if key not in valid:
            message = f"{where}: unknown key {key!r} {place}; valid keys: {', '.join(valid)}"
            if key in misplaced:
                message += f" ({key!r} {hint})"
            elif isinstance(key, str):
                close = difflib.get_close_matches(key, valid, n=1)
                if close:
                    message += f" (did you mean {close[0]!r}?)"
            raise PolicyError(message)


def _check_layers(where: str, path: str, value: object) -> tuple[int, ...]:
    allowed = "a non-empty list of integer layer indices (negative counts from the end)"
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)) or not value:
        _fail(where, path, value, allowed)
    for i, idx in enumerate(value):
        if isinstance(idx, bool) or not isinstance(idx, int) or not -MAX_INT <= idx <= MAX_INT:
            _fail(
                where,
                f"{path}[{i}]",
                idx,
                f"an integer layer index from -{MAX_INT} to {MAX_INT} (negative counts from the end)",
            )
    return tuple(value)


def _check_module(where: str, path: str, value: object) -> str:
    allowed = "a non-empty exact module path, or 're:' followed by a regex that must match the whole path"
    if not isinstance(value, str) or not value:
        _fail(where, path, value, allowed)
    if value.startswith(_REGEX_PREFIX):
        pattern = value[len(_REGEX_PREFIX) :]
        if not pattern:
            _fail(where, path, value, allowed)
        try:
            re.compile(pattern)
        except re.error as err:
            raise PolicyError(f"{where}: {path} = {value!r} is not a valid regex: {err}") from None
    return value


def _check_rule(
    where: str,
    path: str,
    layers: object,
    module: object,
    mode: object,
    chunk_size: object,
    topk: object,
    routing: object = None,
) -> tuple[tuple[int, ...] | None, str | None, str | None, int | None, int | None, str | None]:
    """Validate one rule's fields; return them normalised (``layers`` as a tuple)."""
    name = path or "rule"
    if layers is None and module is None:
        raise PolicyError(
            f"{where}: {name} sets neither 'layers' nor 'module'; a rule needs at least one selector "
            "(layers = [...] and/or module = '...')"
        )
    if mode is None and chunk_size is None and topk is None and routing is None:
        raise PolicyError(
            f"{where}: {name} sets none of 'mode', 'chunk_size', 'topk', 'routing'; a rule must change at least one "
            "setting"
        )
    return (
        None if layers is None else _check_layers(where, _join(path, "layers"), layers),
        None if module is None else _check_module(where, _join(path, "module"), module),
        None if mode is None else _check_choice(where, _join(path, "mode"), mode, MODES),
        None if chunk_size is None else _check_int(where, _join(path, "chunk_size"), chunk_size, 1),
        None if topk is None else _check_int(where, _join(path, "topk"), topk, 1),
        None if routing is None else _check_choice(where, _join(path, "routing"), routing, ROUTINGS),
    )


def _rule_from_mapping(where: str, index: int, table: object) -> Rule:
    path = f"rules[{index}]"
    if not isinstance(table, Mapping):
        _fail(where, path, table, f"a table with the keys {', '.join(_RULE_KEYS)}")
    misplaced = tuple(k for k in _TOP_KEYS if k not in _RULE_KEYS)
    _check_keys(where, table, _RULE_KEYS, f"in {path}", misplaced, "is a top-level key, not a rule key")
    layers, module, mode, chunk_size, topk, routing = _check_rule(
        where,
        path,
        table.get("layers"),
        table.get("module"),
        table.get("mode"),
        table.get("chunk_size"),
        table.get("topk"),
        table.get("routing"),
    )
    return Rule(layers=layers, module=module, mode=mode, chunk_size=chunk_size, topk=topk, routing=routing)


def _spans(indices: Sequence[int]) -> str:
    """Sorted indices as runs, for messages: ``(0, 1, 2, 3, 7)`` -> ``"0-3, 7"``."""
    runs: list[list[int]] = []
    for idx in indices:
        if runs and idx == runs[-1][1] + 1:
            runs[-1][1] = idx
        else:
            runs.append([idx, idx])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _attention_order(num_layers: int | None, attention_layers: Sequence[int] | None) -> tuple[int, ...] | None:
    """The attention layers' indices in order: the ones given, else ``0 .. num_layers - 1``, else None (unknown)."""
    if attention_layers is not None:
        return tuple(sorted(set(attention_layers)))
    if num_layers is not None:
        return tuple(range(num_layers))
    return None


# --------------------------------------------------------------------------------------------------------------------
# The policy objects
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One policy rule: a selector (layer indices and/or a module path) and the settings it overrides.

    A rule must set at least one selector (``layers``, ``module``) and at least one setting (``mode``, ``chunk_size``,
    ``topk``, ``routing``). When both selectors are set, both must hold. Unset settings inherit the policy's default
    decision for the site. ``layers`` given as a list is stored as a tuple.

    Args:
        layers: Layer indices (0-based); a negative index counts from the end (``-1`` is the last layer) and needs
            the number of layers, else it matches nothing.
        module: An exact module path (``"model.layers.3.self_attn"``), or ``"re:"`` followed by a regex that must
            match the whole path (``re.fullmatch``).
        mode: ``"moba"``, ``"dense"``, or None to keep the default decision's mode.
        chunk_size: MoBA chunk size (1 to :data:`MAX_INT`), or None to keep the default.
        topk: MoBA top-k (1 to :data:`MAX_INT`, counts the query's own chunk), or None to keep the default.
        routing: The gate's routing (:data:`ROUTINGS`: ``"head"`` or ``"group"``), or None to keep the default.

    Raises:
        PolicyError: A field has a bad type or value, or the rule has no selector or no setting.

    Example:
        >>> rule = Rule(layers=(0, -1), mode="dense")
        >>> rule.matches("model.layers.31.self_attn", 31, 32)
        True
        >>> Rule(module="re:.*layers\\\\.(4|5)\\\\.self_attn", topk=3).matches("model.layers.5.self_attn", 5, 32)
        True
    """

    layers: tuple[int, ...] | None = None
    module: str | None = None
    mode: Mode | None = None
    chunk_size: int | None = None
    topk: int | None = None
    routing: Routing | None = None

    def __post_init__(self) -> None:
        checked = _check_rule(
            "<Rule>", "", self.layers, self.module, self.mode, self.chunk_size, self.topk, self.routing
        )
        object.__setattr__(self, "layers", checked[0])

    def matches(
        self, module: str, layer: int | None, num_layers: int | None, attention_layers: Sequence[int] | None = None
    ) -> bool:
        """Whether this rule selects an attention site.

        Args:
            module: The site's module path (e.g. ``"model.layers.7.self_attn"``).
            layer: The site's 0-based layer index, or None if unknown (then no ``layers`` rule matches).
            num_layers: The number of attention layers, used to resolve negative indices (``n + idx``) when
                ``attention_layers`` is not given; None if unknown (then negative indices match nothing).
            attention_layers: The layer indices of every attention layer of the model, in order (a hybrid model's
                attention may sit in decoder layers 1 and 5 only). When given, a negative index counts attention
                layers from the end: ``-1`` is ``attention_layers[-1]``.

        Returns:
            True if every selector the rule sets holds for the site.

        Raises:
            Nothing: a validated rule always answers.

        Example:
            >>> Rule(layers=(-1,), mode="dense").matches("m", 31, 32)
            True
            >>> Rule(layers=(-1,), mode="dense").matches("m", 31, None)
            False
        """
        if self.layers is not None:
            if layer is None:
                return False
            order = _attention_order(num_layers, attention_layers)
            resolved = set()
            for idx in self.layers:
                if idx >= 0:
                    resolved.add(idx)
                elif order is not None and -len(order) <= idx:
                    resolved.add(order[idx])
            if layer not in resolved:
                return False
        if self.module is not None:
            if self.module.startswith(_REGEX_PREFIX):
                if re.fullmatch(self.module[len(_REGEX_PREFIX) :], module) is None:
                    return False
            elif module != self.module:
                return False
        return True

    def describe(self) -> str:
        """A short description of the rule's selectors, e.g. ``"layers=[0]"`` or ``"module='re:...'"``.

        Returns:
            The selectors, comma separated, as they would be written in a policy.

        Raises:
            Nothing.

        Example:
            >>> Rule(layers=[0, -1], module="model.x", mode="dense").describe()
            "layers=[0, -1], module='model.x'"
        """
        parts = []
        if self.layers is not None:
            parts.append(f"layers={list(self.layers)}")
        if self.module is not None:
            parts.append(f"module={self.module!r}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The rule as a plain dict holding only the fields it sets (``layers`` as a list).

        Returns:
            A dict that :func:`load_policy` accepts as an entry of ``rules``.

        Raises:
            Nothing.

        Example:
            >>> Rule(layers=(0,), mode="dense").to_dict()
            {'layers': [0], 'mode': 'dense'}
        """
        out: dict[str, Any] = {}
        if self.layers is not None:
            out["layers"] = list(self.layers)
        for key in ("module", "mode", "chunk_size", "topk", "routing"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class Decision:
    """What the policy decided for one attention site.

    Args:
        mode: ``"moba"`` or ``"dense"``.
        chunk_size: The MoBA chunk size (meaningful when ``mode == "moba"``, always >= 1).
        topk: The MoBA top-k (meaningful when ``mode == "moba"``, always >= 1).
        reason: Why, in words: ``"default policy"``, ``"rule 0 (layers=[0])"``,
            ``"dense_last=3: layer 30 is among the last 3 of 32 attention layers"``, ...
        rule_index: The index of the rule that matched, or None if no rule matched.
        routing: The gate's routing, ``"head"`` or ``"group"`` (meaningful when ``mode == "moba"``).

    Example:
        >>> DEFAULT_POLICY.decide("model.layers.31.self_attn", 31, 32).reason
        'dense_last=3: layer 31 is among the last 3 of 32 attention layers'
    """

    mode: Mode
    chunk_size: int
    topk: int
    reason: str
    rule_index: int | None = None
    routing: Routing = "head"


@dataclass(frozen=True)
class Policy:
    """Top-level defaults plus ordered rules; the first matching rule wins.

    Every field is validated on construction (also when built in code); ``rules`` may be given as a list and may hold
    dicts (validated like a policy file's ``[[rules]]`` tables); it is stored as a tuple of :class:`Rule`. ``source``
    is used in messages only and takes no part in equality.

    Args:
        version: Schema version; must be 1.
        chunk_size: Default MoBA chunk size (1 to :data:`MAX_INT`, as every integer here).
        topk: Default MoBA top-k (>= 1, counts the query's own chunk).
        dense_last: The last ``dense_last`` layers run dense attention (>= 0; needs a known number of layers).
        num_layers: The model's number of attention layers, overriding the count the graph shows (needed where
            graph breaks hide layers); None to use the graph's count.
        min_seq_len: Key sequences shorter than this run dense (>= 0; applied at run time by the backend).
        decode: ``"moba"`` or ``"dense"``: how decode steps (``Lq < Lk`` on a cache) of converted sites run.
        routing: Default gate routing of MoBA sites (:data:`ROUTINGS`): ``"head"`` (the paper's) or ``"group"``.
        dense_sdpa: ``"as_is"`` (default: dense sites keep their SDPA call bit for bit) or ``"flash_when_causal"``
            (the compile backend runs flash attention at dense sites whose boolean mask is exactly causal at run
            time; numerics change within the flash kernel's rounding): see :data:`DenseSdpa`.
        dense_decode: ``"split_k"`` (default: on the Hugging Face path, and for static-cache steps on the compile
            backend, a one-query decode step of a layer dense by the policy runs MoBA's split-K decode kernels with
            every earlier chunk selected where they take its inputs: exact dense attention, graph-safe on a static
            cache; elsewhere its SDPA call, with the reason in the report) or ``"sdpa"`` (the dense layers of a
            decode step always run their SDPA call): see :data:`DenseDecode`.
        rules: Ordered rules.
        source: Where the policy came from (file path, ``"<dict>"``, ``"<Policy>"`` for one built in code), for
            messages; ``"<default>"`` marks the automatic policy (:data:`DEFAULT_POLICY`, see :attr:`automatic`).

    Raises:
        PolicyError: Any field has a bad type or value.

    Example:
        >>> policy = Policy(chunk_size=512, topk=3, dense_last=0, rules=[Rule(layers=(0,), mode="dense")])
        >>> [policy.decide(f"layers.{i}", i, 4).mode for i in range(4)]
        ['dense', 'moba', 'moba', 'moba']
    """

    version: int = 1
    chunk_size: int = 4096
    topk: int = 12
    dense_last: int = 3
    num_layers: int | None = None
    min_seq_len: int = 0
    decode: Mode = "moba"
    dense_sdpa: DenseSdpa = "as_is"
    rules: tuple[Rule, ...] = ()
    source: str = field(default="<Policy>", compare=False)
    routing: Routing = "head"
    dense_decode: DenseDecode = "split_k"

    def __post_init__(self) -> None:
        where = "<Policy>" if self.source == _AUTOMATIC_SOURCE else str(self.source)
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version != 1:
            _fail(where, "version", self.version, "1")
        _check_int(where, "chunk_size", self.chunk_size, 1)
        _check_int(where, "topk", self.topk, 1)
        _check_int(where, "dense_last", self.dense_last, 0)
        if self.num_layers is not None:
            _check_int(where, "num_layers", self.num_layers, 1)
        _check_int(where, "min_seq_len", self.min_seq_len, 0)
        _check_choice(where, "decode", self.decode, MODES)
        _check_choice(where, "dense_sdpa", self.dense_sdpa, DENSE_SDPA)
        _check_choice(where, "dense_decode", self.dense_decode, DENSE_DECODE)
        _check_choice(where, "routing", self.routing, ROUTINGS)
        rules = self.rules
        if isinstance(rules, (str, bytes, Mapping)) or not isinstance(rules, (list, tuple)):
            _fail(where, "rules", rules, "a list of tables ([[rules]] in TOML)")
        converted = []
        for i, rule in enumerate(rules):
            if isinstance(rule, Rule):
                converted.append(rule)
            else:
                converted.append(_rule_from_mapping(where, i, rule))
        object.__setattr__(self, "rules", tuple(converted))

    @property
    def automatic(self) -> bool:
        """True for the automatic policy (none given: :data:`DEFAULT_POLICY`), the only one under which a site the
        policy cannot serve exactly may fall back to dense SDPA; under any other policy such a site is an error."""
        return self.source == _AUTOMATIC_SOURCE

    def attention_order(
        self, num_layers: int | None, attention_layers: Sequence[int] | None = None
    ) -> tuple[int, ...] | None:
        """The layer indices of the model's attention layers, in order, as the policy counts them.

        ``dense_last``, negative ``layers`` and ``num_layers`` count attention layers (a hybrid model may have
        attention in a few decoder layers only). The indices seen (``attention_layers``) are used when they are all of
        them (``self.num_layers`` unset or equal to their count); else ``0 .. n - 1`` with ``n`` = ``self.num_layers``
        or ``num_layers`` (every layer has attention; graph breaks may hide some); None when nothing is known.

        Args:
            num_layers: The number of attention layers the caller sees, or None.
            attention_layers: The layer indices of the attention layers the caller sees, or None.

        Returns:
            A sorted tuple of layer indices, or None.

        Raises:
            Nothing.

        Example:
            >>> Policy().attention_order(None, [5, 1])
            (1, 5)
            >>> Policy(num_layers=4).attention_order(2, [0, 1])
            (0, 1, 2, 3)
        """
        if attention_layers is not None:
            seen = tuple(sorted(set(attention_layers)))
            if self.num_layers is None or len(seen) == self.num_layers:
                return seen
        n = self.num_layers if self.num_layers is not None else num_layers
        return _attention_order(n, None)

    def default_decision(
        self, layer: int | None, num_layers: int | None, attention_layers: Sequence[int] | None = None
    ) -> Decision:
        """The decision before any rule: MoBA with the top-level settings, dense for the last ``dense_last`` layers.

        Args:
            layer: The site's 0-based layer index, or None if unknown.
            num_layers: The number of attention layers the caller sees; ``self.num_layers`` takes precedence when set.
            attention_layers: The layer indices of the attention layers the caller sees (see
                :meth:`attention_order`); ``dense_last`` counts these from the end.

        Returns:
            The default :class:`Decision` (``rule_index`` None).

        Raises:
            Nothing.

        Example:
            >>> DEFAULT_POLICY.default_decision(29, 32).mode, DEFAULT_POLICY.default_decision(28, 32).mode
            ('dense', 'moba')
        """
        order = self.attention_order(num_layers, attention_layers)
        if self.dense_last > 0:
            if layer is not None and order is not None and layer in order[-self.dense_last :]:
                reason = (
                    f"dense_last={self.dense_last}: layer {layer} is among the last {self.dense_last} of "
                    f"{len(order)} attention layers"
                )
                return Decision("dense", self.chunk_size, self.topk, reason, None, self.routing)
            if layer is None:
                reason = f"default policy (dense_last={self.dense_last} not applied: layer unknown)"
                return Decision("moba", self.chunk_size, self.topk, reason, None, self.routing)
            if order is None:
                reason = f"default policy (dense_last={self.dense_last} not applied: number of layers unknown)"
                return Decision("moba", self.chunk_size, self.topk, reason, None, self.routing)
        return Decision("moba", self.chunk_size, self.topk, "default policy", None, self.routing)

    def decide(
        self, module: str, layer: int | None, num_layers: int | None, attention_layers: Sequence[int] | None = None
    ) -> Decision:
        """Decide one attention site: the default decision, then the first matching rule's overrides.

        The number of layers is ``self.num_layers`` if set, else ``num_layers``. The default decision is MoBA with
        the top-level ``chunk_size``/``topk``, except the last ``dense_last`` layers, which run dense. The first rule
        that matches overrides the settings it sets; the others keep the default decision's values (so a rule that
        sets only ``chunk_size`` on one of the last ``dense_last`` layers leaves it dense).

        Args:
            module: The site's module path (``""`` if none).
            layer: The site's 0-based layer index, or None if unknown.
            num_layers: The number of attention layers the caller sees, or None if unknown.
            attention_layers: The layer indices of every attention layer the caller sees, in any order (see
                :meth:`attention_order`): ``dense_last`` and negative ``layers`` count these from the end, so a
                hybrid model with attention in decoder layers 1 and 5 and ``dense_last = 1`` keeps layer 5 dense.

        Returns:
            The :class:`Decision`: mode, chunk size, top-k, reason, and the matching rule's index (or None).

        Raises:
            Nothing: a validated policy always decides.

        Example:
            >>> policy = load_policy({"rules": [{"module": "re:.*layers\\\\.(4|5)\\\\.self_attn", "topk": 3}]})
            >>> policy.decide("model.layers.5.self_attn", 5, 32)
            Decision(mode='moba', chunk_size=4096, topk=3, reason="rule 0 (module='re:.*layers\\\\\\\\.(4|5)\\\\\\\\.self_attn')", rule_index=0, routing='head')
        """  # noqa: E501
        order = self.attention_order(num_layers, attention_layers)
        base = self.default_decision(layer, num_layers, attention_layers)
        for i, rule in enumerate(self.rules):
            if not rule.matches(module, layer, None, order):
                continue
            reason = self.describe_rule(i)
            if rule.mode is None and base.mode == "dense":
                reason += f"; mode kept from {base.reason}"
            return Decision(
                mode=rule.mode if rule.mode is not None else base.mode,
                chunk_size=rule.chunk_size if rule.chunk_size is not None else base.chunk_size,
                topk=rule.topk if rule.topk is not None else base.topk,
                reason=reason,
                rule_index=i,
                routing=rule.routing if rule.routing is not None else base.routing,
            )
        return base

    def for_site(
        self, module: str, layer: int | None, num_layers: int | None, attention_layers: Sequence[int] | None = None
    ) -> Policy:
        """The one-site policy: this policy's decision for one attention site, as a policy that gives it everywhere.

        A graph that holds one block only (``nn.Module.compile`` of a decoder layer, as FSDP2 or activation
        checkpointing compile) shows module paths relative to the block and no layer index, so the site must be
        decided where the whole model is known and the decision handed to that graph's backend as a policy of its
        own. :func:`moba_compile.compile_blocks` does this for every block; this method is the same decision for
        one site, for code that builds its backends by hand (``moba_compile.make_backend({"policy": ...})``).

        The result has ``dense_last = 0``, no ``num_layers``, the decision's ``chunk_size``/``topk``/``routing``, this
        policy's ``min_seq_len``, ``decode``, ``dense_sdpa`` and ``dense_decode`` (applied per site, so they stay the
        caller's), and no rules when the decision is MoBA; a dense decision is the single rule ``{"module": "re:.*", "mode": "dense"}``,
        since without a layer index nothing else can make a site dense. It decides every site alike, whatever its path
        or layer.
        It stays automatic (:attr:`automatic`) when this policy is, so the automatic policy's dense fallback for
        sites it cannot serve exactly still applies.

        Args:
            module: The site's module path in the whole model (e.g. ``"model.layers.7.self_attn"``).
            layer: The site's 0-based layer index, or None if unknown.
            num_layers: The number of attention layers in the whole model, or None (``self.num_layers`` wins).
            attention_layers: The layer indices of the model's attention layers (hybrid models), as for
                :meth:`decide`.

        Returns:
            A new :class:`Policy`; ``for_site(...).decide(m, None, None)`` has the mode, chunk size, top-k and routing of
            ``decide(module, layer, num_layers, attention_layers)`` for every path ``m``. Its source names the site.

        Raises:
            Nothing: a validated policy always decides.

        Example:
            >>> policy = Policy(chunk_size=512, topk=3, dense_last=1)
            >>> policy.for_site("layers.0.attn", 0, 4).to_dict()
            {'version': 1, 'chunk_size': 512, 'topk': 3, 'dense_last': 0, 'min_seq_len': 0, 'decode': 'moba', 'dense_sdpa': 'as_is', 'dense_decode': 'split_k', 'routing': 'head', 'rules': []}
            >>> policy.for_site("layers.3.attn", 3, 4).decide("attn", None, None).mode
            'dense'
        """  # noqa: E501
        decision = self.decide(module, layer, num_layers, attention_layers)
        rules = () if decision.mode == "moba" else (Rule(module=f"{_REGEX_PREFIX}.*", mode="dense"),)
        source = _AUTOMATIC_SOURCE if self.automatic else f"{self.source} for {module or '<root>'}"
        return Policy(
            chunk_size=decision.chunk_size,
            topk=decision.topk,
            routing=decision.routing,
            dense_last=0,
            min_seq_len=self.min_seq_len,
            decode=self.decode,
            dense_sdpa=self.dense_sdpa,
            dense_decode=self.dense_decode,
            rules=rules,
            source=source,
        )

    def describe_rule(self, index: int) -> str:
        """A short readable description of rule ``index``, for reports (e.g. of rules that matched no site).

        Args:
            index: The rule's index in ``rules`` (negative indices count from the end, as for a tuple).

        Returns:
            ``"rule <index> (<selectors>)"``, e.g. ``"rule 1 (module='re:.*layers\\\\.(4|5)\\\\.self_attn')"``.

        Raises:
            IndexError: There is no rule ``index``.

        Example:
            >>> Policy(rules=[{"layers": [0], "mode": "dense"}]).describe_rule(0)
            'rule 0 (layers=[0])'
        """
        rule = self.rules[index]
        if index < 0:
            index += len(self.rules)
        return f"rule {index} ({rule.describe()})"

    def check_against(self, num_layers: int | None, attention_layers: Sequence[int] | None = None) -> list[str]:
        """What in this policy does not fit the model the caller sees: human-readable warnings, one per problem.

        These policies are valid but almost certainly not what was meant, and every decision they give is still
        the documented one (so they are warnings, not errors); the backend's pass shows them with ``warnings.warn``.
        Checked, against the attention layers as :meth:`decide` counts them (:meth:`attention_order`):

        - ``num_layers`` set below the number of attention layers seen: ``dense_last`` and negative indices then
          count back from layer ``num_layers - 1`` instead of the model's last attention layer;
        - ``dense_last`` at least the number of attention layers: every layer is dense unless a rule sets
          ``mode = "moba"``;
        - a rule's layer index that is no attention layer: beyond the count (``40`` or ``-40`` in a 32-layer model),
          or, in a hybrid model, a layer without attention.

        Call it with what the whole model has: a graph that a graph break cut shows only some layers (set
        ``num_layers`` in the policy for such models; the check then counts that many layers).

        Args:
            num_layers: The number of attention layers the caller sees, or None if unknown.
            attention_layers: The layer indices of the attention layers the caller sees, in any order, or None.

        Returns:
            The warnings, each starting with the policy's source (``"default policy"`` for the automatic one);
            empty when everything fits or nothing is known about the layers.

        Raises:
            Nothing.

        Example:
            >>> Policy(dense_last=4).check_against(4)
            ["<Policy>: dense_last = 4 covers all 4 attention layers: every layer runs dense unless a rule sets mode = 'moba'"]
            >>> Policy(rules=[Rule(layers=(0, 40), mode="dense")]).check_against(32)
            ['<Policy>: rule 0 (layers=[0, 40]): layer 40 is not an attention layer (the 32 attention layers are 0-31)']
            >>> DEFAULT_POLICY.check_against(32)
            []
        """  # noqa: E501
        where = "default policy" if self.automatic else self.source
        warnings: list[str] = []
        seen = len(set(attention_layers)) if attention_layers is not None else num_layers
        if self.num_layers is not None and seen is not None and self.num_layers < seen:
            warnings.append(
                f"{where}: num_layers = {self.num_layers} but {seen} attention layers are seen: dense_last and "
                f"negative layer indices count back from layer {self.num_layers - 1}, not from the last attention "
                "layer (leave num_layers unset, or set it to the model's count)"
            )
        order = self.attention_order(num_layers, attention_layers)
        if not order:
            return warnings
        count = len(order)
        if self.dense_last >= count:
            warnings.append(
                f"{where}: dense_last = {self.dense_last} covers all {count} attention layers: every layer runs "
                "dense unless a rule sets mode = 'moba'"
            )
        present = set(order)
        for i, rule in enumerate(self.rules):
            if rule.layers is None:
                continue
            missing = [idx for idx in rule.layers if (idx not in present if idx >= 0 else idx < -count)]
            if missing:
                which = ", ".join(map(str, missing))
                if len(missing) == 1:
                    what = f"layer {which} is not an attention layer"
                else:
                    what = f"layers {which} are not attention layers"
                warnings.append(
                    f"{where}: {self.describe_rule(i)}: {what} (the {count} attention layers are {_spans(order)})"
                )
        return warnings

    def to_dict(self) -> dict[str, Any]:
        """The policy as a plain dict in the file schema; ``load_policy(policy.to_dict()) == policy``.

        Every top-level key is written (``num_layers`` only when set, since TOML has no null); each rule holds only
        the fields it sets. The result is JSON-serialisable. ``source`` is not part of the schema and is left out.

        Returns:
            A new dict: ``version``, ``chunk_size``, ``topk``, ``dense_last``, [``num_layers``], ``min_seq_len``,
            ``decode``, ``dense_sdpa``, ``dense_decode``, ``routing``, ``rules``.

        Raises:
            Nothing.

        Example:
            >>> DEFAULT_POLICY.to_dict()
            {'version': 1, 'chunk_size': 4096, 'topk': 12, 'dense_last': 3, 'min_seq_len': 0, 'decode': 'moba', 'dense_sdpa': 'as_is', 'dense_decode': 'split_k', 'routing': 'head', 'rules': []}
        """  # noqa: E501
        out: dict[str, Any] = {
            "version": self.version,
            "chunk_size": self.chunk_size,
            "topk": self.topk,
            "dense_last": self.dense_last,
        }
        if self.num_layers is not None:
            out["num_layers"] = self.num_layers
        out["min_seq_len"] = self.min_seq_len
        out["decode"] = self.decode
        out["dense_sdpa"] = self.dense_sdpa
        out["dense_decode"] = self.dense_decode
        out["routing"] = self.routing
        out["rules"] = [rule.to_dict() for rule in self.rules]
        return out


#: The policy used when none is given: chunk 4096, top-k 12, last 3 layers dense (the MoBA paper's Llama-8B-1M setting).
DEFAULT_POLICY = Policy(source=_AUTOMATIC_SOURCE)


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def _from_mapping(table: Mapping[Any, Any], where: str) -> Policy:
    misplaced = tuple(k for k in _RULE_KEYS if k not in _TOP_KEYS)
    _check_keys(where, table, _TOP_KEYS, "at top level", misplaced, "belongs in a [[rules]] table")
    return Policy(**dict(table), source=where)


def _read_file(path: str) -> Policy:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIXES:
        raise PolicyError(
            f"{path}: unsupported policy file suffix {suffix or '(none)'!r}; allowed suffixes: {', '.join(_SUFFIXES)}"
        )
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        where = "" if os.path.isabs(path) else f" (resolved to {os.path.abspath(path)})"
        raise PolicyError(f"{path}: policy file not found{where}") from None
    except OSError as err:
        raise PolicyError(f"{path}: cannot read policy file: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PolicyError(f"{path}: policy file is not valid UTF-8: {err}") from None
    if suffix == ".toml":
        try:
            data: object = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise PolicyError(f"{path}: invalid TOML: {err}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PolicyError(f"{path}: invalid JSON: {err}") from None
        if not isinstance(data, dict):
            raise PolicyError(f"{path}: the top level must be a JSON object, got {type(data).__name__}")
    return _from_mapping(data, path)  # type: ignore[arg-type]


def load_policy(spec: str | os.PathLike[str] | Mapping[str, Any] | Policy | None) -> Policy:
    """Load and validate a policy from a file, a dict, or an existing policy.

    Args:
        spec: None (the default policy); a :class:`Policy` (returned as is); a mapping in the file schema (source
            ``"<dict>"``); or a path to a ``.toml`` or ``.json`` file (format chosen by suffix).

    Returns:
        The validated, frozen :class:`Policy`.

    Raises:
        PolicyError: The file has another suffix, is missing or unreadable, is not valid TOML/JSON (the message
            carries the parser's), or the content breaks the schema (unknown key, bad value, bad regex, rule
            without selector or setting); also for a ``spec`` of any other type.

    Example:
        >>> load_policy(None) is DEFAULT_POLICY
        True
        >>> load_policy({"chunk_size": 512, "topk": 3, "dense_last": 0}).to_dict()["chunk_size"]
        512
        >>> load_policy({"chunk": 512})
        Traceback (most recent call last):
        ...
        moba_compile.policy.PolicyError: <dict>: unknown key 'chunk' at top level; valid keys: chunk_size, decode, dense_decode, dense_last, dense_sdpa, min_seq_len, num_layers, routing, rules, topk, version (did you mean 'chunk_size'?)
    """  # noqa: E501
    if spec is None:
        return DEFAULT_POLICY
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, Mapping):
        return _from_mapping(spec, "<dict>")
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec)
        if isinstance(path, str):
            return _read_file(path)
    raise PolicyError(
        f"cannot load a policy from {spec!r} ({type(spec).__name__}); "
        "allowed: None, a Policy, a dict, or a path to a .toml or .json file"
    )
