"""The model library shared by the command line, the examples and the benchmarks: tiny transformers presets, configs
and models built from a preset, a ``config.json`` or a model directory, and example inputs for them.

transformers is imported when a function needs it (an optional extra: ``moba-compile[hf]``), never at import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["CliError", "PRESETS", "build_hf_model", "hf_example_inputs", "load_hf_config"]

#: Built-in tiny configurations (random weights, no files needed): 4 layers, hidden size 64, 4 query heads over
#: 2 key/value heads (GQA), vocabulary 512.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", {}),
    "tiny-qwen2": ("qwen2", {}),
    "tiny-mistral": ("mistral", {"sliding_window": 4096}),
}
_PRESET_COMMON: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CliError(Exception):
    """An error the user can fix; the command prints its message as one line and exits with status 2.

    Defined here, below the command line, because the model helpers raise it (a missing config, transformers not
    installed); ``moba_compile.cli.CliError`` is this class, and the examples catch it by either name.

    Example:
        >>> str(CliError("policy file not found"))
        'policy file not found'
    """


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise CliError(
            f"transformers is not installed ({_first_line(err)}); it is needed for Hugging Face models: "
            "pip install 'moba-compile[hf]'"
        ) from None
    return transformers


def load_hf_config(spec: str) -> Any:
    """Load a transformers config from a built-in preset name, a ``config.json`` file, or a model directory.

    Args:
        spec: ``"tiny-llama"``, ``"tiny-qwen2"`` or ``"tiny-mistral"`` (see :data:`PRESETS`); a path to a
            ``config.json`` (any file name; it must hold ``model_type``); or a local directory holding ``config.json``.
            Nothing is downloaded.

    Returns:
        A ``transformers.PretrainedConfig``.

    Raises:
        CliError: transformers is not installed, the path does not exist, has no ``config.json``, is not valid JSON,
            or transformers cannot read it (unknown ``model_type``, ...).

    Example:
        >>> load_hf_config("tiny-llama").num_hidden_layers  # doctest: +SKIP
        4
    """
    transformers = _transformers()
    if spec in PRESETS:
        model_type, extra = PRESETS[spec]
        return transformers.AutoConfig.for_model(model_type, **{**_PRESET_COMMON, **extra})
    path = Path(spec)
    if not path.exists():
        presets = ", ".join(PRESETS)
        raise CliError(f"{spec}: no such file or directory (and not a preset; presets: {presets})")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CliError(f"{spec}: directory has no config.json")
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CliError(f"{spec}: cannot read the config as JSON: {_first_line(err)}") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise CliError(f"{spec}: not a transformers config (no 'model_type' key)")
    try:
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise CliError(f"{spec}: transformers cannot load this config: {_first_line(err)}") from None


def _has_weights(spec: str) -> bool:
    return os.path.isdir(spec) and any(os.path.isfile(os.path.join(spec, name)) for name in _WEIGHT_FILES)


def build_hf_model(
    spec: str, *, dtype: torch.dtype = torch.float32, load_weights: bool = False
) -> tuple[torch.nn.Module, str]:
    """Build a transformers causal LM with SDPA attention, in eval mode, on the CPU.

    Args:
        spec: as for :func:`load_hf_config` (preset name, ``config.json`` path, or model directory).
        dtype: parameter dtype (``torch.float32``, ``torch.bfloat16``, ``torch.float16``).
        load_weights: when True and ``spec`` is a directory holding weights (``model.safetensors``,
            ``pytorch_model.bin`` or their sharded indices), load them with ``from_pretrained``; otherwise the
            weights are random (seeded with 0, so runs repeat).

    Returns:
        ``(model, description)``: the model (``attn_implementation="sdpa"``, ``eval()``) and a one-line description
        such as ``"LlamaForCausalLM from tiny-llama (random weights, torch.float32)"``.

    Raises:
        CliError: as :func:`load_hf_config`, or the config is not a causal LM that transformers can build.

    Example:
        >>> model, what = build_hf_model("tiny-llama")  # doctest: +SKIP
        >>> what  # doctest: +SKIP
        'LlamaForCausalLM from tiny-llama (random weights, torch.float32)'
    """
    transformers = _transformers()
    auto = transformers.AutoModelForCausalLM
    try:
        if load_weights and _has_weights(spec):
            model = auto.from_pretrained(spec, attn_implementation="sdpa", dtype=dtype, local_files_only=True)
            origin = "weights loaded"
        else:
            config = load_hf_config(spec)
            torch.manual_seed(0)
            model = auto.from_config(config, attn_implementation="sdpa", dtype=dtype)
            origin = "random weights"
    except (OSError, ValueError) as err:
        raise CliError(f"{spec}: transformers cannot build a causal LM from it: {_first_line(err)}") from None
    model.eval()
    return model, f"{type(model).__name__} from {spec} ({origin}, {dtype})"


def hf_example_inputs(
    model: torch.nn.Module, *, seq_len: int, batch: int = 1, mask_form: bool = False
) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """Random ``input_ids`` for a transformers causal LM, as ``(args, kwargs)`` for ``model(*args, **kwargs)``.

    Args:
        model: the model (its ``config.vocab_size`` bounds the token ids).
        seq_len: tokens per sequence (``>= 1``).
        batch: sequences (``>= 1``).
        mask_form: also pass ``use_cache=False`` and an all-ones ``attention_mask``. transformers then calls SDPA with
            a boolean ``[B, 1, L, L]`` mask and key/value repeated by ``repeat_kv`` (the form torch 2.11 always gets),
            instead of ``is_causal=True`` with unrepeated key/value.

    Returns:
        ``((input_ids,), kwargs)``; ``input_ids`` is ``int64 [batch, seq_len]`` drawn from a generator seeded with 0.

    Example:
        >>> args, kwargs = hf_example_inputs(model, seq_len=128, mask_form=True)  # doctest: +SKIP
        >>> sorted(kwargs)  # doctest: +SKIP
        ['attention_mask', 'use_cache']
    """
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    kwargs: dict[str, Any] = {}
    if mask_form:
        kwargs = {"use_cache": False, "attention_mask": torch.ones_like(input_ids)}
    return (input_ids,), kwargs
