"""The offline training corpus: the bytes of the Python standard library's ``.py`` source files.

Every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` is read, except those under ``site-packages``,
``dist-packages`` and ``__pycache__`` (third-party code and caches, not the standard library). Files are ordered by
their path relative to that root (POSIX separators), so the corpus depends only on the Python version. Tokens are bytes
(vocabulary 256); each file is followed by one ``0`` byte as end-of-document marker (Python source files practically
never contain NUL bytes).

The train/validation split is by file and deterministic: a file goes to validation when the CRC-32 of its relative
path, modulo 1000, is below ``val_permille``. Adding or removing a file in another Python version moves only that file.
Training sequences are windows at random offsets of the concatenated training files, drawn from a generator seeded by
``(seed, step)`` so that a resumed run sees exactly the batches of an uninterrupted one; validation sequences are fixed
windows spread evenly over the validation files.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Corpus", "EOD", "load_corpus", "stdlib_files", "train_batch", "val_batches"]

#: The end-of-document byte written after every file.
EOD = 0

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """The tokenised corpus.

    Attributes:
        train: ``uint8 [N_train]``, the training files concatenated (each followed by :data:`EOD`).
        val: ``uint8 [N_val]``, the validation files, likewise.
        root: the standard library directory read.
        files_train, files_val: how many files each split holds.
        sha256: digest of ``train`` then ``val``; a resumed run checks it (another Python version gives another corpus).
        python: the interpreter version that produced the corpus.
    """

    train: Tensor
    val: Tensor
    root: str
    files_train: int
    files_val: int
    sha256: str
    python: str

    def describe(self) -> dict[str, object]:
        """The corpus as JSON-serialisable metadata for run logs (sizes, file counts, digest, Python version).

        Returns:
            ``{"root", "python", "files_train", "files_val", "bytes_train", "bytes_val", "sha256"}``.
        """
        return {
            "root": self.root,
            "python": self.python,
            "files_train": self.files_train,
            "files_val": self.files_val,
            "bytes_train": int(self.train.numel()),
            "bytes_val": int(self.val.numel()),
            "sha256": self.sha256,
        }


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[tuple[str, Path]]:
    """The standard library's ``.py`` files, sorted by relative path.

    Args:
        root: the directory to scan; default ``sysconfig.get_paths()["stdlib"]``.

    Returns:
        ``[(relative_posix_path, absolute_path), ...]`` sorted by the relative path.

    Raises:
        FileNotFoundError: ``root`` holds no ``.py`` file.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(base).as_posix(), path))
    if not found:
        raise FileNotFoundError(f"no .py files under {base}")
    found.sort(key=lambda item: item[0])
    return found


def _is_val(relative: str, val_permille: int) -> bool:
    return zlib.crc32(relative.encode("utf-8")) % 1000 < val_permille


@functools.lru_cache(maxsize=4)
def load_corpus(val_permille: int = 50, root: str | None = None) -> Corpus:
    """Read and split the corpus (cached per process: a sweep reads the files once).

    Args:
        val_permille: files per thousand (by path hash) that go to validation; ``1 <= val_permille < 1000``.
        root: the directory to scan; default the running interpreter's standard library.

    Returns:
        The :class:`Corpus`.

    Raises:
        ValueError: ``val_permille`` out of range, or a split ends up empty.
        FileNotFoundError: no ``.py`` file found.
    """
    if not 1 <= val_permille < 1000:
        raise ValueError(f"val_permille must be in [1, 1000), got {val_permille}")
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    files = stdlib_files(root)
    eod = bytes([EOD])
    for relative, path in files:
        data = path.read_bytes() + eod
        (val_parts if _is_val(relative, val_permille) else train_parts).append(data)
    if not train_parts or not val_parts:
        raise ValueError(f"val_permille={val_permille} leaves a split empty ({len(files)} files)")
    train_bytes, val_bytes = b"".join(train_parts), b"".join(val_parts)
    digest = hashlib.sha256(train_bytes)
    digest.update(val_bytes)
    return Corpus(
        train=torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8),
        val=torch.frombuffer(bytearray(val_bytes), dtype=torch.uint8),
        root=str(root if root is not None else sysconfig.get_paths()["stdlib"]),
        files_train=len(train_parts),
        files_val=len(val_parts),
        sha256=digest.hexdigest(),
        python=".".join(map(str, sys.version_info[:3])),
    )


def _windows(stream: Tensor, offsets: Tensor, context: int) -> tuple[Tensor, Tensor]:
    index = offsets[:, None] + torch.arange(context + 1)
    seq = stream[index].long()
    return seq[:, :-1], seq[:, 1:]


def train_batch(corpus: Corpus, seed: int, step: int, batch: int, context: int) -> tuple[Tensor, Tensor]:
    """The training batch of one optimizer step: ``batch`` random windows, a pure function of ``(seed, step)``.

    Args:
        corpus: the corpus. seed: the run's seed. step: 0-based optimizer step.
        batch: sequences per step. context: tokens per sequence.

    Returns:
        ``(inputs, targets)``, both ``int64 [batch, context]`` on the CPU; targets are inputs shifted by one.

    Raises:
        ValueError: the training split is shorter than one window.
    """
    span = corpus.train.numel() - context - 1
    if span <= 0:
        raise ValueError(f"training split ({corpus.train.numel()} bytes) shorter than context {context} + 1")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    offsets = torch.randint(0, span, (batch,), generator=gen)
    return _windows(corpus.train, offsets, context)


def val_batches(corpus: Corpus, n_batches: int, batch: int, context: int) -> list[tuple[Tensor, Tensor]]:
    """The fixed validation set: ``n_batches * batch`` windows at evenly spaced offsets of the validation split.

    Args:
        corpus: the corpus. n_batches: batches. batch: sequences per batch. context: tokens per sequence.

    Returns:
        ``[(inputs, targets), ...]``, ``n_batches`` pairs of ``int64 [batch, context]`` CPU tensors.

    Raises:
        ValueError: the validation split is shorter than one window.
    """
    span = corpus.val.numel() - context - 1
    if span <= 0:
        raise ValueError(f"validation split ({corpus.val.numel()} bytes) shorter than context {context} + 1")
    count = n_batches * batch
    offsets = torch.linspace(0, span, count, dtype=torch.float64).long() if count > 1 else torch.zeros(1).long()
    return [_windows(corpus.val, offsets[i * batch : (i + 1) * batch], context) for i in range(n_batches)]
