"""transformers, an optional extra, imported on first use by the Hugging Face integration."""

from __future__ import annotations

from typing import Any

_TRANSFORMERS: tuple[Any, Any, Any, Any] | None = None


def _transformers() -> tuple[Any, Any, Any, Any]:
    """transformers' attention and mask interfaces, ``sdpa_mask`` and ``sdpa_attention_forward``, imported once.

    Kept in a module global: register() imports them eagerly, so the mask and attention functions, which torch.compile
    may trace, only read the global (torch 2.11's Dynamo cannot trace ``import transformers``, a lazy module).
    """
    global _TRANSFORMERS
    if _TRANSFORMERS is None:
        try:
            import transformers  # noqa: F401
            from transformers import AttentionInterface
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        except ImportError as exc:  # an optional extra
            raise ImportError("moba_compile.hf needs transformers: pip install 'moba-compile[hf]'") from exc
        _TRANSFORMERS = (AttentionInterface, AttentionMaskInterface, sdpa_mask, sdpa_attention_forward)
    return _TRANSFORMERS
