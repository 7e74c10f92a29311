"""Hugging Face transformers integration: MoBA as an attention implementation, chosen per layer by the same policy.

``register(policy)`` adds an attention function and its mask function to transformers, so that
``model.set_attn_implementation("moba")`` or ``from_pretrained(..., attn_implementation="moba")`` runs MoBA (the same
``moba::`` ops as the compile backend) in prefill, training and ``generate``, with dynamic and static caches. Layers are
identified by ``module.layer_idx`` and by their module path (``model.layers.3.self_attn``), found in the model that owns
the attention module on its first call; ``report()`` lists what each layer did and why. A call MoBA cannot serve exactly
(a feature keyword it does not implement, a mask that is not causal, keys whose positions are unknown) runs the layer's
own dense attention, and the report says why.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..decisions import SiteDecision, decide_site, layer_decision, mask_kind_reason, reason
from ..ops import Impl
from ..policy import Decision, Policy, load_policy
from ..report import FORM_CAUSAL, FORM_DECODE, FORM_MASK, FORM_PACKED, Report, SiteRecord
from ..validation import check_cu_seqlens
from ._deps import _transformers
from .cache import StaticMeans, static_means

__all__ = ["register", "annotate", "MobaAttention"]

# Keywords the attention function reads itself (above and in _dense_reason).
_HANDLED_KWARGS = frozenset({"dropout", "softcap", "sliding_window", "s_aux", "is_causal", *("cu_seq_lens_q",
                             "cu_seq_lens_k", "max_length_q", "max_length_k")})  # fmt: skip
# Packed documents (DataCollatorWithFlattening(return_flash_attn_kwargs=True)): the documents' boundaries.
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k")
# Keywords transformers' attention modules pass that leave attention unchanged, seen on transformers 5.17 and 5.24
# (Llama, Qwen2, Qwen3, Mistral, Phi3, GPT2, Gemma2, Gemma3, Jamba, T5): output and caching flags, and position ids (a
# key's MoBA position is its index; packed documents come with their block mask, which is classified per call).
_HARMLESS_KWARGS = frozenset(
    {
        "position_ids",
        "cache_position",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
    }
)
# Keywords whose None means "feature off" in transformers' sdpa_attention_forward; any other value is a feature MoBA
# does not implement (a bias added to the scores, a head mask).
_OFF_KWARGS = frozenset({"position_bias", "head_mask", "layer_head_mask"})


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"<{str(value.dtype).replace('torch.', '')} tensor {list(value.shape)}>"
    return repr(value) if isinstance(value, (bool, int, float, str, type(None))) else f"<{type(value).__name__}>"


@dataclass
class _BuiltMask:
    """Where the queries of a mask returned by :meth:`MobaAttention.build_mask` sit in its keys."""

    ref: weakref.ref
    q_offset: int | Tensor  # position of the first query; a device tensor for static caches
    q_length: int
    kv_offset: int  # position of the first key
    kv_length: int
    kinds: dict[tuple[int, int], Tensor] = field(default_factory=dict)  # analyse_mask per (Lq, Lk used)
    spans: dict[tuple[int, int], tuple[int | None, str | None]] = field(default_factory=dict)  # _key_span per (Lq, Lk)


def _built_span(entry: _BuiltMask, mask: Tensor, lq: int, lk: int) -> tuple[int | None, str | None]:
    """``MobaAttention._key_span`` for a mask ``build_mask`` returned: its noted offsets give the sequence's end."""
    kv_offset = int(entry.kv_offset)
    if kv_offset != 0:
        return None, f"the keys start at position {kv_offset} (a windowed cache); MoBA's chunks start at 0"
    if (entry.q_length, entry.kv_length) != (lq, lk) or mask.shape[-1] != lk:
        return None, (
            f"the mask was built for {entry.q_length} queries over {entry.kv_length} keys, the call has {lq} over {lk}"
        )
    real = int(entry.q_offset) + lq  # a device tensor for static caches
    if real > lk:
        return None, f"the queries end at position {real - 1}, past the {lk} keys"
    if real == lk:
        return lk, None
    if bool(mask[..., real:].any()):
        return None, f"the mask lets queries see key slots after the sequence's end ({real} of {lk})"
    return real, reason("static_cache_slots", len_k=real, slots=lk)


@functools.cache
def _mask_signature() -> inspect.Signature:
    return inspect.signature(_transformers()[2])


@dataclass
class MobaAttention:
    """The attention function registered with transformers; call :meth:`report` for what each layer did.

    Attributes:
        policy: the per-layer policy. name: the attention implementation name. impl: ``moba_attention``'s ``impl``.
        skip_cudnn_in_decode: dense layers of a decode step (query shorter than the keys, CUDA) run SDPA without its
            cuDNN backend, which builds an execution graph per key length (see ``_without_cudnn_sdpa``).
    """

    policy: Policy
    name: str = "moba"
    impl: Impl = "auto"
    skip_cudnn_in_decode: bool = True
    _records: dict[tuple[str, int | None, bool], SiteRecord] = field(default_factory=dict)  # by (path, layer, decode)
    _built: dict[int, _BuiltMask] = field(default_factory=dict, repr=False)

    def report(self) -> Report:
        """One record per (module, layer, kind of call), the latest call's: prefill/training and decode apart.

        ``module`` is the attention module's path in the model that owns it (e.g. ``model.layers.3.self_attn``).
        Decisions, reasons and ``form`` values are those of the compile pass for the same call
        (:func:`moba_compile.decisions.decide_site`): ``form`` is ``"kv-cache"`` for a decode step (or chunked
        prefill), ``"is_causal"`` or ``"mask"`` for prefill and training (without or with a mask), ``"-"`` for a call
        MoBA does not serve.
        """
        return Report(sites=list(self._records.values()), policy_source=self.policy.source)

    def _path(self, module: torch.nn.Module) -> str:
        """The module's path in the model owning it, found on its first call (outside torch.compile tracing)."""
        path = getattr(module, "_moba_path", None)
        if path is not None:
            return path
        if not torch.compiler.is_compiling():
            _locate(module)
            return module._moba_path
        rules = [self.policy.describe_rule(i) for i, r in enumerate(self.policy.rules) if r.module is not None]
        if rules:
            raise RuntimeError(
                f"{self.policy.source}: {', '.join(rules)} match module paths, but {type(module).__name__} (layer "
                f"{getattr(module, 'layer_idx', None)}) is first called under torch.compile tracing, where its path "
                "cannot be looked up. Run the model once before compiling it, or call "
                "moba_compile.hf.annotate(model) first."
            )
        return ""

    def _attention_layers(self, module: torch.nn.Module) -> tuple[int, ...] | None:
        """The layer indices of the model's attention layers, which ``dense_last`` and negative indices count.

        A hybrid model has attention in a few decoder layers only (Jamba: 1 and 5 of 8), so ``num_hidden_layers``
        would count the others too. Found once per model (:func:`annotate`): from the config's ``layer_types`` or
        ``layers_block_type`` where present, else the ``layer_idx`` of the modules of the calling module's class.
        """
        found = getattr(module, "_moba_attention_layers", None)
        if found is not None:
            return found
        from_config = _config_attention_layers(getattr(module, "config", None))
        if from_config is not None or not torch.compiler.is_compiling():
            return from_config  # outside tracing, _path located the model: no class-based answer exists
        counted = self.policy.dense_last > 0 or any(
            r.layers is not None and any(i < 0 for i in r.layers) for r in self.policy.rules
        )
        if counted:
            raise RuntimeError(
                f"{self.policy.source}: dense_last / negative layer indices count the model's attention layers, "
                f"but {type(module).__name__} is first called under torch.compile tracing and its config does not "
                "say which decoder layers have attention. Run the model once before compiling it, or call "
                "moba_compile.hf.annotate(model) first."
            )
        return None

    def reset_report(self) -> None:
        """Forget the recorded decisions: :meth:`report` then lists only the calls made after this one.

        Records are kept per module path, so a second model's report would otherwise also list the first model's
        layers that the second does not have.

        Example:
            >>> attention.reset_report()  # doctest: +SKIP
            >>> model.generate(ids, max_new_tokens=8)  # doctest: +SKIP
            >>> print(attention.report())  # this generation only  # doctest: +SKIP
        """
        self._records.clear()

    def layer_decision(self, module: torch.nn.Module) -> tuple[str, int | None, Decision]:
        """What the policy says for the layer of ``module``: ``(path, layer, decision)``.

        ``path`` is the module's path in the model ("" where it cannot be known: first called under tracing with a
        policy that has no module rules); ``layer`` its ``layer_idx``; ``decision`` the policy's
        :class:`~moba_compile.policy.Decision` (attention layers counted as :meth:`Policy.decide` counts them).
        The one place both this attention function and :mod:`moba_compile.context_parallel` ask it.

        Raises:
            RuntimeError: a rule needs the module path or the attention-layer count, and the module is first called
                under torch.compile tracing (run the model once first, or ``moba_compile.hf.annotate(model)``).

        Example:
            >>> path, layer, decision = attention.layer_decision(model.model.layers[0].self_attn)  # doctest: +SKIP
            >>> decision.mode  # doctest: +SKIP
            'moba'
        """
        layer = getattr(module, "layer_idx", None)
        path = self._path(module)
        num_layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
        decision = layer_decision(
            self.policy, path, layer, attention_layers=self._attention_layers(module), num_layers=num_layers
        )
        return path, layer, decision

    def dense_reason(
        self, module: torch.nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, kwargs: dict[str, Any]
    ) -> str | None:
        """Why this call cannot be MoBA (soft-capping, a sliding window, sinks, dropout, non-causal...), worded as the
        compile pass words the same case, or ``None``. ``kwargs``: the call's keyword arguments, ``dropout`` included.

        Example:
            >>> attention.dense_reason(module, q, k, None, {"dropout": 0.1}) is not None  # doctest: +SKIP
            True
        """
        return self._dense_reason(module, query, key, mask, kwargs)

    def record(self, module: torch.nn.Module, layer: int | None, decided: SiteDecision, notes: list[str]) -> None:
        """Add a prefill/training call's decision to :meth:`report` (the latest call per module and layer wins).

        Example:
            >>> attention.record(module, 0, decided, ["context parallel"])  # doctest: +SKIP
        """
        self._record(module, layer, False, decided, notes)

    def _record(
        self, module: torch.nn.Module, layer: int | None, decode: bool, decided: SiteDecision, notes: list[str]
    ) -> None:
        # The module path where it is known (it always is outside torch.compile tracing), else the class name.
        path = getattr(module, "_moba_path", None) or type(module).__name__
        self._records[(path, layer, decode)] = decided.record(path, layer, notes)

    def _dense_reason(self, module: torch.nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, kw: dict):
        """Why this call cannot be MoBA (worded as the compile pass words the same case), or None."""
        if kw.get("softcap") is not None:
            return reason("softcap")
        if kw.get("sliding_window") is not None:
            return reason("sliding_window", window=kw["sliding_window"])
        if getattr(module, "sinks", None) is not None or kw.get("s_aux") is not None:
            return reason("sinks")
        # A keyword is_causal overrides the module's attribute, as in transformers' sdpa_attention_forward.
        if kw.get("is_causal") is not None:
            causal, how = kw["is_causal"], "is_causal=False given: bidirectional"
        else:
            causal, how = (
                getattr(module, "is_causal", True),
                f"{type(module).__name__}.is_causal is False: bidirectional",
            )
        if not causal:
            return reason("non_causal", how=how)
        if kw.get("dropout", 0.0):
            return reason("dropout", p=kw["dropout"])
        if mask is not None and mask.dtype != torch.bool:
            return reason("float_mask", dtype=mask.dtype)
        if query.shape[1] % key.shape[1] != 0:
            return reason("heads", hq=query.shape[1], hkv=key.shape[1])
        if any(kw.get(name) is not None for name in _PACKED_KWARGS):
            why = _packed_blocker(query, key, kw)
            if why is not None:
                return f"cu_seq_lens_q/cu_seq_lens_k (packed documents): {why}; dense attention"
        unknown = [
            name
            for name, value in kw.items()
            if name not in _HANDLED_KWARGS
            and name not in _HARMLESS_KWARGS
            and not (name in _OFF_KWARGS and value is None)
        ]
        if unknown:
            # An attention feature this function does not implement (T5's relative position_bias was dropped once):
            # run the layer's own dense attention, which honours it.
            described = ", ".join(f"{name}={_describe(kw[name])}" for name in sorted(unknown))
            return (
                f"{type(module).__name__} passes {described}, which MoBA does not implement; dense attention honours it"
            )
        return None

    def build_mask(self, *args: Any, **kwargs: Any) -> Tensor | None:
        """The mask function registered with this attention: transformers' ``sdpa_mask``, noting the mask's layout.

        It also notes, for the mask it returns, where the queries sit in the keys (``q_offset``, ``kv_offset``, the
        lengths): a static cache hands the attention a buffer of ``max_cache_len`` key slots, of which only the first
        ``q_offset + q_length`` hold the sequence, and nothing else tells the attention function where that ends.
        Outside torch.compile tracing the mask is returned contiguous (``generate`` would copy it otherwise, and the
        note is kept on the tensor object).

        Args:
            *args, **kwargs: ``sdpa_mask``'s (``batch_size``, ``q_length``, ``kv_length``, ``q_offset`` (an int, or a
                device tensor for static caches), ``kv_offset``, ``mask_function``, ``attention_mask`` (the 2D padding
                mask), ...), as transformers' ``create_causal_mask`` passes them.

        Returns:
            A boolean mask ``[B, 1, q_length, kv_length]`` (True = may attend) on ``device``, or None where SDPA's
            ``is_causal`` stands for it.

        Raises:
            ValueError: a step that does not fit a static cache (a prompt longer than ``max_cache_len``, or a step
                past its end), before the cache's update would fail on an index (on CUDA, a device-side assert).
            Whatever ``sdpa_mask`` raises for its arguments.

        Example:
            >>> attention = register({"chunk_size": 8, "topk": 2}, name="moba_doc")  # doctest: +SKIP
            >>> padding = torch.ones(1, 9, dtype=torch.bool)
            >>> attention.build_mask(batch_size=1, q_length=1, kv_length=24, q_offset=torch.tensor(8),
            ...                      attention_mask=padding).shape  # doctest: +SKIP
            torch.Size([1, 1, 1, 24])
        """
        _, _, sdpa_mask, _ = _transformers()
        if not torch.compiler.is_compiling():
            _check_fits_static_cache(_mask_signature().bind(*args, **kwargs).arguments)
        mask = sdpa_mask(*args, **kwargs)
        if isinstance(mask, Tensor) and not torch.compiler.is_compiling():
            # generate() makes the mask of a static cache's step contiguous before the forward, which copies an
            # expanded one: the note is kept on the object, so hand over the tensor that will be used.
            mask = mask.contiguous()
            self._remember(mask, _mask_signature().bind(*args, **kwargs).arguments)
        return mask

    def _remember(self, mask: Tensor, arguments: dict[str, Any]) -> None:
        built = self._built

        def forget(ref: weakref.ref, key: int = id(mask)) -> None:
            if key in built and built[key].ref is ref:
                del built[key]

        q_offset = arguments.get("q_offset", 0)
        if isinstance(q_offset, Tensor):
            # A static cache's length counter, which each layer's cache update then increments in place: keep the
            # value it has now, when the mask is built for this forward (a device copy, no synchronisation).
            q_offset = q_offset.clone()
        built[id(mask)] = _BuiltMask(
            ref=weakref.ref(mask, forget),
            q_offset=q_offset,
            q_length=arguments["q_length"],
            kv_offset=arguments.get("kv_offset", 0),
            kv_length=arguments["kv_length"],
        )

    def _built_entry(self, mask: Tensor) -> _BuiltMask | None:
        if torch.compiler.is_compiling():
            return None
        entry = self._built.get(id(mask))
        # A live weak reference to this very object: the mask build_mask returned (ids alone can be reused).
        return entry if entry is not None and entry.ref() is mask else None

    def _key_span(self, query: Tensor, key: Tensor, mask: Tensor | None) -> tuple[int | None, str | None]:
        """How many of the keys hold the sequence the queries end: ``(length, note)``, or ``(None, why dense)``.

        MoBA places query row ``i`` at position ``length - Lq + i`` and averages chunks of keys from position 0, so it
        needs the keys to be the sequence up to the last query. A dynamic cache hands exactly those. A static cache
        hands its whole buffer (``max_cache_len`` slots, the empty ones masked out), which read as the sequence put
        the query of a decode step at the buffer's last slot (off by 0.15 on 9 real keys of 24).
        """
        lq, lk = query.shape[2], key.shape[2]
        if mask is None:
            if lq == lk or lq == 1:  # causal prefill, or a decode step over every key
                return lk, None
            if lq < lk:
                # transformers' SDPA reads no mask with several queries as is_causal, aligned to the first key: only
                # an empty static cache's prefill leaves the mask out there.
                return lq, f"static-cache prefill: no mask, the first {lq} of {lk} key slots"
            return None, f"{lq} queries over {lk} keys without a mask: not MoBA's causal layout"
        entry = self._built_entry(mask)
        if entry is not None:
            # Once per mask, as its classification (see _mask_kind): reading a static cache's offset synchronises.
            if (lq, lk) not in entry.spans:
                entry.spans[(lq, lk)] = _built_span(entry, mask, lq, lk)
            return entry.spans[(lq, lk)]
        if lq == lk:
            return lk, None  # the queries end the keys: nothing after them
        if torch.compiler.is_compiling():
            if static_means(key) is not None and mask.dtype == torch.bool:
                if self.policy.min_seq_len > 0:
                    return None, (
                        f"min_seq_len {self.policy.min_seq_len} on a static cache under torch.compile: the length is "
                        "only on the device there, so which side of it a step falls cannot be decided"
                    )
                # A static cache's buffer seen by an eager step before (its prefill): the graph-safe path reads the
                # length from the mask on the device (ops.static_length_from_mask); all slots are handed to the op.
                return lk, _STATIC_NOTE
            return None, (
                f"{lq} queries over {lk} keys with a mask under torch.compile: whether the keys are the sequence or a "
                "static cache's buffer can only be read from the data, and no eager step (a prefill outside "
                "torch.compile, as generate runs it) set this buffer up for the graph-safe static-cache path"
            )
        # A mask transformers did not build through build_mask (a 4D mask passed to the model, say). If some query
        # sees the key at its bottom-right position, the keys end with the queries (causality bounds every row by
        # its position); otherwise trailing slots may be a static cache's empty ones, and the positions are unknown.
        rows = torch.arange(lq, device=mask.device)
        own = mask.expand(*mask.shape[:-2], lq, lk)[..., rows, rows + (lk - lq)]
        if bool(own.any()):
            return lk, None
        return None, (
            f"no query sees the key at its own position if the {lk} keys were the sequence: they may be a static "
            "cache's buffer, whose real length this mask (not built by moba_compile.hf) does not give"
        )

    def _mask_kind(self, given: Tensor, mask: Tensor, query: Tensor, key: Tensor) -> Tensor:
        """``moba::analyse_mask`` of ``mask`` (``given`` cut to the keys used) against the query and key lengths.

        Every call is classified from the mask it is given, except masks :meth:`build_mask` returned: transformers
        builds one per forward and hands that same tensor, which no user code holds, unchanged to every layer, so
        their classification is kept on the object (for as long as it lives) rather than re-read per layer. (A cache
        keyed on the storage, shape and version counter of any mask was wrong twice: inference tensors have no
        version counter, and a buffer refilled in place through numpy keeps all three with new content.)
        """
        entry = self._built_entry(given)
        lengths = (query.shape[2], key.shape[2])
        if entry is not None and lengths in entry.kinds:
            return entry.kinds[lengths]
        kind = torch.ops.moba.analyse_mask(mask, query, key, "")
        if entry is not None:
            entry.kinds[lengths] = kind
        return kind

    def __call__(
        self,
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        """transformers' attention-function protocol: ``[B, H, L, D]`` in, ``([B, Lq, Hq, Dv], None)`` out."""
        path, layer, decision = self.layer_decision(module)
        blocker = self._dense_reason(module, query, key, attention_mask, {"dropout": dropout, **kwargs})
        span, note = None, None
        if blocker is None and decision.mode == "moba":
            # Where the sequence ends in the keys: read only for a call that may run MoBA (it may read the mask).
            span, note = self._key_span(query, key, attention_mask)
            if span is None:
                blocker = note
        real = key.shape[2] if span is None else span
        decode = query.shape[2] < real
        form = FORM_DECODE if decode else FORM_CAUSAL if attention_mask is None else FORM_MASK
        # Dense or MoBA, and why, in the words the compile pass uses too (moba_compile.decisions).
        decided = decide_site(
            self.policy,
            module=path,
            layer=layer,
            form=form,
            blocker=blocker,
            decode=decode,
            len_k=real,
            decision=decision,
        )
        # The dense path always gets the inputs as given: transformers' own attention over them is the right result.
        dense_args = (module, layer, decode, query, key, value, attention_mask, dropout, scaling, kwargs)
        if decided.mode == "dense":
            if blocker is None and attention_mask is None and kwargs.get("cu_seq_lens_q") is not None:
                # Dense by policy, packed documents given by their boundaries only: SDPA would attend across them.
                return self._dense_documents(decided, dense_args, kwargs["cu_seq_lens_q"])
            # Dense by the policy (nothing about the call rules MoBA out): dense_decode = "split_k" may serve it.
            return self._dense_call(decided, *dense_args, by_policy=blocker is None)
        assert decided.chunk_size is not None and decided.topk is not None  # a MoBA decision has both
        device_type = query.device.type
        if torch.is_autocast_enabled(device_type):
            # transformers' SDPA path would run in the autocast dtype (it may hand over fp32 q/k with a bf16 v).
            dtype = torch.get_autocast_dtype(device_type)
            query, key, value = (t if t.dtype == dtype else t.to(dtype) for t in (query, key, value))
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is not None and attention_mask is None:
            # Packed documents given by their boundaries (no mask to agree with): every document is MoBA on its own.
            out = ops.packed_attention(
                query, key, value, cu_seqlens.to(query.device), chunk_size=decided.chunk_size, topk=decided.topk,
                scale=scaling, impl=self.impl, routing=decided.routing or "head",
            )  # fmt: skip
            self._record(module, layer, decode, replace(decided, form=FORM_PACKED), [_PACKED_NOTE])
            return out.transpose(1, 2).contiguous(), None
        full_key, full_value = key, value
        compiling = torch.compiler.is_compiling()
        # A static cache's key buffer (slots after the sequence), or one an earlier step found to be one.
        state = static_means(key, create=not compiling and real < key.shape[2])
        mask = attention_mask
        if real < key.shape[2]:
            # Slots after the sequence (a static cache's empty ones) are never attended; cut them so that MoBA's
            # bottom-right positions are the queries' real positions.
            key, value = key[:, :, :real], value[:, :, :real]
            if mask is not None and mask.shape[-1] != 1:
                mask = mask[..., :real]
        static_step = (
            state is not None
            and (compiling or query.shape[2] == 1)
            and attention_mask is not None
            and attention_mask.dtype == torch.bool
        )
        # Under torch.compile the static path takes transformers' mask as built (classifying it would cost a pass over
        # it per layer and step, and its verdict could not be acted on without a host read).
        classify = mask is not None and not (compiling and static_step)
        kind = self._mask_kind(attention_mask, mask, query, key) if classify else None
        dense_kind = None if kind is None or compiling else mask_kind_reason(int(kind))
        if dense_kind is not None:
            # The op would run dense SDPA with this mask itself; here the kind is known, so the report can say so.
            return self._dense_call(decided.dense(dense_kind), *dense_args)
        if kind is not None and not compiling and int(kind) == ops.MASK_DOCUMENTS:
            decided = replace(decided, form=FORM_PACKED)  # the mask is packed documents: MoBA runs per document
            if cu_seqlens is not None and ops.documents_from_mask(mask, query.shape[2]).tolist() != cu_seqlens.tolist():
                why = "cu_seq_lens_q/cu_seq_lens_k (packed documents) disagree with the attention mask's documents"
                return self._dense_call(decided.dense(f"{why}; dense attention with the mask"), *dense_args)
        elif cu_seqlens is not None and not compiling and not (kind == ops.MASK_CAUSAL and cu_seqlens.numel() == 2):
            why = "cu_seq_lens_q/cu_seq_lens_k (packed documents) come with a mask that is not their documents' mask"
            return self._dense_call(decided.dense(f"{why}; dense attention with the mask"), *dense_args)
        if static_step:
            assert state is not None and attention_mask is not None  # static_step says so
            args = (state, decided, real, query, full_key, full_value, attention_mask, note, dense_args)
            return self._static_call(*args)
        means = None
        layer_ref = getattr(full_key, "_moba_cache_layer", None)
        if decode and key is full_key and layer_ref is not None and layer_ref() is not None:
            means = layer_ref().chunk_means(decided.chunk_size, key, self.impl)
        out = ops.attention(
            query,
            key,
            value,
            chunk_size=decided.chunk_size,
            topk=decided.topk,
            scale=scaling,
            attn_mask=mask,
            mask_kind=kind,
            impl=self.impl,
            chunk_means=means,
            routing=decided.routing or "head",
        )
        notes = [] if note is None else [note]  # what only this path knows, after the shared reason
        if decided.form == FORM_PACKED:
            notes.append(ops.MASK_DOCUMENTS_NOTE)
        if state is not None and not compiling:
            # A static cache's prefill (or chunked prefill) ran on the keys it holds: average its complete chunks once,
            # so the decode steps (compiled or not) read and extend the means buffer.
            state.fill(full_key, real, decided.chunk_size, self.impl)
            notes.append(_STATIC_FILL_NOTE)
        elif decode:
            notes.append(reason("means_from_cache" if means is not None else "means_from_keys"))
        self._record(module, layer, decode, decided, notes)
        return out.transpose(1, 2).contiguous(), None

    def _static_call(
        self,
        state: StaticMeans,
        decided: SiteDecision,
        real: int,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor,
        note: str | None,
        dense_args: tuple,
    ) -> tuple[Tensor, Any]:
        """A step over a static cache's whole buffers, graph-safe: the length read on the device from the mask, the
        chunk means kept in the layer's buffer (``moba::update_static_chunk_means_``, ``moba::static_decode``)."""
        module, layer, decode = dense_args[0], dense_args[1], dense_args[2]
        chunk_size, topk = decided.chunk_size, decided.topk
        assert chunk_size is not None and topk is not None  # a MoBA decision has both
        if chunk_size not in state.ready:
            if torch.compiler.is_compiling():
                why = (
                    f"static cache: the chunk means (chunk size {chunk_size}) were not set up by an eager step; run "
                    "the prefill outside torch.compile (generate does), then compiled decode steps keep them"
                )
                return self._dense_call(decided.dense(why), *dense_args)
            state.fill(key, real, chunk_size, self.impl)  # eager: the keys before and of this step, O(real) once
        means = state.buffers[chunk_size]
        # transformers' static-cache masks allow each query the non-padding slots up to its own position.
        length = ops.static_length_from_mask(attention_mask, query.shape[0], impl=self.impl)
        ops.update_static_chunk_means_(
            means, key, length, new_tokens=query.shape[2], chunk_size=chunk_size, impl=self.impl
        )
        out = ops.static_decode(
            query,
            key,
            value,
            chunk_means=means,
            length=length,
            chunk_size=chunk_size,
            topk=topk,
            scale=dense_args[8],
            attn_mask=attention_mask,
            impl=self.impl,
            routing=decided.routing or "head",
        )
        notes = [] if note is None or note == _STATIC_NOTE else [note]
        self._record(module, layer, decode, decided, [*notes, _STATIC_NOTE])
        return out.transpose(1, 2).contiguous(), None

    def _dense_documents(self, decided: SiteDecision, dense_args: tuple, cu_seqlens: Tensor) -> tuple[Tensor, Any]:
        """A dense layer on packed documents given by ``cu_seq_lens_q`` only: dense causal attention per document."""
        module, layer, decode, query, key, value, _, _, scaling, _ = dense_args
        if torch.compiler.is_compiling():
            # No host read in a graph: MoBA with every earlier chunk selected is dense causal attention, per document.
            out = ops.packed_attention(
                query, key, value, cu_seqlens.to(query.device), chunk_size=max(8192, -(-key.shape[2] // 16) * 16),
                topk=1, scale=scaling, impl=self.impl,
            )  # fmt: skip
        else:
            bounds = cu_seqlens.tolist()
            gqa = query.shape[1] != key.shape[1]
            out = torch.cat(
                [
                    torch.nn.functional.scaled_dot_product_attention(
                        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling,
                        enable_gqa=gqa,
                    )
                    for s, e in zip(bounds[:-1], bounds[1:])
                ],
                dim=2,
            )  # fmt: skip
        self._record(module, layer, decode, replace(decided, form=FORM_PACKED), [_DENSE_PACKED_NOTE])
        return out.transpose(1, 2).contiguous(), None

    def _dense_call(
        self,
        decided: SiteDecision,
        module: torch.nn.Module,
        layer: int | None,
        decode: bool,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float,
        scaling: float | None,
        kwargs: dict[str, Any],
        *,
        by_policy: bool = False,
    ) -> tuple[Tensor, Any]:
        """Record the site as dense (``decided``) and run the layer's own dense attention on the inputs as given.

        ``by_policy``: the site is dense by the policy alone (no blocker); a one-query decode step of such a site
        runs ``moba::dense_decode`` instead of SDPA under the policy's ``dense_decode = "split_k"`` (the default)
        where the split-K kernels take its inputs (:meth:`_split_k_blocker`), and the report says which ran.
        """
        state = static_means(key)
        if state is not None and not torch.compiler.is_compiling():
            state.ready.clear()  # this step's keys were not averaged: the next MoBA step refills the means
        if by_policy and decode and query.shape[2] == 1:
            # A one-query decode step of a layer dense by the policy: the policy's dense_decode says how it runs, and
            # the report says which path ran.
            why_not = self._split_k_blocker(query, key, value, attention_mask, dropout)
            if why_not is None:
                # Dense attention of the last position, which a boolean mask gives per row. From transformers' mask,
                # one past the last slot the query may see is the row's length on a static cache's buffer (its empty
                # slots are then never read, unlike SDPA's masked read of every slot) and the key count on a dynamic
                # cache; read on the device (ops.static_length_from_mask), so the step stays graph-safe. No mask (a
                # dynamic cache without padding): every key is the sequence.
                length = None
                if attention_mask is not None:
                    length = ops.static_length_from_mask(attention_mask, query.shape[0], impl=self.impl)
                out = ops.dense_decode(
                    query, key, value, length=length, scale=scaling, attn_mask=attention_mask, impl=self.impl
                )
                how = "all keys" if attention_mask is None else "length read from the mask on the device"
                split_k = replace(decided, reason=f"{decided.reason}; {reason('dense_split_k', how=how)}")
                self._record(module, layer, decode, split_k, [])
                return out.transpose(1, 2).contiguous(), None
            decided = replace(decided, reason=f"{decided.reason}; {why_not}")
        self._record(module, layer, decode, decided, [])
        # Eager decode only: the backend flags cannot be read inside a Dynamo graph (fullgraph=True would fail), and a
        # compiled step runs on a static cache, whose fixed key length never makes cuDNN rebuild a graph.
        skip_cudnn = (
            self.skip_cudnn_in_decode and decode and query.device.type == "cuda" and not torch.compiler.is_compiling()
        )
        with _without_cudnn_sdpa() if skip_cudnn else contextlib.nullcontext():
            return _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs)

    def _split_k_blocker(
        self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, dropout: float
    ) -> str | None:
        """None when ``moba::dense_decode``'s split-K kernels serve this one-query dense step under the policy's
        ``dense_decode``; else the report's note on why the step keeps its SDPA call.

        Served: ``dense_decode = "split_k"`` (the default), no dropout, no mask or a boolean 4-D one (what
        ``static_length_from_mask`` reads: transformers' ``[B, 1, 1, Lk]``), one dtype for query, key and value, no
        autocast (SDPA would cast; the op takes its inputs as they are), and inputs the kernels take under the
        attention's ``impl`` (:func:`moba_compile.ops.split_k_unsupported_reason`: CUDA, head dims 64/128,
        fp16/bf16/fp32). Every check reads metadata only, so a compiled step decides it once, at trace time.
        """
        if self.policy.dense_decode == "sdpa":
            return reason("dense_decode_sdpa")
        if dropout:
            why = f"dropout {dropout}"
        elif mask is not None and (mask.dtype != torch.bool or mask.dim() != 4):
            why = f"a {str(mask.dtype).removeprefix('torch.')} mask of {mask.dim()} dims, not a 4-D boolean one"
        elif not query.dtype == key.dtype == value.dtype:
            why = f"query, key and value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})"
        elif torch.is_autocast_enabled(query.device.type):
            why = "autocast is on"
        else:
            why = ops.split_k_unsupported_reason(query, key, value, mask, impl=self.impl)
        return None if why is None else reason("dense_split_k_not", why=why)


_PACKED_NOTE = "packed documents (cu_seq_lens_q): MoBA per document"
_DENSE_PACKED_NOTE = "packed documents (cu_seq_lens_q): dense causal attention per document"


def _packed_blocker(query: Tensor, key: Tensor, kw: dict[str, Any]) -> str | None:
    """Why ``cu_seq_lens_q``/``cu_seq_lens_k`` cannot be served as packed documents, or None.

    Both must be given, for one packed row (``B = 1``) of queries that are its keys (no cache), and, outside
    torch.compile (where reading them would need a host synchronisation in the graph), be the same valid boundaries.
    """
    cu_q, cu_k = kw.get("cu_seq_lens_q"), kw.get("cu_seq_lens_k")
    if not isinstance(cu_q, Tensor) or not isinstance(cu_k, Tensor):
        return "only one of them is given" if cu_q is None or cu_k is None else "they are not tensors"
    if query.shape[2] != key.shape[2]:
        return f"{query.shape[2]} queries over {key.shape[2]} keys (a cache step runs per sequence)"
    if query.shape[0] != 1:
        return f"a batch of {query.shape[0]} rows (packed documents come in one row)"
    if cu_q.shape != cu_k.shape:
        return f"their shapes differ ({list(cu_q.shape)} and {list(cu_k.shape)})"
    if torch.compiler.is_compiling():
        return None  # the op checks cu_seq_lens_q against the length at run time
    try:
        check_cu_seqlens(cu_q, query.shape[2])
    except (TypeError, ValueError) as err:
        return str(err)
    if not torch.equal(cu_q.cpu(), cu_k.cpu()):
        return "they differ (queries and keys are one packed sequence)"
    return None


_STATIC_NOTE = "static cache: graph-safe step (length read on the device, chunk means kept in a buffer)"
_STATIC_FILL_NOTE = "static cache: chunk means of the prefill kept for the decode steps"


def _check_fits_static_cache(arguments: dict[str, Any]) -> None:
    """Raise if a step's queries do not fit a full-attention static cache (eager only: a static cache's ``q_offset``
    is a device tensor, whose read costs one synchronisation per forward, as ``_built_span``'s does)."""
    from transformers.masking_utils import causal_mask_function  # imported by register() already: not traced here

    q_offset, kv_offset = arguments.get("q_offset", 0), arguments.get("kv_offset", 0)
    full = arguments.get("mask_function", causal_mask_function) is causal_mask_function
    if not full or arguments.get("local_size") is not None or kv_offset != 0:
        return  # a sliding window's rolling buffer (or another mask), where the offsets mean something else
    # A dynamic cache's keys always end with the queries (kv_length = past + q_length): only a fixed buffer overflows.
    end, slots = int(q_offset) + arguments["q_length"], arguments["kv_length"]
    if end > slots:
        raise ValueError(
            f"the step's {arguments['q_length']} tokens at position {int(q_offset)} end at {end}, past the static "
            f"cache's {slots} slots (max_cache_len): use a larger max_cache_len, or a dynamic cache"
        )


def _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs) -> tuple[Tensor, Any]:
    """The layer's own dense attention: its model file's eager function for soft-capping or sinks, else SDPA."""
    _, _, _, sdpa_attention_forward = _transformers()
    needs_eager = kwargs.get("softcap") is not None or getattr(module, "sinks", None) is not None
    eager: Callable | None = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if needs_eager and eager is not None:
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            # Eager attention functions add the mask to the scores: they take the additive form.
            low = torch.finfo(query.dtype).min
            attention_mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~attention_mask, low)
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _without_cudnn_sdpa() -> Any:
    """SDPA with the backends the user left enabled, minus cuDNN's: for decode steps over a growing KV cache.

    cuDNN's SDPA builds an execution graph per key length. Measured on an H100 (torch 2.11): a GQA decode call at a new
    length cost ~490 ms of host time through cuDNN and 0.73 ms through the flash kernel, so a dense layer in a decode
    loop would pay a graph build per token. The remaining backends compute the same attention.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enabled = [
        backend
        for backend, on in (
            (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
            (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
            (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled()),
        )
        if on
    ]
    return sdpa_kernel(enabled) if enabled else contextlib.nullcontext()


def register(policy: str | dict | Policy | None = None, name: str = "moba", impl: Impl = "auto") -> MobaAttention:
    """Register MoBA with transformers as the attention implementation ``name``.

    Args:
        policy: policy file path, dict, :class:`moba_compile.Policy` or None (default policy: chunk 4096, top-k 12,
            last 3 layers dense). Layers are matched by ``module.layer_idx``; ``module`` rules match the attention
            module's path in the model that owns it (``model.layers.3.self_attn``), found on its first call; under
            torch.compile tracing that lookup cannot run, so a model compiled before any eager call needs
            :func:`annotate` first when the policy has ``module`` rules (else the call raises).
        name: the name to pass to ``attn_implementation`` / ``set_attn_implementation``.
        impl: as in :func:`moba_compile.moba_attention`.

    Returns:
        The registered :class:`MobaAttention`; its ``report()`` lists what each layer did. Its ``build_mask`` is
        registered as the mask function (``sdpa_mask``'s masks, with their layout noted for static caches).

    Raises:
        ImportError: transformers is not installed. moba_compile.PolicyError: malformed policy.

    Example:
        >>> import moba_compile.hf  # doctest: +SKIP
        >>> attn = moba_compile.hf.register(policy="policy.toml")  # doctest: +SKIP
        >>> model.set_attn_implementation("moba")  # doctest: +SKIP
        >>> model.generate(input_ids, max_new_tokens=20)  # doctest: +SKIP
        >>> print(attn.report())  # doctest: +SKIP
    """
    attention_interface, mask_interface, _, _ = _transformers()
    fn = MobaAttention(policy=load_policy(policy), name=name, impl=impl)
    attention_interface.register(name, fn)
    # Boolean masks, or None where the mask is purely causal (sdpa_mask's), noting where the queries sit in the keys.
    mask_interface.register(name, fn.build_mask)
    return fn


def annotate(model: torch.nn.Module) -> torch.nn.Module:
    """Record each attention module's dotted path in ``model`` on it, for policy ``module`` rules and reports.

    Not needed in general: on its first call outside torch.compile tracing, an attention module's path is found in
    the outermost model that holds it (:func:`_locate`). Call it to name paths relative to ``model`` instead, or before
    compiling a model whose attention is first called under torch.compile (where paths cannot be looked up).

    Args:
        model: the model; every submodule with a ``layer_idx`` attribute (transformers' attention modules) is named,
            and given the layer indices of the model's attention layers (see ``MobaAttention._attention_layers``).

    Returns:
        ``model``.

    Example:
        >>> model = annotate(model)  # doctest: +SKIP
    """
    by_class: dict[type, set[int]] = {}
    for path, sub in model.named_modules(remove_duplicate=False):
        if hasattr(sub, "layer_idx"):
            sub._moba_path = path
            if isinstance(sub.layer_idx, int):
                by_class.setdefault(type(sub), set()).add(sub.layer_idx)
    for sub in model.modules():
        if hasattr(sub, "layer_idx"):
            from_config = _config_attention_layers(getattr(sub, "config", None))
            # Modules of one class are one kind of layer (a hybrid's mamba mixers carry a layer_idx too).
            sub._moba_attention_layers = from_config if from_config is not None else tuple(sorted(by_class[type(sub)]))
    return model


# Layer types (transformers' config.layer_types) whose layers run softmax attention, and those whose layers do not.
_ATTENTION_LAYER_TYPES = frozenset(
    {
        "full_attention",
        "sliding_attention",
        "chunked_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "indexed_attention",
        "minimax_m3_sparse",
        "hybrid",
        "hybrid_sliding",
        "attention",
    }
)
_OTHER_LAYER_TYPES = frozenset({"linear_attention", "conv", "mamba", "mamba2", "mlp", "recurrent", "rwkv"})


def _config_attention_layers(config: Any) -> tuple[int, ...] | None:
    """Attention layer indices from ``config.layer_types`` / ``layers_block_type``; None if it says nothing certain."""
    for name in ("layer_types", "layers_block_type"):
        try:
            types = getattr(config, name, None)
        except Exception:  # a derived property of a config missing its inputs
            types = None
        if isinstance(types, (list, tuple)) and types and all(isinstance(t, str) for t in types):
            if all(t in _ATTENTION_LAYER_TYPES or t in _OTHER_LAYER_TYPES for t in types):
                return tuple(i for i, t in enumerate(types) if t in _ATTENTION_LAYER_TYPES)
    return None


def _locate(module: torch.nn.Module) -> None:
    """Name every attention module of the models holding ``module`` (its outermost owners), ``module`` included.

    transformers hands the attention function the module but not the model, so the owners are found among the live
    modules: one pass over the garbage collector's objects (~0.2 s with transformers imported), once per model, as the
    other attention modules of that model are named at the same time. A module held by several models gets its path in
    the first; :func:`annotate` chooses explicitly.
    """
    parents: dict[int, list[torch.nn.Module]] = {}
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads __class__, which some lazily imported objects answer with a
        # deprecation warning.
        if issubclass(type(obj), torch.nn.Module):
            for child in obj._modules.values():
                if child is not None:
                    parents.setdefault(id(child), []).append(obj)
    roots, seen, todo = [], {id(module)}, [module]
    while todo:
        node = todo.pop()
        owners = parents.get(id(node), [])
        if not owners:
            roots.append(node)
        for owner in owners:
            if id(owner) not in seen:
                seen.add(id(owner))
                todo.append(owner)
    for root in reversed(roots):  # the first root's paths win
        annotate(root)
        for path, sub in root.named_modules(remove_duplicate=False):
            if type(sub) is type(module):  # an attention class without layer_idx: name its other instances too
                sub._moba_path = path
    if getattr(module, "_moba_path", None) is None:  # unreachable in practice: a root names itself ""
        module._moba_path = ""
