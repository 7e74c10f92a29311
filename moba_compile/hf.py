"""Hugging Face transformers integration: MoBA as an attention implementation, chosen per layer by the same policy.

``register(policy)`` adds an attention function and its mask function to transformers, so that
``model.set_attn_implementation("moba")`` or ``from_pretrained(..., attn_implementation="moba")`` runs MoBA (the same
``moba::`` ops as the compile backend) in prefill, training and ``generate``. Layers are identified by
``module.layer_idx``; the layer count is ``config.num_hidden_layers`` unless the policy sets ``num_layers``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import ops
from .policy import Policy, load_policy
from .report import Report, SiteRecord

__all__ = ["register", "MobaAttention"]


def _transformers():
    try:
        import transformers  # noqa: F401
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:  # an optional extra
        raise ImportError("moba_compile.hf needs transformers: pip install 'moba-compile[hf]'") from exc
    return AttentionInterface, AttentionMaskInterface, sdpa_mask, sdpa_attention_forward


@dataclass
class MobaAttention:
    """The attention function registered with transformers; call :meth:`report` for what each layer did.

    Attributes:
        policy: the per-layer policy. name: the attention implementation name. impl: ``moba_attention``'s ``impl``.
    """

    policy: Policy
    name: str = "moba"
    impl: str = "auto"
    _records: dict[tuple[int | None, str], SiteRecord] = field(default_factory=dict)
    _mask_cache: tuple[tuple, Tensor] | None = None

    def report(self) -> Report:
        """One record per (layer, kind of call), the latest call's: prefill/training and decode are listed apart."""
        return Report(sites=list(self._records.values()), policy_source=self.policy.source)

    def _record(self, module: torch.nn.Module, layer: int | None, decode: bool, **fields: Any) -> None:
        form = "decode" if decode else "prefill"
        path = getattr(module, "_moba_path", type(module).__name__)
        self._records[(layer, form)] = SiteRecord(module=path, layer=layer, form=form, **fields)

    def _dense_reason(self, module: torch.nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, kw: dict):
        if kw.get("softcap") is not None:
            return "attention logits are soft-capped (not MoBA)"
        if kw.get("sliding_window") is not None:
            return f"sliding-window layer (window {kw['sliding_window']}): not MoBA"
        if getattr(module, "sinks", None) is not None or kw.get("s_aux") is not None:
            return "attention sinks (not MoBA)"
        if not getattr(module, "is_causal", True) or kw.get("is_causal") is False:
            return "bidirectional (non-causal) attention"
        if kw.get("dropout", 0.0):
            return f"dropout={kw['dropout']} (not MoBA)"
        if mask is not None and mask.dtype != torch.bool:
            return f"float (additive) mask ({mask.dtype}), not MoBA"
        if query.shape[1] % key.shape[1] != 0:
            return "query heads are not a multiple of key heads"
        return None

    def _mask_kind(self, mask: Tensor, query: Tensor, key: Tensor) -> Tensor:
        # Every layer of a forward gets the same mask tensor: analyse it once (outside torch.compile tracing).
        if torch.compiler.is_compiling():
            return torch.ops.moba.analyse_mask(mask, query, key, "")
        sig = (mask.data_ptr(), tuple(mask.shape), mask._version, query.shape[2], key.shape[2])
        if self._mask_cache is None or self._mask_cache[0] != sig:
            self._mask_cache = (sig, torch.ops.moba.analyse_mask(mask, query, key, ""))
        return self._mask_cache[1]

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
        layer = getattr(module, "layer_idx", None)
        config = getattr(module, "config", None)
        num_layers = self.policy.num_layers or getattr(config, "num_hidden_layers", None)
        decode = query.shape[2] < key.shape[2]
        decision = self.policy.decide(getattr(module, "_moba_path", ""), layer, num_layers)
        reason = self._dense_reason(module, query, key, attention_mask, {"dropout": dropout, **kwargs})
        if reason is None and decision.mode == "dense":
            reason = decision.reason
        if reason is None and decode and self.policy.decode == "dense":
            reason = "decode over the KV cache, and the policy has decode = 'dense'"
        if reason is None and key.shape[2] < self.policy.min_seq_len:
            reason = f"key length {key.shape[2]} < min_seq_len {self.policy.min_seq_len}"
        if reason is not None:
            self._record(module, layer, decode, decision="dense", chunk_size=None, topk=None, reason=reason)
            return _dense(module, query, key, value, attention_mask, dropout, scaling, kwargs)
        kind = None if attention_mask is None else self._mask_kind(attention_mask, query, key)
        out = ops.attention(
            query,
            key,
            value,
            chunk_size=decision.chunk_size,
            topk=decision.topk,
            scale=scaling,
            attn_mask=attention_mask,
            mask_kind=kind,
            impl=self.impl,
        )
        self._record(
            module,
            layer,
            decode,
            decision="moba",
            chunk_size=decision.chunk_size,
            topk=decision.topk,
            reason=decision.reason,
        )
        return out.transpose(1, 2).contiguous(), None


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


def register(policy: str | dict | Policy | None = None, name: str = "moba", impl: str = "auto") -> MobaAttention:
    """Register MoBA with transformers as the attention implementation ``name``.

    Args:
        policy: policy file path, dict, :class:`moba_compile.Policy` or None (default policy: chunk 4096, top-k 12,
            last 3 layers dense). Layers are matched by ``module.layer_idx``; ``module`` rules match the path set by
            :func:`annotate` (else the attention class name).
        name: the name to pass to ``attn_implementation`` / ``set_attn_implementation``.
        impl: as in :func:`moba_compile.moba_attention`.

    Returns:
        The registered :class:`MobaAttention`; its ``report()`` lists what each layer did.

    Raises:
        ImportError: transformers is not installed. moba_compile.PolicyError: malformed policy.

    Example:
        >>> import moba_compile.hf  # doctest: +SKIP
        >>> attn = moba_compile.hf.register(policy="policy.toml")  # doctest: +SKIP
        >>> model.set_attn_implementation("moba")  # doctest: +SKIP
        >>> model.generate(input_ids, max_new_tokens=20)  # doctest: +SKIP
        >>> print(attn.report())  # doctest: +SKIP
    """
    attention_interface, mask_interface, sdpa_mask, _ = _transformers()
    fn = MobaAttention(policy=load_policy(policy), name=name, impl=impl)
    attention_interface.register(name, fn)
    # Boolean masks, or None where the mask is purely causal: what moba::attention expects.
    mask_interface.register(name, sdpa_mask)
    return fn


def annotate(model: torch.nn.Module) -> torch.nn.Module:
    """Record each submodule's dotted path on it, so policy ``module`` rules can match in the transformers path.

    Example:
        >>> annotate(model)  # doctest: +SKIP
    """
    for path, sub in model.named_modules():
        if hasattr(sub, "layer_idx"):
            sub._moba_path = path
    return model
