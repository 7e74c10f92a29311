"""The offline training corpus: the bytes of Python source files found on the machine.

Two corpora (``RunConfig.corpus``):

- ``"stdlib"`` (the default, and the only corpus of the smoke, quick, GPU and mid scales): every ``.py`` file under
  ``sysconfig.get_paths()["stdlib"]``, except those under ``site-packages``, ``dist-packages`` and ``__pycache__``
  (third-party code and caches, not the standard library). Files are ordered by their path relative to that root
  (POSIX separators), so the corpus depends only on the Python version.
- ``"stdlib+site-packages"`` (the large scale's): the same standard-library files, in the same order and with the same
  split, followed by every ``.py`` file of the installed packages: the site-packages directories of the running
  interpreter (:func:`site_roots`: ``site.getsitepackages()`` and ``sysconfig``'s ``purelib``/``platlib``, existing
  ones, duplicates removed, in that order), skipping ``__pycache__`` and nested ``site-packages``/``dist-packages``.
  A site file's key is ``site-packages/<path relative to its root>``; the files are sorted by key, and a key already
  taken by an earlier root is skipped (Python imports the first too). On the GPU machine that is torch, triton,
  transformers, jax, numpy, scipy... whatever its image holds: the corpus depends on the installed packages, so the
  log records the roots, the bytes of each part, the SHA-256, and the distributions' versions.

Tokens are bytes (vocabulary 256); each file is followed by one ``0`` byte as end-of-document marker (Python source
files practically never contain NUL bytes).

The train/validation split is by file and deterministic: a file goes to validation when the CRC-32 of its key (the
relative path), modulo 1000, is below ``val_permille``. Adding or removing a file in another Python version moves only
that file.
Training sequences are windows at random offsets of the concatenated training files, drawn from a generator seeded by
``(seed, step)`` so that a resumed run sees exactly the batches of an uninterrupted one; validation sequences are fixed
windows spread evenly over the validation files.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import site
import sys
import sysconfig
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CORPORA",
    "Corpus",
    "EOD",
    "SITE_PREFIX",
    "load_corpus",
    "package_versions",
    "site_files",
    "site_roots",
    "stdlib_files",
    "train_batch",
    "val_batches",
]

#: The end-of-document byte written after every file.
EOD = 0

#: The corpora ``RunConfig.corpus`` may name (see the module docstring).
CORPORA = ("stdlib", "stdlib+site-packages")

#: The key prefix of the installed packages' files in the ``stdlib+site-packages`` corpus.
SITE_PREFIX = "site-packages/"

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
        kind: which corpus (:data:`CORPORA`).
        site: for ``stdlib+site-packages``: the site roots read, the files and bytes (EOD markers included) taken
            from the standard library and from the packages, the keys skipped as duplicates, and the installed
            distributions' versions (``{name: version}``); empty for ``stdlib``.
    """

    train: Tensor
    val: Tensor
    root: str
    files_train: int
    files_val: int
    sha256: str
    python: str
    kind: str = "stdlib"
    site: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, object]:
        """The corpus as JSON-serialisable metadata for run logs (sizes, file counts, digest, Python version).

        Returns:
            ``{"root", "python", "files_train", "files_val", "bytes_train", "bytes_val", "sha256"}``; for the
            ``stdlib+site-packages`` corpus also ``"kind"`` and the ``site`` fields (roots, bytes per part, versions).
            The ``stdlib`` corpus's description is unchanged from before the second corpus existed.
        """
        out: dict[str, object] = {
            "root": self.root,
            "python": self.python,
            "files_train": self.files_train,
            "files_val": self.files_val,
            "bytes_train": int(self.train.numel()),
            "bytes_val": int(self.val.numel()),
            "sha256": self.sha256,
        }
        if self.kind != "stdlib":
            out["kind"] = self.kind
            out.update(self.site)
        return out


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
    found = _py_files(base)
    if not found:
        raise FileNotFoundError(f"no .py files under {base}")
    found.sort(key=lambda item: item[0])
    return found


def site_roots() -> list[str]:
    """The running interpreter's site-packages directories, as the ``stdlib+site-packages`` corpus reads them.

    Returns:
        ``site.getsitepackages()`` then ``sysconfig``'s ``purelib`` and ``platlib``, keeping the existing
        directories, each once (by resolved path), in that order.
    """
    paths = sysconfig.get_paths()
    candidates = [*site.getsitepackages(), paths["purelib"], paths["platlib"]]
    out: list[str] = []
    seen: set[str] = set()
    for candidate in candidates:
        resolved = os.path.realpath(candidate)
        if os.path.isdir(resolved) and resolved not in seen:
            seen.add(resolved)
            out.append(candidate)
    return out


def site_files(roots: Sequence[str | os.PathLike[str]]) -> tuple[list[tuple[str, Path]], list[str]]:
    """The installed packages' ``.py`` files under ``roots``, keyed ``site-packages/<relative path>``, sorted by key.

    Args:
        roots: site-packages directories, in priority order (a key found under an earlier root wins).

    Returns:
        ``([(key, absolute_path), ...] sorted by key, [keys skipped because an earlier root had them])``.
    """
    found: dict[str, Path] = {}
    skipped: list[str] = []
    for root in roots:
        for relative, path in _py_files(Path(root)):
            key = SITE_PREFIX + relative
            if key in found:
                skipped.append(key)
            else:
                found[key] = path
    return sorted(found.items()), sorted(skipped)


def package_versions(roots: Sequence[str | os.PathLike[str]]) -> dict[str, str]:
    """The distributions installed under ``roots`` and their versions (from their metadata; cheap, no import).

    Args:
        roots: site-packages directories.

    Returns:
        ``{normalised name: version}`` sorted by name; an earlier root's version wins, as for the files.
    """
    versions: dict[str, str] = {}
    for root in roots:
        for dist in importlib.metadata.distributions(path=[str(root)]):
            name = (dist.metadata["Name"] or "").strip().lower().replace("_", "-")
            if name and name not in versions:
                versions[name] = dist.version
    return dict(sorted(versions.items()))


def _py_files(base: Path) -> list[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of the ``.py`` files under ``base``, skipping :data:`_SKIP_DIRS`, unsorted.

    Directories are not followed through symbolic links, and an entry that is no readable file (a dangling link, which
    an installed package may leave) is skipped rather than failing the whole corpus.
    """
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(".py") and path.is_file():
                found.append((path.relative_to(base).as_posix(), path))
    return found


def _is_val(relative: str, val_permille: int) -> bool:
    # surrogateescape: a file name that is not UTF-8 (os.walk decodes it so) still hashes, to its original bytes.
    return zlib.crc32(relative.encode("utf-8", "surrogateescape")) % 1000 < val_permille


@functools.lru_cache(maxsize=4)
def load_corpus(
    val_permille: int = 50, root: str | None = None, kind: str = "stdlib", sites: tuple[str, ...] | None = None
) -> Corpus:
    """Read and split the corpus (cached per process: a sweep reads the files once).

    Args:
        val_permille: files per thousand (by key hash) that go to validation; ``1 <= val_permille < 1000``.
        root: the standard-library directory to scan; default the running interpreter's standard library.
        kind: ``"stdlib"`` or ``"stdlib+site-packages"`` (:data:`CORPORA`).
        sites: for ``stdlib+site-packages``, the site-packages directories to read; default :func:`site_roots`.

    Returns:
        The :class:`Corpus`.

    Raises:
        ValueError: ``val_permille`` out of range, an unknown ``kind``, or a split ends up empty.
        FileNotFoundError: no ``.py`` file found in the standard library, or (``stdlib+site-packages``) no site
            directory or no ``.py`` file in them.
    """
    if not 1 <= val_permille < 1000:
        raise ValueError(f"val_permille must be in [1, 1000), got {val_permille}")
    if kind not in CORPORA:
        raise ValueError(f"corpus {kind!r}: allowed {', '.join(CORPORA)}")
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    files = stdlib_files(root)
    eod = bytes([EOD])
    meta: dict[str, Any] = {}
    parts = [("stdlib", files)]
    if kind == "stdlib+site-packages":
        roots = list(sites) if sites is not None else site_roots()
        if not roots:
            raise FileNotFoundError("corpus stdlib+site-packages: this interpreter has no site-packages directory")
        packages, skipped = site_files(roots)
        if not packages:
            raise FileNotFoundError(f"corpus stdlib+site-packages: no .py files under {', '.join(map(str, roots))}")
        parts.append(("site_packages", packages))
        meta = {"site_roots": [str(r) for r in roots], "duplicates_skipped": len(skipped)}
    for part, part_files in parts:
        size = 0
        for relative, path in part_files:
            data = path.read_bytes() + eod
            size += len(data)
            (val_parts if _is_val(relative, val_permille) else train_parts).append(data)
        if kind != "stdlib":
            meta[f"files_{part}"], meta[f"bytes_{part}"] = len(part_files), size
    if not train_parts or not val_parts:
        raise ValueError(f"val_permille={val_permille} leaves a split empty ({len(train_parts + val_parts)} files)")
    if kind != "stdlib":
        meta["packages"] = package_versions(meta["site_roots"])
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
        kind=kind,
        site=meta,
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
