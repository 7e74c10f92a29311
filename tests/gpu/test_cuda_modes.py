"""GPU-only: a policy together with torch.compile modes. A tiny causal LM trained for a few steps with the moba backend
under ``mode="reduce-overhead"`` (CUDA graphs) and ``"max-autotune-no-cudagraphs"`` gives the same losses as the
default mode, and the Triton MoBA kernels ran in every mode.

Collected only where CUDA is available (``tests/conftest.py``); run with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moba_compile
from moba_compile import ops

assert os.environ.get("TRITON_INTERPRET", "0") in ("0", ""), "run the GPU tests with TRITON_INTERPRET=0"
CUDA = torch.device("cuda")
CHUNK, TOPK, STEPS, LENGTH = 64, 2, 3, 512
POLICY = {"chunk_size": CHUNK, "topk": TOPK, "dense_last": 1}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, length, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 128, dim: int = 128, heads: int = 2, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


# max-autotune benchmarks Triton GEMM templates for every matmul of forward and backward: minutes on a fresh machine
# (a first try here ran past 8 minutes). Limited to ATen GEMMs, the mode's other settings (pointwise autotuning,
# its config patches reaching Inductor together with the policy) are still what runs.
MODE_CONFIG = {"max-autotune-no-cudagraphs": {"max_autotune_gemm_backends": "ATEN"}}


def _train(mode: str) -> tuple[list[float], int]:
    """Losses of STEPS SGD steps of a freshly seeded model compiled under ``mode``, and the Triton MoBA calls."""
    torch.manual_seed(0)
    model = TinyLM().to(CUDA)
    ids = torch.randint(0, 128, (2, LENGTH), device=CUDA, generator=torch.Generator(CUDA).manual_seed(1))
    options = {"policy": POLICY, "impl": "triton"}
    if mode != "default":
        options["mode"] = mode
    if mode in MODE_CONFIG:
        options["inductor_config"] = MODE_CONFIG[mode]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moba", options=options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = ops.CALLS["attention:triton"]
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        logits = compiled(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.cuda.synchronize()
    return losses, ops.CALLS["attention:triton"] - before


@pytest.fixture(scope="module")
def default_run() -> tuple[list[float], int]:
    return _train("default")


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_mode_trains_with_the_losses_of_default_mode(mode, default_run):
    expected, default_calls = default_run
    losses, calls = _train(mode)
    assert default_calls == 2 * STEPS  # two MoBA layers per forward, Triton kernels
    # Under CUDA graphs a replay runs the captured kernels without calling the op's Python body: the calls counted
    # are those of warm-up and capture, at least one forward.
    assert calls >= (2 if mode == "reduce-overhead" else 2 * STEPS)
    # Same kernels, same data: only Inductor's fusion and autotuned matmuls differ (float32, TF32 off by default).
    torch.testing.assert_close(losses, expected, atol=1e-4, rtol=1e-4)


def test_backend_factory_with_mode_validates_at_once():
    with pytest.raises(ValueError, match="needs compiler"):
        moba_compile.make_backend(policy=POLICY, compiler="aot_eager", mode="reduce-overhead")
