"""Training-compute accounting: FLOPs per optimizer step, split into dense, attention and gate parts.

- Dense: ``6 * N * tokens``, with ``N`` the parameters of the matrix multiplications (every ``nn.Linear``: attention
  projections, MLP, LM head); the embedding lookup and the norms are not matrix products and are not counted.
  ``6 = 2`` (forward multiply-add) ``+ 4`` (backward: gradients of the inputs and of the weights).
- Attention, per layer and head: ``12 * D`` FLOPs per attended (query, key) pair: forward ``2D`` for ``q.k`` and ``2D``
  for ``p.v`` (the ``4 * D`` "useful work" of moba-spec.md section 5), backward twice that (``dV``, ``dP``, ``dQ``,
  ``dK``). Full causal attention attends ``L (L + 1) / 2`` pairs per sequence; a MoBA layer attends, per query at
  position ``p``, its own chunk up to ``p`` plus ``min(topk - 1, p // C)`` whole earlier chunks (pairs actually
  attended, nothing else).
- Gate (MoBA layers only, forward only: no gradient flows through it): the chunk means (``D`` per key per head) and
  ``2 * D`` per (query, strictly earlier chunk) score, per head.

These are algorithmic counts, the same for every implementation. The executed work can be larger: today's MoBA
backward in moba-compile uses the reference's formulas (no Triton backward yet), which compute scores for every key.
Wall time is logged separately for that reason.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import LayerPlan, RunConfig

__all__ = ["PFLOP_S_DAY", "causal_pairs", "gate_flops", "moba_pairs", "step_flops", "to_pflop_s_days"]

#: One PFLOP/s-day in FLOPs: 1e15 FLOP/s for 86400 s.
PFLOP_S_DAY = 1e15 * 86400


def causal_pairs(length: int) -> int:
    """Attended (query, key) pairs of full causal attention over one sequence of ``length`` tokens.

    Example:
        >>> causal_pairs(4)
        10
    """
    return length * (length + 1) // 2


def moba_pairs(length: int, chunk_size: int, topk: int) -> int:
    """Attended (query, key) pairs of MoBA (moba-spec.md section 1) over one sequence, self-attention, ``Lq == Lk``.

    Args:
        length: tokens. chunk_size: ``C``. topk: ``K``, counting the query's own chunk.

    Returns:
        ``sum over chunks c of [n_c (n_c + 1) / 2 + n_c * C * min(K - 1, c)]`` with ``n_c`` the chunk's length.

    Example:
        >>> moba_pairs(8, 2, 1), moba_pairs(8, 2, 4) == causal_pairs(8), moba_pairs(8, 2, 2)
        (12, True, 24)
    """
    total = 0
    for c, start in enumerate(range(0, length, chunk_size)):
        n = min(chunk_size, length - start)
        total += n * (n + 1) // 2 + n * chunk_size * min(topk - 1, c)
    return total


def gate_flops(length: int, chunk_size: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """Forward FLOPs of the MoBA gate over one sequence: chunk means plus one score per (query, earlier chunk).

    Args:
        length: tokens. chunk_size: ``C``. heads: query heads. kv_heads: key heads. head_dim: ``D``.

    Returns:
        ``kv_heads * D * length + heads * 2 * D * sum_p floor(p / C)``.

    Example:
        >>> gate_flops(4, 2, 1, 1, 1)  # means: 4 adds; scores: positions 2 and 3 see one earlier chunk each
        8
    """
    earlier = 0
    for c, start in enumerate(range(0, length, chunk_size)):
        earlier += min(chunk_size, length - start) * c
    return kv_heads * head_dim * length + heads * 2 * head_dim * earlier


def step_flops(cfg: RunConfig, plan: Sequence[LayerPlan], matmul_params: int) -> dict[str, int]:
    """Training FLOPs of one optimizer step (``batch_size`` sequences of ``context`` tokens) under a layer plan.

    Args:
        cfg: the run. plan: the phase's per-layer attention (:func:`examples.reproduce.config.layer_plan`).
        matmul_params: parameters of the model's matrix multiplications (``N``).

    Returns:
        ``{"dense", "attention", "attention_full_equivalent", "gate", "total"}`` in FLOPs; ``total`` is
        ``dense + attention + gate``; ``attention_full_equivalent`` is what full attention would cost in the same
        layers (to show the saving).
    """
    seqs, length, heads, dim = cfg.batch_size, cfg.context, cfg.n_heads, cfg.head_dim
    per_pair = 12 * dim * heads
    dense = 6 * matmul_params * cfg.tokens_per_step
    full = causal_pairs(length)
    attention = gate = 0
    for layer in plan:
        if layer.mode == "moba":
            assert layer.chunk_size is not None and layer.topk is not None
            attention += per_pair * moba_pairs(length, layer.chunk_size, layer.topk) * seqs
            gate += gate_flops(length, layer.chunk_size, heads, heads, dim) * seqs
        else:
            attention += per_pair * full * seqs
    return {
        "dense": dense,
        "attention": attention,
        "attention_full_equivalent": per_pair * full * seqs * len(plan),
        "gate": gate,
        "total": dense + attention + gate,
    }


def to_pflop_s_days(flops: float) -> float:
    """Convert FLOPs to PFLOP/s-days (the paper's compute axis).

    Example:
        >>> to_pflop_s_days(8.64e19)
        1.0
    """
    return flops / PFLOP_S_DAY
