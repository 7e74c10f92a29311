"""Boolean attention masks against MoBA's causality: the ``moba::analyse_mask`` op and what its answer means.

A boolean ``attn_mask`` reaching a MoBA call is classified once per forward (the compile pass shares one
``moba::analyse_mask`` per mask node) into one of five kinds; ``moba::attention`` then drops it (``MASK_CAUSAL``),
intersects it with the selection (``MASK_APPLY``), runs document-aware MoBA on the documents it describes
(``MASK_DOCUMENTS``: packed sequences, :func:`documents_from_mask`) or runs dense SDPA with it
(:data:`DENSE_MASK_KINDS`).

- ``moba::analyse_mask(attn_mask, query, key, tag) -> int64 scalar on the CPU``: one read of a boolean mask per
  forward, classified against the bottom-right causality of ``query``/``key`` lengths.

:mod:`moba_compile.ops` re-exports every public name here; this module imports nothing from it.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

__all__ = [
    "CALLS",
    "DENSE_MASK_KINDS",
    "MASK_APPLY",
    "MASK_CAUSAL",
    "MASK_DOCUMENTS",
    "MASK_DOCUMENTS_NOTE",
    "MASK_KIND_REASONS",
    "MASK_NOT_CAUSAL",
    "MASK_OBSERVATIONS",
    "MASK_PER_ROW",
    "analyse_mask",
    "documents_from_mask",
    "mask_severity",
]

# Values of moba::analyse_mask.
MASK_CAUSAL = 0  # exactly the bottom-right causal mask: MoBA ignores it
MASK_APPLY = 1  # causal, with more keys masked (padding): intersect with the MoBA selection
MASK_NOT_CAUSAL = 2  # lets some query see a later key: not MoBA, dense SDPA with the mask
# Causal, but hides past keys from some rows that later rows see (sliding window, packed documents): such layers are
# not MoBA layers (they bound attention their own way), so they run dense SDPA with the mask.
MASK_PER_ROW = 3
# Exactly the block-diagonal causal mask of packed documents (transformers builds it from position ids that restart at
# 0): every row sees the keys from its document's first token to itself. MoBA runs on each document alone.
MASK_DOCUMENTS = 4
DENSE_MASK_KINDS = (MASK_NOT_CAUSAL, MASK_PER_ROW)
#: What a report adds to a MoBA site whose mask was found to be packed documents (its form is then "packed").
# Rows per block of the documents check: keeps its temporaries near 2**26 elements whatever the length.
_ROWS_ELEMENTS = 1 << 26
MASK_DOCUMENTS_NOTE = "packed documents (block-diagonal causal mask, checked at run time): MoBA per document"
# Which observation a report keeps when one mask check sees several kinds over a run: the one furthest from plain MoBA
# (a dense one above all). Not the kinds' values: MASK_DOCUMENTS came last but runs MoBA.
_SEVERITY = {MASK_CAUSAL: 0, MASK_APPLY: 1, MASK_DOCUMENTS: 2, MASK_NOT_CAUSAL: 3, MASK_PER_ROW: 4}
MASK_KIND_REASONS = {
    MASK_NOT_CAUSAL: "boolean mask lets a query see later keys (checked at run time): dense SDPA with the mask",
    MASK_PER_ROW: "boolean mask hides past keys per query row, e.g. a sliding window (checked at run time): "
    "dense SDPA with the mask",
}

# Real (non-fake) executions per op and implementation, e.g. CALLS["attention:reference"]. Tests read it to prove the
# MoBA path ran (Dynamo silently runs eagerly after its recompile limit); users can read it to check a deployment.
# Counts only: no result is keyed on a tensor (audit of identity caches, issue "no policy or result is silently wrong":
# ops.py, masks.py and kernels/ hold none; launch plans are recomputed from shapes on every call). It lives here, the
# lowest module that registers a moba:: op, so that every op counts into one Counter without an import cycle;
# moba_compile.ops re-exports it (ops.CALLS is the documented name).
CALLS: Counter[str] = Counter()

# Run-time results of moba::analyse_mask by tag (the compile pass tags each shared mask check), read by explain().
# A report, never a cache: nothing reads it to skip work (every call classifies its mask afresh, so a mask mutated in
# place or a new mask at a reused address is never answered from memory), and it is keyed by the pass's tag, a string
# unique per graph and mask node ("g<graph>:<node>:<n>"), not by tensor identity; explain() clears it around its run.
MASK_OBSERVATIONS: dict[str, int] = {}


def _classify_mask(attn_mask: Tensor, lq: int, lk: int) -> int:
    mask = attn_mask.expand(*attn_mask.shape[:-2], lq, lk)
    rows = torch.arange(lq, device=mask.device)[:, None] + (lk - lq)
    future = torch.arange(lk, device=mask.device)[None, :] > rows  # keys after each query's position
    if bool((mask & future).any()):
        kind = MASK_NOT_CAUSAL
    elif bool(mask[..., ~future].all()):
        kind = MASK_CAUSAL
    elif bool(((mask != mask[..., -1:, :]) & ~future).any()):
        # Padding masks the same keys for every row; the last row (position Lk - 1) sees every key it may.
        kind = MASK_DOCUMENTS if _is_documents(mask, lq, lk) else MASK_PER_ROW
    else:
        kind = MASK_APPLY
    return kind


def _starts(mask: Tensor, lq: int) -> Tensor:
    """Bool ``[L]``: where a document starts, read from the first batch/head entry's sub-diagonal (``[i, i - 1]``)."""
    first = mask.reshape(-1, lq, mask.shape[-1])[0]
    starts = torch.ones(lq, dtype=torch.bool, device=mask.device)
    starts[1:] = ~first.diagonal(offset=-1)
    return starts


def _is_documents(mask: Tensor, lq: int, lk: int) -> bool:
    """Whether ``mask`` (expanded to ``[..., lq, lk]``) is exactly block-diagonal causal, the same for every entry.

    The documents come from the sub-diagonal (:func:`_starts`); every row is then compared with ``[its document's
    first key, itself]``, a block of rows at a time so that no ``[L, L]`` temporary is made (16 GiB at 128K), with one
    host read at the end.
    """
    if lq != lk or lq < 2:
        return False  # a KV-cache step is per sequence; packing is a training/prefill layout
    starts = _starts(mask, lq)
    pos = torch.arange(lq, device=mask.device)
    first = torch.cummax(torch.where(starts, pos, 0), dim=0).values  # each row's document start
    keys = torch.arange(lk, device=mask.device)
    rows = max(1, _ROWS_ELEMENTS // max(1, lk * mask[..., :1, :1].numel()))  # the leading dims multiply a block
    same = torch.ones((), dtype=torch.bool, device=mask.device)
    for r0 in range(0, lq, rows):
        r1 = min(lq, r0 + rows)
        expected = (keys[None, :] >= first[r0:r1, None]) & (keys[None, :] <= pos[r0:r1, None])
        same = same & (mask[..., r0:r1, :] == expected).all()
    return bool(same)


def mask_severity(kind: int) -> int:
    """The rank a report uses to keep the most telling of several observed kinds (dense kinds rank highest).

    Args:
        kind: a ``MASK_*`` kind.

    Returns:
        Its rank: causal < padding < packed documents < not causal < per row.

    Raises:
        KeyError: ``kind`` is not a ``MASK_*`` kind.

    Example:
        >>> mask_severity(MASK_PER_ROW) > mask_severity(MASK_DOCUMENTS) > mask_severity(MASK_APPLY)
        True
    """
    return _SEVERITY[kind]


def documents_from_mask(attn_mask: Tensor, len_q: int) -> Tensor:
    """The document boundaries of a mask :func:`analyse_mask` classified :data:`MASK_DOCUMENTS`: ``cu_seqlens``.

    Reads only the mask's sub-diagonal (``O(L)``, one host transfer): a document starts where a row may not see the
    key just before it. The mask is not checked again (the caller has its kind).

    Args:
        attn_mask: bool ``[B or 1, H or 1, L, L]`` block-diagonal causal mask, any device; len_q: ``L``.

    Returns:
        int64 ``[n_docs + 1]`` on the CPU: ``[0, start_1, ..., L]``.

    Raises:
        Nothing for a mask of that kind; for any other mask the boundaries mean nothing (not checked).

    Example:
        >>> pos = torch.arange(5)
        >>> doc = torch.tensor([0, 0, 1, 1, 1])
        >>> mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
        >>> documents_from_mask(mask, 5).tolist()
        [0, 2, 5]
    """
    mask = attn_mask.expand(*attn_mask.shape[:-2], len_q, attn_mask.shape[-1])
    starts = torch.nonzero(_starts(mask, len_q)).flatten().cpu()
    return torch.cat([starts, torch.tensor([len_q])])


@torch.library.custom_op("moba::analyse_mask", mutates_args=())
def _analyse_mask_op(attn_mask: Tensor, query: Tensor, key: Tensor, tag: str) -> Tensor:
    # query/key are read for their lengths only; passing the tensors keeps symbolic lengths out of the schema.
    kind = _classify_mask(attn_mask, query.shape[2], key.shape[2])
    CALLS["analyse_mask"] += 1
    if tag:
        MASK_OBSERVATIONS[tag] = max(kind, MASK_OBSERVATIONS.get(tag, MASK_CAUSAL), key=mask_severity)
    # On the CPU, so that each layer's moba::attention reads it without a device synchronisation.
    return torch.tensor(kind, dtype=torch.int64)


@_analyse_mask_op.register_fake
def _analyse_mask_fake(attn_mask, query, key, tag):
    return torch.empty((), dtype=torch.int64, device="cpu")


def analyse_mask(attn_mask: Tensor, len_q: int, len_k: int) -> int:
    """Classify a boolean attention mask against MoBA's bottom-right causality (one read of the mask).

    Args:
        attn_mask: bool, broadcastable to ``[..., len_q, len_k]``, any device.
        len_q, len_k: query and key lengths; query row ``i`` sits at position ``len_k - len_q + i``.

    Returns:
        :data:`MASK_CAUSAL` (exactly causal: MoBA can ignore it), :data:`MASK_APPLY` (causal with the same extra keys
        masked for every row, e.g. padding: intersect with the selection), :data:`MASK_DOCUMENTS` (``len_q ==
        len_k`` and exactly block-diagonal causal, the same for every batch row and head: packed documents, each run
        as MoBA on its own), :data:`MASK_PER_ROW` (causal, but some row loses past keys a later row sees otherwise: a
        sliding window, documents plus padding, documents differing between batch rows) or :data:`MASK_NOT_CAUSAL`
        (some query may see a later key).

    Raises:
        ValueError: ``attn_mask`` is not boolean.

    Example:
        >>> analyse_mask(torch.ones(4, 4, dtype=torch.bool).tril(), 4, 4) == MASK_CAUSAL
        True
    """
    if attn_mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be boolean, got {attn_mask.dtype}")
    return _classify_mask(attn_mask, len_q, len_k)


def mask_for_moba(attn_mask: Tensor | None, mask_kind: Tensor | None) -> tuple[Tensor | None, int]:
    """The mask a MoBA op body applies and its kind, from the op's ``attn_mask`` and optional ``mask_kind``.

    Args:
        attn_mask: the call's boolean mask, or ``None``.
        mask_kind: a ``moba::analyse_mask`` result (int64 CPU scalar) or ``None`` (then a mask is treated as
            :data:`MASK_APPLY`, which is exact for every causal mask).

    Returns:
        ``(mask, kind)``: ``mask`` is ``None`` when there is nothing to intersect (no mask, or an exactly causal one).

    Example:
        >>> mask_for_moba(None, None)
        (None, 0)
    """
    if attn_mask is None:  # a mask_kind without a mask has nothing to describe
        return None, MASK_CAUSAL
    kind = MASK_APPLY if mask_kind is None else int(mask_kind.item())
    return (None if kind == MASK_CAUSAL else attn_mask), kind
