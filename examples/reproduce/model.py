"""A small GPT-style byte-level causal LM in plain PyTorch, whose attention is one SDPA call per layer.

Pre-norm blocks (RMSNorm), rotary position embeddings (RoPE, so any context up to the configured one works), a GELU
MLP, no biases, an untied LM head. The attention of block ``N`` lives at the module path ``layers.N.attn`` and calls
``F.scaled_dot_product_attention(q, k, v, is_causal=True)``, the form the ``moba`` backend converts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RunConfig

__all__ = ["VOCAB", "GPT", "matmul_params"]

#: Byte-level vocabulary.
VOCAB = 256


def _rope_tables(context: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(context, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on ``[B, H, L, D]`` with tables ``[L, D/2]`` (pairs: first half with second half)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention: one fused QKV projection, RoPE, one SDPA call, an output projection."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``[B, L, d_model] -> [B, L, d_model]``; ``cos``/``sin`` are the RoPE tables for the first ``L`` positions."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.norm2 = nn.RMSNorm(d_model)
        self.fc = nn.Linear(d_model, mlp_ratio * d_model, bias=False)
        self.out = nn.Linear(mlp_ratio * d_model, d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """One block on ``[B, L, d_model]``."""
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class GPT(nn.Module):
    """Byte embedding, ``n_layers`` blocks at ``layers.N``, final RMSNorm, LM head.

    ``forward(inputs, targets)`` returns the per-token cross-entropy ``[B, L]`` (natural log), so that the caller can
    average it over all positions (the LM loss) or over the last positions only (the trailing loss) without
    materialising the logits outside the compiled graph.
    """

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB, bias=False)
        cos, sin = _rope_tables(cfg.context, cfg.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights(cfg.n_layers)

    def _init_weights(self, n_layers: int) -> None:
        for name, param in self.named_parameters():
            if param.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("attn.proj.weight", "out.weight")) else 0.02
                nn.init.normal_(param, mean=0.0, std=std)

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Per-token loss ``[B, L]`` (float32) of predicting ``targets`` from ``inputs`` (both ``int64 [B, L]``)."""
        n = inputs.shape[1]
        cos, sin = self.rope_cos[:n], self.rope_sin[:n]
        x = self.embed(inputs)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def matmul_params(model: nn.Module) -> int:
    """Parameters of the matrix multiplications (every ``nn.Linear`` weight and bias): the ``N`` of ``6 N`` FLOPs/token.

    Args:
        model: any module (a meta-device model works).

    Returns:
        The count; embeddings and norms are excluded (lookups and element-wise scaling, not matrix products).
    """
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False))
