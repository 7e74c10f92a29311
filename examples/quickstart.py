"""Quickstart: MoBA (Mixture of Block Attention) on a small causal LM through ``torch.compile(backend="moba")``.

Run from the repository root (CPU is enough; about 30 s, most of it Inductor's first compilation):

    python examples/quickstart.py            # with moba-compile installed (pip install -e .)
    PYTHONPATH=. python examples/quickstart.py

What it does:

1. builds a 4-layer causal LM in plain PyTorch whose attention is ``F.scaled_dot_product_attention(q, k, v,
   is_causal=True, enable_gqa=True)`` with 4 query heads over 2 key/value heads (GQA), at module paths
   ``layers.N.attn``;
2. prints ``moba_compile.explain(...)``: the decision the policy below takes for every attention layer;
3. compiles the model with ``torch.compile(model, backend="moba", options={"policy": POLICY})`` (Inductor) and runs
   a 512-token prefill;
4. prints how far the logits are from the same model with dense attention (MoBA with chunk 64 and top-k 2 attends to
   at most 128 of the 512 keys, so they differ), and checks that they equal the model run eagerly with the readable
   reference ``moba_compile.reference.moba_attention`` in the converted layers, to float32 tolerance.

Exit status 0 when the check passes, 1 otherwise.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import moba_compile
from moba_compile import reference

# The per-layer policy, as a dict (a .toml/.json file path works the same; see examples/policies/ and docs/policy.md).
POLICY = {
    "version": 1,
    "chunk_size": 64,  # keys are split into chunks of 64 tokens from position 0
    "topk": 2,  # each query attends to its own chunk plus the 1 best-scoring earlier chunk
    "dense_last": 1,  # the last layer keeps dense attention
    "rules": [
        {"layers": [0], "mode": "dense"},  # the first layer too
        {"module": "layers.2.attn", "topk": 4},  # layer 2 attends to 4 chunks
    ],
}

VOCAB, DIM, HEADS_Q, HEADS_KV, LAYERS = 256, 128, 4, 2, 4
BATCH, SEQ_LEN = 2, 512


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, written as one SDPA call."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = DIM // HEADS_Q
        self.q = nn.Linear(DIM, HEADS_Q * self.head_dim, bias=False)
        self.kv = nn.Linear(DIM, 2 * HEADS_KV * self.head_dim, bias=False)
        self.out = nn.Linear(HEADS_Q * self.head_dim, DIM, bias=False)
        # (chunk_size, topk) to run this layer eagerly with the MoBA reference instead of SDPA; only for the check.
        self.reference: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, HEADS_Q, self.head_dim).transpose(1, 2)  # [B, Hq, L, D]
        k, v = self.kv(x).view(b, n, 2, HEADS_KV, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, Hkv, L, D] each
        if self.reference is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            chunk_size, topk = self.reference
            y = reference.moba_attention(q, k, v, chunk_size=chunk_size, topk=topk)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.attn = Attention()
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CausalLM(nn.Module):
    """Token embedding, ``LAYERS`` blocks at ``layers.N``, final norm, LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.RMSNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def reference_logits(model: CausalLM, report: moba_compile.Report, input_ids: torch.Tensor) -> torch.Tensor:
    """Run ``model`` eagerly with the MoBA reference in the layers the report converted (dense SDPA elsewhere).

    Args:
        model: the model; its ``Attention.reference`` attributes are set for the run and cleared afterwards.
        report: what ``moba_compile.explain`` decided (layer, decision, chunk size, top-k per site).
        input_ids: ``int64 [B, L]``.

    Returns:
        The logits, ``[B, L, VOCAB]``.
    """
    moba = {site.layer: (site.chunk_size, site.topk) for site in report.sites if site.decision == "moba"}
    try:
        for index, block in enumerate(model.layers):
            block.attn.reference = moba.get(index)
        with torch.no_grad():
            return model(input_ids)
    finally:
        for block in model.layers:
            block.attn.reference = None


def main() -> int:
    """Build, explain, compile, run and check; return the exit status (0 when the check passes)."""
    torch.manual_seed(0)
    model = CausalLM().eval()
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ_LEN))

    # What the policy does where: compile once (without Inductor's code generation), run once, report.
    report = moba_compile.explain(model, input_ids, policy=POLICY)
    print(report)
    print()

    compiled = torch.compile(model, backend="moba", options={"policy": POLICY})
    start = time.perf_counter()
    with torch.no_grad():
        logits = compiled(input_ids)
    print(f"compiled and ran the MoBA model (Inductor, CPU) in {time.perf_counter() - start:.1f} s")

    with torch.no_grad():
        dense = model(input_ids)  # the same weights, eager, dense SDPA everywhere
    expected = reference_logits(model, report, input_ids)

    diff = (logits - dense).abs()
    print(
        f"MoBA vs dense attention, logits {list(logits.shape)}: max |diff| = {diff.max().item():.4f}, "
        f"mean |diff| = {diff.mean().item():.5f}"
    )
    error = (logits - expected).abs().max().item()
    # float32 end to end; Inductor fuses and reorders the MLP/norm arithmetic, so allow a few ulps of the logits.
    close = torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)
    print(f"MoBA vs eager reference (moba_compile.reference.moba_attention): max |diff| = {error:.2e}")
    if not close:
        print("FAILED: the compiled model does not match the eager MoBA reference", file=sys.stderr)
        return 1
    if not diff.max().item() > 1e-3:
        print("FAILED: MoBA gave the dense result; the sparse path did not run", file=sys.stderr)
        return 1
    print(f"OK: {len(report.moba_sites)} of {len(report.sites)} attention layers ran MoBA and match the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
