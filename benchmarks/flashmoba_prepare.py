"""Prepare FlashMoBA's source for a benchmark-only build: head dim 128, bf16, causal, top-k <= 16, sm_90.

FlashMoBA (https://github.com/mit-han-lab/flash-moba) is never a dependency of this project and none of its code is
committed here: this script copies its source from local git mirrors into the ignored ``.flashmoba/`` folder and
narrows that copy by pattern edits, each of which fails loudly when its pattern is missing (an upstream change must
stop the build here, not produce a library with undefined symbols). ``benchmarks/flashmoba_build.sh`` builds the
result on the GPU machine; ``benchmarks/flashmoba.py`` imports it.

    python -m benchmarks.flashmoba_prepare --source /work/.mirror/mit-han-lab+flash-moba/repo \\
        --cutlass /work/.mirror/NVIDIA+cutlass/repo

What the narrowing does (upstream builds every head dim, fp16 and bf16, causal and not, top-k 16/32/64: about 80
kernel translation units):

* ``setup.py``'s source list becomes the 7 files below (one forward, one backward and one top-k kernel file, the
  variable-length sort, the two API files and the binding); its C++ standard comes from ``FLASH_MOBA_CXX_STD``
  (default c++17, upstream's; torch 2.14's headers require C++20); its ``setup_requires`` is emptied (setuptools
  fetched missing ones from PyPI into ``.eggs`` here; the GPU machine has no network);
* the ``FP16_SWITCH``/``HEADDIM_SWITCH``/``TOPK_SWITCH`` macros of both static-switch headers dispatch only bf16, head
  dim 97..128 and top-k <= 16, and raise a ``TORCH_CHECK`` error for anything else;
* the two API files' ``BOOL_SWITCH(params.is_causal, ...)`` becomes a causal-only switch that raises for non-causal
  calls (the benchmark is causal prefill).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / ".flashmoba"
CUTLASS_COMMIT = "a2439551c765c5393aebe557ee75d3a0412d2211"  # flash-moba's csrc/cutlass submodule pin

# The only translation units the narrowed build compiles, in the order ninja is given them (cheap host files first,
# so a header problem shows in seconds rather than after a kernel file).
KEPT_SOURCES = (
    "csrc/flash_moba_binding.cpp",
    "csrc/flash_moba/flash_moba_api.cpp",
    "csrc/flash_topk/flash_topk_api.cpp",
    "csrc/flash_moba/src/flash_moba_fwd_hdim128_bf16_causal_sm80.cu",
    "csrc/flash_moba/src/flash_moba_bwd_hdim128_bf16_causal_sm80.cu",
    "csrc/flash_topk/src/flash_topk16_hdim128_bf16_causal_sm80.cu",
    "csrc/flash_topk/src/varlen_sort.cu",
)

# What the build needs from flash-moba's tree (everything else: benchmarks, tests, assets, CI files, is left out).
SOURCE_PATHS = ("setup.py", "README.md", "LICENSE", "csrc/flash_moba_binding.cpp", "csrc/flash_moba", "csrc/flash_topk",
                "flash_moba")  # fmt: skip
CUTLASS_PATHS = ("include/cute", "include/cutlass", "LICENSE.txt")


class PatternError(RuntimeError):
    """A pattern the narrowing relies on is not in the file (upstream changed): nothing is built from a half edit."""


@dataclass(frozen=True)
class Edit:
    """Replace ``pattern`` (a regex, MULTILINE) in ``path`` by ``replacement``; exactly ``count`` matches expected."""

    path: str
    pattern: str
    replacement: str
    count: int = 1
    why: str = ""


_CAUSAL_ONLY = r"""
// Added by moba-compile's benchmarks/flashmoba_prepare.py: this build instantiates the causal kernels only.
#ifndef FLASHMOBA_CAUSAL_ONLY_SWITCH
#define FLASHMOBA_CAUSAL_ONLY_SWITCH(COND, CONST_NAME, ...)                                        \
  [&] {                                                                                           \
    TORCH_CHECK(COND, "this FlashMoBA build (benchmarks/flashmoba_prepare.py) has causal kernels only"); \
    constexpr static bool CONST_NAME = true;                                                      \
    return __VA_ARGS__();                                                                         \
  }()
#endif
"""

_BF16_ONLY = r"""#define FP16_SWITCH(COND, ...)                                                                   \
  [&] {                                                                                           \
    TORCH_CHECK(!(COND), "this FlashMoBA build (benchmarks/flashmoba_prepare.py) has bf16 kernels only"); \
    using elem_type = cutlass::bfloat16_t;                                                        \
    return __VA_ARGS__();                                                                         \
  }()
"""


def _headdim_128_only(low: int) -> str:
    return rf"""#define HEADDIM_SWITCH(HEADDIM, ...)                                                             \
  [&] {{                                                                                          \
    TORCH_CHECK((HEADDIM) > {low} && (HEADDIM) <= 128,                                            \
                "this FlashMoBA build (benchmarks/flashmoba_prepare.py) has head dim 128 kernels only"); \
    constexpr static int kHeadDim = 128;                                                          \
    return __VA_ARGS__();                                                                         \
  }}()
"""


_TOPK_16_ONLY = r"""#define TOPK_SWITCH(TOPK, ...)                                                                   \
  [&] {                                                                                           \
    TORCH_CHECK((TOPK) <= 16, "this FlashMoBA build (benchmarks/flashmoba_prepare.py) has top-k <= 16 only"); \
    constexpr static int kTopk = 16;                                                              \
    return __VA_ARGS__();                                                                         \
  }()
"""

# A whole macro definition: from ``#define NAME(`` at a line start (commented-out copies start with ``//``) through
# its continuation lines to the closing ``}()``.
_MACRO = r"^#define {name}\((?:[^\n]*\\\n)*?[^\n]*\}}\(\)[ \t]*$"


def _sources_block(sources: tuple[str, ...]) -> str:
    items = "".join(f'                "{s}",\n' for s in sources)
    note = "                # narrowed by moba-compile's benchmarks/flashmoba_prepare.py\n"
    return f"sources=[\n{note}{items}            ],"


EDITS = (
    Edit("setup.py", r"sources=\[[^\]]*\],", _sources_block(KEPT_SOURCES), why="compile only the kept files"),
    Edit(
        "setup.py",
        r"^from wheel\.bdist_wheel import bdist_wheel as _bdist_wheel$",
        "try:\n    from wheel.bdist_wheel import bdist_wheel as _bdist_wheel\n"
        "except ImportError:  # wheel >= 0.46 without the alias\n"
        "    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel",
        why="import bdist_wheel from setuptools where wheel no longer has it",
    ),
    Edit(
        "setup.py",
        r"setup_requires=\[[^\]]*\],",
        "setup_requires=[],  # narrowed: never fetch packaging/psutil/ninja eggs (no network on the GPU machine)",
        why="no setup_requires download: a machine without network must build with what it has",
    ),
    Edit(
        "setup.py",
        r'"-std=c\+\+17"',
        '"-std=" + os.environ.get("FLASH_MOBA_CXX_STD", "c++17")',
        count=2,
        why="C++ standard from FLASH_MOBA_CXX_STD (flashmoba_build.sh: c++20 where torch's headers need it, 2.14+)",
    ),
    Edit(
        "csrc/flash_moba/src/flash_moba_static_switch.h",
        _MACRO.format(name="FP16_SWITCH"),
        _BF16_ONLY.rstrip("\n"),
        why="bf16 only",
    ),
    Edit(
        "csrc/flash_moba/src/flash_moba_static_switch.h",
        _MACRO.format(name="HEADDIM_SWITCH"),
        _headdim_128_only(96).rstrip("\n") + "\n" + _CAUSAL_ONLY,
        why="head dim 97..128 only (upstream's 128 bucket), plus the causal-only switch",
    ),
    Edit(
        "csrc/flash_topk/src/flash_topk_static_switch.h",
        _MACRO.format(name="FP16_SWITCH"),
        _BF16_ONLY.rstrip("\n"),
        why="bf16 only",
    ),
    Edit(
        "csrc/flash_topk/src/flash_topk_static_switch.h",
        _MACRO.format(name="HEADDIM_SWITCH"),
        _headdim_128_only(64).rstrip("\n") + "\n" + _CAUSAL_ONLY,
        why="head dim 65..128 only (upstream's top-k 128 bucket), plus the causal-only switch",
    ),
    Edit(
        "csrc/flash_topk/src/flash_topk_static_switch.h",
        _MACRO.format(name="TOPK_SWITCH"),
        _TOPK_16_ONLY.rstrip("\n"),
        why="top-k <= 16 only",
    ),
    Edit(
        "csrc/flash_moba/flash_moba_api.cpp",
        r"BOOL_SWITCH\(params\.is_causal, Is_causal,",
        "FLASHMOBA_CAUSAL_ONLY_SWITCH(params.is_causal, Is_causal,",
        count=2,
        why="causal kernels only (forward and backward)",
    ),
    Edit(
        "csrc/flash_topk/flash_topk_api.cpp",
        r"BOOL_SWITCH\(params\.is_causal, Is_causal,",
        "FLASHMOBA_CAUSAL_ONLY_SWITCH(params.is_causal, Is_causal,",
        why="causal top-k only",
    ),
)


def apply_edit(root: Path, edit: Edit) -> None:
    """Apply one edit to the tree at ``root``; raises :class:`PatternError` unless exactly ``edit.count`` match."""
    path = root / edit.path
    if not path.is_file():
        raise PatternError(f"{edit.path}: file missing (upstream layout changed?)")
    text = path.read_text()
    new, n = re.subn(edit.pattern, lambda _m: edit.replacement, text, flags=re.MULTILINE)
    if n != edit.count:
        raise PatternError(
            f"{edit.path}: pattern {edit.pattern!r} matched {n} times, expected {edit.count} ({edit.why}); "
            "upstream changed: update benchmarks/flashmoba_prepare.py"
        )
    path.write_text(new)


def narrow(root: Path) -> list[str]:
    """Narrow the flash-moba tree at ``root`` in place; returns one line per edit. Raises :class:`PatternError`."""
    missing = [s for s in KEPT_SOURCES if not (root / s).is_file()]
    if missing:
        raise PatternError(f"kept sources missing from the tree: {missing}")
    done = []
    for edit in EDITS:
        apply_edit(root, edit)
        done.append(f"{edit.path}: {edit.why}")
    return done


def _git(git_dir: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(git_dir), *args], check=True, capture_output=True).stdout


def _extract(git_dir: Path, commit: str, paths: tuple[str, ...], dest: Path) -> None:
    """Extract ``paths`` of ``commit`` from the (bare) repository ``git_dir`` into ``dest``."""
    data = _git(git_dir, "archive", "--format=tar", commit, *paths)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.12+, and 3.10.12+/3.11.4+
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)


def tree_digest(root: Path) -> str:
    """A digest of every file under ``root`` (paths and contents; not the digest file itself): the build script's
    reuse stamp."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "MOBA_COMPILE_DIGEST.txt":
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def prepare(source: Path, cutlass: Path, dest: Path, cutlass_commit: str = CUTLASS_COMMIT) -> Path:
    """Create ``dest/flash-moba`` (flash-moba's HEAD, narrowed, with CUTLASS at csrc/cutlass); returns that path."""
    commit = _git(source, "rev-parse", "HEAD").decode().strip()
    pinned = _git(source, "ls-tree", "HEAD", "csrc/cutlass").decode().split()
    if len(pinned) < 3 or pinned[2] != cutlass_commit:
        print(f"note: flash-moba pins csrc/cutlass at {pinned[2:3]}, using {cutlass_commit}", file=sys.stderr)
    if _git(cutlass, "cat-file", "-t", cutlass_commit).decode().strip() != "commit":
        raise SystemExit(f"{cutlass}: commit {cutlass_commit} not found; pass --cutlass-commit <nearest tag>")
    tree = dest / "flash-moba"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    _extract(source, "HEAD", SOURCE_PATHS, tree)
    _extract(cutlass, cutlass_commit, CUTLASS_PATHS, tree / "csrc" / "cutlass")
    done = narrow(tree)
    (tree / "MOBA_COMPILE_PREPARED.txt").write_text(
        f"flash-moba {commit}\ncutlass {cutlass_commit}\n" + "".join(f"edit: {d}\n" for d in done)
    )
    (tree / "MOBA_COMPILE_DIGEST.txt").write_text(tree_digest(tree) + "\n")
    return tree


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True, help="flash-moba git dir (bare mirror or clone)")
    p.add_argument("--cutlass", type=Path, required=True, help="NVIDIA/cutlass git dir")
    p.add_argument("--cutlass-commit", default=CUTLASS_COMMIT, help="CUTLASS commit (default: flash-moba's pin)")
    p.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="output folder (default .flashmoba/)")
    args = p.parse_args(argv)
    try:
        tree = prepare(args.source, args.cutlass, args.dest, args.cutlass_commit)
    except PatternError as e:
        print(f"flashmoba_prepare: {e}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file())
    print(f"prepared {tree} ({size / 2**20:.1f} MiB):")
    print((tree / "MOBA_COMPILE_PREPARED.txt").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
