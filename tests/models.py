"""Small hand-written attention models for pass and backend tests.

Each attention module calls ``self.sdpa`` (``F.scaled_dot_product_attention`` by default), so a test can swap in an
eager oracle per layer without touching the compiled model's code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: The tiny Llama-shaped config the Hugging Face tests build from code (no weights can be downloaded): 3 layers,
#: 4 query and 2 key/value heads of 8, vocabulary 64. Tests override fields with ``{**TINY_LLAMA, ...}``.
TINY_LLAMA: dict[str, int] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
#: Special token ids for the tests that generate (padding at 0, so left-padded batches mask it).
TOKEN_IDS: dict[str, int] = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


class CausalSelfAttention(nn.Module):
    """GQA-capable causal self-attention. ``form``: "is_causal", "mask" (bool causal mask arg), "repeat" (repeat_kv)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, form: str = "is_causal") -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.form = heads, kv_heads, dim // heads, form
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.sdpa: Callable = F.scaled_dot_product_attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, L, _ = x.shape
        q = self.q(x).view(b, L, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, L, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        gqa = self.heads != self.kv_heads
        if self.form == "is_causal":
            out = self.sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            if self.form == "repeat" and gqa:  # the Hugging Face repeat_kv idiom
                n = self.heads // self.kv_heads
                k = k[:, :, None, :, :].expand(b, self.kv_heads, n, L, self.head_dim).reshape(b, self.heads, L, -1)
                v = v[:, :, None, :, :].expand(b, self.kv_heads, n, L, self.head_dim).reshape(b, self.heads, L, -1)
                gqa = False
            out = self.sdpa(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o(out.transpose(1, 2).reshape(b, L, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, form: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, kv_heads, form)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm(x), mask)
        return x + self.mlp(x)


class TinyLM(nn.Module):
    """Embedding, ``n_layers`` blocks at ``layers.N.attn``, head. ``form`` as in :class:`CausalSelfAttention`."""

    def __init__(
        self,
        vocab: int = 50,
        dim: int = 32,
        heads: int = 4,
        kv_heads: int = 4,
        n_layers: int = 3,
        form: str = "is_causal",
    ) -> None:
        super().__init__()
        self.form = form
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim, heads, kv_heads, form) for _ in range(n_layers)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        mask = None
        if self.form != "is_causal":
            L = ids.shape[1]
            mask = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()[None, None]
            if pad is not None:  # pad: [B, L] bool, True = real token
                mask = mask & pad[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(x)

    def attention_modules(self) -> list[CausalSelfAttention]:
        return [layer.attn for layer in self.layers]


def functional_attention_stack(x: torch.Tensor, weights: list[torch.Tensor], heads: int) -> torch.Tensor:
    """Attention layers written as plain functions (no nn.Module paths): layer indices come from call order."""
    b, L, d = x.shape
    for w in weights:
        q, k, v = (x @ w).view(b, L, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, L, d)
    return x
