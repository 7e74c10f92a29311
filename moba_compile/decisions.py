"""One decision per attention site, in one wording, for both paths that run MoBA.

The compile pass (:mod:`moba_compile.passes.rewrite`) and the Hugging Face attention function
(:mod:`moba_compile.hf.attention`) each find out what a call is (its :data:`~moba_compile.report.Form`, whether
something about it rules MoBA out, whether it is a step over a KV cache, its key length) in their own way: from a
traced graph, or from the tensors and keywords of a live call. What follows from those facts is decided here, by
:func:`decide_site`, and worded from one table, :data:`REASONS`: so ``explain()`` and ``MobaAttention.report()`` give
the same decision and the same reason for the same model, policy and layer.

The order of the checks (the first that applies gives the reason):

1. a *blocker*: something about the call that MoBA does not compute (a float mask, dropout, non-causal attention, ...);
   the form is then :data:`~moba_compile.report.FORM_NONE`;
2. the policy's decision for the layer (rules, ``dense_last``): dense;
3. ``decode = "dense"`` in the policy, for a step over the KV cache;
4. a key length below ``min_seq_len`` (known at decision time);
5. otherwise MoBA, with the policy's chunk size, top-k and routing; flagged effectively dense where top-k chunks cover
   every key.

A converted site can still run dense when its boolean mask proves not causal at run time: :func:`mask_kind_reason`
words that case for both paths.

Example:
    >>> from moba_compile.policy import load_policy
    >>> policy = load_policy({"chunk_size": 8, "topk": 2, "dense_last": 1})
    >>> decide_site(policy, module="layers.1.attn", layer=1, attention_layers=[0, 1], form="is_causal").reason
    'dense_last=1: layer 1 is among the last 1 of 2 attention layers'
    >>> d = decide_site(policy, module="layers.0.attn", layer=0, attention_layers=[0, 1], form="is_causal", len_k=64)
    >>> (d.mode, d.chunk_size, d.topk, d.reason)
    ('moba', 8, 2, 'default policy; is_causal self-attention')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .policy import Decision, Mode, Policy, Routing
from .report import FORM_CAUSAL, FORM_DECODE, FORM_MASK, FORM_NONE, Form, SiteRecord

__all__ = ["REASONS", "SiteDecision", "decide_site", "layer_decision", "mask_kind_reason", "reason"]

#: Every reason both paths word alike, by name; ``{fields}`` are filled by :func:`reason`. Path-specific reasons (a
#: graph's cross-attention, a transformers keyword MoBA does not implement) stay with their path.
REASONS: dict[str, str] = {
    # Blockers: the call is not MoBA.
    "float_mask": "attn_mask is a float (additive) mask ({dtype}), not MoBA",
    "dropout": "dropout {p} (dropout is not MoBA)",
    "non_causal": "non-causal attention ({how})",
    "heads": "query heads {hq} are not a multiple of key heads {hkv}",
    "softcap": "attention logits are soft-capped (not MoBA)",
    "sliding_window": "sliding-window layer (window {window}): not MoBA",
    "sinks": "attention sinks (not MoBA)",
    "static_cache_buffer": (
        "keys are a static KV cache buffer (max_cache_len slots written in place; its filled length is known only at "
        "run time): static-cache MoBA decode serves one query per step with the cache's boolean mask ({why}), so "
        "dense SDPA over the buffer with its mask"
    ),
    # The policy's choices after the layer's decision.
    "decode_dense": "decode/chunked prefill over the KV cache, and the policy has decode = 'dense'",
    "min_seq_len": "key length {len_k} < min_seq_len {min_seq_len}",
    # Notes of a MoBA site.
    "form_is_causal": "is_causal self-attention",
    "form_mask": "boolean mask, checked for causality once per forward",
    "form_kv_cache": "attention over this layer's KV cache",
    "min_seq_len_at_run_time": "dense below min_seq_len {min_seq_len} at run time",
    "effectively_dense": "top-{topk} of chunk {chunk_size} covers all {len_k} keys",
    "static_cache_slots": "static cache: the first {len_k} of {slots} key slots",
    "means_from_cache": "chunk means from MobaCache",
    "means_from_keys": "each step averages every cached key for the gate (moba_compile.hf.MobaCache avoids this)",
    "static_cache_step": (
        "static cache: the length read from the mask on the device, and each step averages every chunk of the buffer "
        "for the gate (a compiled graph keeps no means between steps; attn_implementation='moba' does)"
    ),
    # A dense site under the policy's dense_sdpa = "flash_when_causal" (the compile pass; moba_compile.dense_ops).
    "dense_flash": (
        "dense_sdpa = 'flash_when_causal': flash attention (is_causal, or no mask for one decode query) on unrepeated "
        "key/value when the mask is exactly causal, checked at run time; else this masked SDPA call"
    ),
    "dense_flash_not": "dense_sdpa = 'flash_when_causal' does not apply ({why}): SDPA as is",
    # A one-query decode step of a layer dense by the policy, under its dense_decode: "split_k" (the default) runs
    # moba::dense_decode where the split-K kernels take the step, else keeps SDPA with the reason; "sdpa" keeps SDPA.
    "dense_split_k": (
        "dense_decode = 'split_k': one-query decode step on MoBA's split-K decode kernels with every earlier chunk "
        "(moba::dense_decode, exact dense attention; {how})"
    ),
    "dense_split_k_not": "dense_decode = 'split_k' cannot run this step ({why}): SDPA as is",
    "dense_decode_sdpa": "dense_decode = 'sdpa': this decode step's SDPA call as is",
    "static_min_seq_len": (
        "static KV cache buffer under the compile backend with min_seq_len {min_seq_len}: the length is known only on "
        "the device, so the threshold cannot be applied"
    ),
}

_FORM_NOTES: dict[Form, str] = {
    FORM_CAUSAL: "form_is_causal",
    FORM_MASK: "form_mask",
    FORM_DECODE: "form_kv_cache",
}


def reason(name: str, **fields: Any) -> str:
    """The reason :data:`REASONS` words for ``name``, with its fields filled in.

    Args:
        name: a key of :data:`REASONS` (``"float_mask"``, ``"decode_dense"``, ...).
        **fields: the template's fields (``dtype``, ``p``, ``len_k``, ...).

    Returns:
        The reason, as both paths report it.

    Raises:
        KeyError: an unknown ``name``, or a field the template needs is missing.

    Example:
        >>> reason("min_seq_len", len_k=64, min_seq_len=128)
        'key length 64 < min_seq_len 128'
    """
    return REASONS[name].format(**fields)


def mask_kind_reason(kind: int) -> str | None:
    """Why a call whose mask ``moba::analyse_mask`` found to be of ``kind`` runs dense SDPA, or None if it runs MoBA.

    Args:
        kind: a mask kind (``moba_compile.ops.MASK_*``), as read at run time.

    Returns:
        The reason both paths report for a mask kind that runs dense (not causal, ...); None for the others.

    Example:
        >>> from moba_compile import ops
        >>> mask_kind_reason(ops.MASK_CAUSAL) is None
        True
    """
    from . import ops  # the mask kinds belong to the ops; imported here so that this module stays light

    return ops.MASK_KIND_REASONS.get(kind) if kind in ops.DENSE_MASK_KINDS else None


@dataclass(frozen=True)
class SiteDecision:
    """What :func:`decide_site` decided for one attention call.

    Attributes:
        mode: ``"moba"`` or ``"dense"``.
        chunk_size, topk: the MoBA parameters (None when dense).
        reason: why, in the words of :data:`REASONS` (and the policy's own: ``"rule 0 (layers=[0])"``, ...).
        form: how the call was recognised (:data:`~moba_compile.report.FORMS`); ``"-"`` for a blocked call.
        layer_decision: the policy's decision for the layer, before anything about the call (its ``rule_index`` says
            which rule matched).
        by_policy: dense because the policy's layer decision says so (rules, ``dense_last``), not because of the call,
            ``decode = "dense"`` or ``min_seq_len``: the compile pass warns when such decisions convert nothing.
        effectively_dense: MoBA whose top-k chunks cover every key of the known key length: exactly dense attention.
        tail: the notes that end a MoBA site's reason (``min_seq_len`` at run time, effectively dense): a path's own
            notes go before them (:meth:`record`).
        routing: the gate's routing of a MoBA site (``"head"`` or ``"group"``, from the policy); None when dense.
    """

    mode: Mode
    chunk_size: int | None
    topk: int | None
    reason: str
    form: Form
    layer_decision: Decision
    by_policy: bool = False
    effectively_dense: bool = False
    tail: tuple[str, ...] = field(default=(), repr=False)
    routing: Routing | None = None

    def record(self, module: str, layer: int | None, notes: Sequence[str] = (), **fields: Any) -> SiteRecord:
        """The report's record of this decision, with the path's own ``notes`` after the shared reason.

        Args:
            module: the site's module path. layer: its layer index (None if unknown).
            notes: what only one path knows (a repeat_kv chain seen through, chunk means from a cache, ...), joined
                into a MoBA site's reason with ``"; "`` before :attr:`tail`; a dense site's reason is kept as it is.
            **fields: other :class:`~moba_compile.report.SiteRecord` fields (``graph``, ``impl``, ``mask_tag``).

        Returns:
            A :class:`~moba_compile.report.SiteRecord`.

        Example:
            >>> from moba_compile.policy import load_policy
            >>> d = decide_site(load_policy({"dense_last": 0}), module="a", layer=0, form="mask")
            >>> d.record("a", 0, ["repeat_kv seen through"]).reason
            'default policy; boolean mask, checked for causality once per forward; repeat_kv seen through'
        """
        text = self.reason
        if self.mode == "moba" and notes:
            lead = text[: len(text) - len("; ".join(("", *self.tail)))] if self.tail else text
            text = "; ".join([lead, *notes, *self.tail])
        return SiteRecord(
            module=module,
            layer=layer,
            decision=self.mode,
            chunk_size=self.chunk_size,
            topk=self.topk,
            reason=text,
            form=self.form,
            effectively_dense=self.effectively_dense,
            routing=self.routing,
            **fields,
        )

    def dense(self, why: str) -> SiteDecision:
        """This decision turned dense for ``why`` (a MoBA site whose mask proved not causal at run time).

        Example:
            >>> from moba_compile.policy import load_policy
            >>> d = decide_site(load_policy({"dense_last": 0}), module="a", layer=0, form="mask")
            >>> d.dense("mask not causal").mode
            'dense'
        """
        return replace(
            self, mode="dense", chunk_size=None, topk=None, reason=why, effectively_dense=False, tail=(), routing=None
        )


def layer_decision(
    policy: Policy,
    module: str,
    layer: int | None,
    *,
    attention_layers: Sequence[int] | None = None,
    num_layers: int | None = None,
) -> Decision:
    """The policy's decision for a layer: ``policy.decide`` with the layer count both paths use.

    Args:
        policy: the policy. module: the site's module path (``""`` if none). layer: its layer index, or None.
        attention_layers: the layer indices of the model's attention layers, where known: ``dense_last`` and negative
            indices count them (their number is the layer count).
        num_layers: the layer count where ``attention_layers`` is not known (a config's ``num_hidden_layers``).

    Returns:
        The policy's :class:`~moba_compile.policy.Decision`.

    Example:
        >>> from moba_compile.policy import load_policy
        >>> layer_decision(load_policy({"dense_last": 1}), "a", 3, attention_layers=[0, 1, 2, 3]).mode
        'dense'
    """
    count = len(attention_layers) if attention_layers else num_layers
    return policy.decide(module, layer, count, attention_layers)


def decide_site(
    policy: Policy,
    *,
    module: str,
    layer: int | None,
    form: Form,
    attention_layers: Sequence[int] | None = None,
    num_layers: int | None = None,
    blocker: str | None = None,
    decode: bool = False,
    len_k: int | None = None,
    decision: Decision | None = None,
) -> SiteDecision:
    """Decide one attention call: dense or MoBA, with which parameters, and why (see the module's docstring).

    Args:
        policy: the policy.
        module: the call's module path (``""`` if none). layer: its layer index, or None.
        form: how the call was recognised (:data:`~moba_compile.report.FORMS`); ignored for a blocked call.
        attention_layers, num_layers: as for :func:`layer_decision`.
        blocker: why the call cannot be MoBA (worded from :data:`REASONS` where the case is shared), or None.
        decode: the queries end this layer's cached keys (``Lq < Lk``): ``decode = "dense"`` applies.
        len_k: the key length where known when deciding (the real sequence length of a static cache; a traced call's
            symbolic length counts for ``min_seq_len`` only), else None: ``min_seq_len`` is then applied at run time
            by the op.
        decision: the policy's decision, when the caller has it already (the pass decides a graph that serves several
            layers once for all of them); None: :func:`layer_decision`.

    Returns:
        A :class:`SiteDecision`.

    Raises:
        Nothing: a validated policy always decides.

    Example:
        >>> from moba_compile.policy import load_policy
        >>> policy = load_policy({"chunk_size": 8, "topk": 2, "dense_last": 0, "decode": "dense"})
        >>> decide_site(policy, module="a", layer=0, form="kv-cache", decode=True).reason
        "decode/chunked prefill over the KV cache, and the policy has decode = 'dense'"
    """
    if decision is None:
        decision = layer_decision(policy, module, layer, attention_layers=attention_layers, num_layers=num_layers)

    def dense(why: str, kept_form: Form, by_policy: bool = False) -> SiteDecision:
        return SiteDecision("dense", None, None, why, kept_form, decision, by_policy=by_policy)

    if blocker is not None:
        return dense(blocker, FORM_NONE)
    if decision.mode == "dense":
        return dense(decision.reason, form, by_policy=True)
    if decode and policy.decode == "dense":
        return dense(reason("decode_dense"), form)
    if len_k is not None and len_k < policy.min_seq_len:
        return dense(reason("min_seq_len", len_k=len_k, min_seq_len=policy.min_seq_len), form)
    chunk_size, topk = decision.chunk_size, decision.topk
    notes = [decision.reason]
    if form in _FORM_NOTES:
        notes.append(reason(_FORM_NOTES[form]))
    tail = []
    if len_k is None and policy.min_seq_len > 0:
        tail.append(reason("min_seq_len_at_run_time", min_seq_len=policy.min_seq_len))
    # top-k chunks of chunk_size keys cover a known key length: exactly dense causal attention, nothing saved. Only for
    # a plain int: a symbolic length (a traced Hugging Face call) would gain a guard, and a recompile when it flips.
    covers = isinstance(len_k, int) and topk * chunk_size >= len_k
    if covers:
        tail.append(reason("effectively_dense", topk=topk, chunk_size=chunk_size, len_k=len_k))
    text = "; ".join([*notes, *tail])
    return SiteDecision(
        "moba", chunk_size, topk, text, form, decision, effectively_dense=covers, tail=tuple(tail),
        routing=decision.routing,
    )  # fmt: skip
