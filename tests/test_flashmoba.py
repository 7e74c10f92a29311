"""The optional FlashMoBA column of benchmarks.attention, on the CPU: layout conversion, FlashMoBA's sparse pattern,
the like-for-like check (against a stand-in built from our reference), the reason recorded without the package, and
the source narrowing of benchmarks/flashmoba_prepare.py on a small fake tree."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import flashmoba
from benchmarks import flashmoba_prepare as prep
from moba_compile import reference


def test_varlen_round_trip_matches_a_plain_loop() -> None:
    b, h, n, d = 3, 2, 5, 4
    x = torch.randn(b, h, n, d)
    packed = flashmoba.to_varlen(x)
    assert packed.shape == (b * n, h, d) and packed.is_contiguous()
    for bi in range(b):
        for i in range(n):
            for hi in range(h):
                assert torch.equal(packed[bi * n + i, hi], x[bi, hi, i])
    back = flashmoba.from_varlen(packed, b)
    assert back.shape == x.shape and torch.equal(back, x)
    cu = flashmoba.cu_seqlens(b, n, "cpu")
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 10, 15]


def _csr(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashMoBA's column-major pattern of ``chosen [B, H, L, n_col]``, written with plain loops."""
    b, h, n, n_col = chosen.shape
    offsets = torch.zeros(b, h, n_col, dtype=torch.int64)
    nnz = torch.zeros(b, h, n_col, dtype=torch.int32)
    rows: list[int] = []
    for bi in range(b):
        for hi in range(h):
            for c in range(n_col):
                offsets[bi, hi, c] = len(rows)
                picked = [i for i in range(n) if chosen[bi, hi, i, c]]
                nnz[bi, hi, c] = len(picked)
                rows += picked
    return offsets, nnz, torch.tensor(rows + [0] * 3, dtype=torch.int32)  # unused tail, as upstream allocates


def test_chosen_from_csr_inverts_the_column_major_pattern() -> None:
    gen = torch.Generator().manual_seed(0)
    chosen = torch.rand(2, 3, 7, 4, generator=gen) < 0.4
    chosen[0, 1] = False  # a head with no entry at all
    got = flashmoba.chosen_from_csr(*_csr(chosen), length=7)
    assert torch.equal(got, chosen)


def test_chosen_from_selection_adds_the_own_chunk() -> None:
    sel = torch.tensor([[[[-1, -1], [-1, -1], [0, -1], [1, 0]]]])  # L=4, C=1: rows choose earlier chunks
    got = flashmoba.chosen_from_selection(sel, length=4, chunk_size=1)
    want = torch.tensor([[[[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]]], dtype=torch.bool)
    assert torch.equal(got, want)


def _fake_api(flip_row: int | None = None) -> SimpleNamespace:
    """A stand-in for FlashMoBA's two entry points built from our reference (fp32 CPU tensors). ``flip_row``: that
    row of sequence 0, head 0 swaps its selection for a different chunk (a gate that disagrees with ours)."""

    def chosen_of(q: torch.Tensor, k: torch.Tensor, b: int, chunk: int, topk: int) -> torch.Tensor:
        qb, kb = flashmoba.from_varlen(q, b), flashmoba.from_varlen(k, b)
        sel = reference.select_chunks(qb, kb, chunk_size=chunk, topk=topk)
        chosen = flashmoba.chosen_from_selection(sel, qb.shape[2], chunk)
        if flip_row is not None:
            chosen[0, 0, flip_row, :-1] = ~chosen[0, 0, flip_row, :-1]  # the row's earlier chunks, inverted
        return chosen

    def topk(q, k, cu_q, cu_k, max_q, max_k, moba_topk, chunk, causal=True):  # noqa: ANN001, ANN202
        assert causal and max_q == max_k and cu_q.dtype == torch.int32
        return _csr(chosen_of(q, k, cu_q.numel() - 1, chunk, moba_topk))

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, chunk, moba_topk, causal=True):  # noqa: ANN001, ANN202
        b = cu_q.numel() - 1
        chosen = chosen_of(q, k, b, chunk, moba_topk)
        qb, kb, vb = (flashmoba.from_varlen(t, b) for t in (q, k, v))
        out = flashmoba.attention_over(qb, kb, vb, chosen, chunk, qb.shape[-1] ** -0.5)
        return flashmoba.to_varlen(out.to(q.dtype))

    return SimpleNamespace(topk=topk, varlen=varlen)


def test_check_compares_with_our_reference_and_with_flashmobas_own_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    b, h, n, d, c, k = 2, 2, 24, 8, 4, 3
    gen = torch.Generator().manual_seed(1)
    q, key, val = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    scale = d**-0.5
    sel = reference.select_chunks(q, key, chunk_size=c, topk=k)
    monkeypatch.setattr(flashmoba, "_api", lambda: _fake_api())
    res = flashmoba.check(q, key, val, c, k, scale, sel)
    assert res["gate_rows_equal_fraction"] == 1.0
    assert res["max_abs_err_vs_reference"] < 1e-5 and res["max_abs_err_vs_own_selection"] < 1e-5
    # A gate that disagrees on one row: our reference differs there, FlashMoBA's own selection still matches.
    monkeypatch.setattr(flashmoba, "_api", lambda: _fake_api(flip_row=n - 1))
    res = flashmoba.check(q, key, val, c, k, scale, sel)
    assert res["gate_rows_equal_fraction"] == pytest.approx(1 - 1 / (b * h * n))
    assert res["max_abs_err_vs_reference"] > 1e-3 and res["max_abs_err_vs_own_selection"] < 1e-5
    assert res["max_abs_err_vs_reference_equal_rows"] < 1e-5


def test_columns_measured_with_a_working_flashmoba(monkeypatch: pytest.MonkeyPatch) -> None:
    b, h, n, d, c, k = 1, 2, 16, 128, 64, 2  # what the narrowed build accepts (C=64 > L: one chunk)
    q, key, val = (torch.randn(b, h, n, d, dtype=torch.bfloat16) for _ in range(3))
    monkeypatch.setattr(flashmoba, "_api", lambda: _fake_api())
    monkeypatch.setattr(flashmoba, "available", lambda: None)
    row: dict = {"errors": {}}

    def record(field, fn):  # noqa: ANN001, ANN202
        row[field] = fn()

    kw = {"chunk_size": c, "topk": k, "scale": d**-0.5, "routing": "head", "check_len": True, "our_sel": None}
    flashmoba.record_columns(row, record, q, key, val, time_ms=lambda fn: 1.5, peak_gib=lambda fn: 0.25,
                             backward=None, **kw)  # fmt: skip
    assert row["flashmoba_fwd_ms"] == 1.5 and row["flashmoba_fwd_bwd_peak_gib"] == 0.25 and not row["errors"]
    assert row["flashmoba_check"]["max_abs_err_vs_own_selection"] < 1e-2  # the stand-in's bf16 output rounding
    # Group routing has no FlashMoBA equivalent: every field None, with the reason.
    row = {"errors": {}}
    flashmoba.record_columns(row, record, q, key, val, time_ms=lambda fn: 1.5, peak_gib=lambda fn: 0.25,
                             backward=None, **{**kw, "routing": "group"})  # fmt: skip
    assert all(row[f] is None and "routes per query head" in row["errors"][f] for f in flashmoba.FIELDS)


def test_columns_without_the_package_record_the_reason() -> None:
    row: dict = {"errors": {}}
    flashmoba.record_columns(row, None, *(torch.randn(1, 1, 8, 128),) * 3, chunk_size=64, topk=2, scale=128**-0.5,
                             routing="head", time_ms=None, peak_gib=None, backward=None, check_len=True,
                             our_sel=None)  # fmt: skip
    reason = flashmoba.available()
    assert reason is not None  # no CUDA here (or no build): never None on a CPU machine
    assert all(row[f] is None and row["errors"][f] == reason for f in flashmoba.FIELDS)


# ----------------------------------------------------------------------------------------------------------------------
# benchmarks/flashmoba_prepare.py on a fake tree (our own text in upstream's shapes, not upstream's files)
# ----------------------------------------------------------------------------------------------------------------------
def _macro(name: str, params: str, cases: list[str]) -> str:
    lines = [f"#define {name}({params}) \\", "  [&] { \\"]
    for case in cases:
        lines += [f"    if ({case}) {{ \\", "      return __VA_ARGS__(); \\", "    } \\"]
    return "\n".join(lines + ["  }()"]) + "\n"


def _fake_tree(root: Path) -> None:
    sources = [*prep.KEPT_SOURCES, "csrc/flash_moba/src/flash_moba_fwd_hdim64_fp16_sm80.cu"]
    for s in sources:
        (root / s).parent.mkdir(parents=True, exist_ok=True)
        (root / s).write_text("// fake\n")
    listed = "".join(f'        "{s}",\n' for s in sources)
    (root / "setup.py").write_text(
        "from wheel.bdist_wheel import bdist_wheel as _bdist_wheel\n"
        'nvcc_flags = ["-O3", "-std=c++17"]\ncxx_flags = ["-O3", "-std=c++17"]\n'
        f"ext = dict(\n    sources=[\n{listed}    ],\n    extra_compile_args={{}},\n)\n"
        'setup(\n    setup_requires=[\n        "packaging",\n        "ninja",\n    ],\n)\n'
    )
    fp16 = _macro("FP16_SWITCH", "COND, ...", ["COND", "!COND"])
    hdim = _macro("HEADDIM_SWITCH", "HEADDIM, ...", ["HEADDIM <= 64", "HEADDIM <= 128"])
    topk = _macro("TOPK_SWITCH", "TOPK, ...", ["TOPK <= 16", "TOPK <= 32"])
    (root / "csrc/flash_moba/src/flash_moba_static_switch.h").write_text(f"#pragma once\n{fp16}\n{hdim}")
    (root / "csrc/flash_topk/src/flash_topk_static_switch.h").write_text(
        f"#pragma once\n{fp16}\n{hdim}\n// #define HEADDIM_SWITCH(HEADDIM, ...) \\\n//   [&] {{ }}()\n{topk}"
    )
    call = "  BOOL_SWITCH(params.is_causal, Is_causal, [&] { run(); });\n"
    (root / "csrc/flash_moba/flash_moba_api.cpp").write_text(call + call)
    (root / "csrc/flash_topk/flash_topk_api.cpp").write_text(call)


def test_prepare_narrows_switches_and_sources(tmp_path: Path) -> None:
    _fake_tree(tmp_path)
    done = prep.narrow(tmp_path)
    assert len(done) == len(prep.EDITS)
    setup = (tmp_path / "setup.py").read_text()
    assert all(f'"{s}"' in setup for s in prep.KEPT_SOURCES) and "hdim64_fp16" not in setup
    assert "except ImportError" in setup and "c++17" not in setup.replace('"c++17")', "")  # only as the default
    assert setup.count('os.environ.get("FLASH_MOBA_CXX_STD", "c++17")') == 2
    assert "setup_requires=[]," in setup and '"ninja"' not in setup
    for header in ("csrc/flash_moba/src/flash_moba_static_switch.h", "csrc/flash_topk/src/flash_topk_static_switch.h"):
        text = (tmp_path / header).read_text()
        assert "HEADDIM <= 64" not in text and "!COND" not in text and "kHeadDim = 128" in text
        assert text.count("TORCH_CHECK") >= 3 and "FLASHMOBA_CAUSAL_ONLY_SWITCH" in text
    topk_header = (tmp_path / "csrc/flash_topk/src/flash_topk_static_switch.h").read_text()
    assert "TOPK <= 32" not in topk_header and "// #define HEADDIM_SWITCH" in topk_header  # the comment is left
    api = (tmp_path / "csrc/flash_moba/flash_moba_api.cpp").read_text()
    assert api.count("FLASHMOBA_CAUSAL_ONLY_SWITCH(params.is_causal") == 2 and "BOOL_SWITCH" not in api


@pytest.mark.parametrize(
    ("path", "old", "new"),
    [
        ("csrc/flash_topk/src/flash_topk_static_switch.h", "#define TOPK_SWITCH", "#define TOPK_SELECT"),
        ("csrc/flash_moba/flash_moba_api.cpp", "BOOL_SWITCH(params.is_causal", "BOOL_SWITCH(params.causal"),
        ("setup.py", "sources=[", "srcs=["),
    ],
)
def test_prepare_fails_loudly_on_a_missing_pattern(tmp_path: Path, path: str, old: str, new: str) -> None:
    _fake_tree(tmp_path)
    f = tmp_path / path
    f.write_text(f.read_text().replace(old, new, 1))
    with pytest.raises(prep.PatternError, match="upstream changed|matched"):
        prep.narrow(tmp_path)


def test_prepare_extracts_from_git_mirrors(tmp_path: Path) -> None:
    def repo(path: Path, files: dict[str, str]) -> str:
        for name, text in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text)
        git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        subprocess.run([*git, "init", "-q"], check=True)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
        return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    src = tmp_path / "src"
    _fake_tree(src)
    for extra in ("README.md", "LICENSE", "csrc/flash_moba_binding.cpp", "flash_moba/__init__.py", "tests/big.py"):
        (src / extra).parent.mkdir(parents=True, exist_ok=True)
        (src / extra).write_text("x\n")
    repo(src, {})
    cut = tmp_path / "cutlass"
    commit = repo(cut, {"include/cutlass/cutlass.h": "//\n", "include/cute/tensor.hpp": "//\n", "LICENSE.txt": "x",
                        "examples/e.cu": "//\n"})  # fmt: skip
    tree = prep.prepare(src, cut, tmp_path / "out", cutlass_commit=commit)
    assert (tree / "csrc/cutlass/include/cutlass/cutlass.h").is_file() and not (tree / "csrc/cutlass/examples").exists()
    assert not (tree / "tests").exists() and (tree / "flash_moba/__init__.py").is_file()
    assert "FLASHMOBA_CAUSAL_ONLY_SWITCH" in (tree / "csrc/flash_topk/flash_topk_api.cpp").read_text()
    assert (tree / "MOBA_COMPILE_DIGEST.txt").read_text().strip() == prep.tree_digest(tree)


def test_error_localisation_counts_rows_by_chunk_and_position(capsys: pytest.CaptureFixture[str]) -> None:
    # benchmarks.flashmoba_errors: per-row max errors, then the rows above the threshold binned by chunk index and by
    # position within the chunk (8 bins). Two bad rows planted in chunk 2 (positions 0 and 9) and one in chunk 3.
    from benchmarks import flashmoba_errors

    exact = torch.zeros(1, 2, 64, 4, dtype=torch.float64)
    out = exact.clone()
    out[0, 0, 32, 1] = 0.5  # chunk 2, position 0
    out[0, 1, 41, 3] = -0.2  # chunk 2, position 9
    out[0, 1, 48, 0] = 0.07  # chunk 3, position 0
    out[0, 0, 5, 2] = 0.01  # below the threshold
    err = flashmoba_errors.row_errors(out, exact)
    assert err.shape == (1, 2, 64) and err[0, 0, 32] == 0.5 and err[0, 1, 41] == pytest.approx(0.2)
    flashmoba_errors.describe("planted", err, chunk_size=16, threshold=0.05)
    text = capsys.readouterr().out
    assert "rows above 0.05: 3 of 128" in text
    assert "by chunk index (first 16): [0, 0, 2, 1]" in text and "total chunks with bad rows: 2" in text
    assert "8 bins of 2: [2, 0, 0, 0, 1, 0, 0, 0]" in text


def test_differing_rows_names_their_chunks() -> None:
    from benchmarks import flashmoba_errors

    a = torch.zeros(1, 2, 64, 5, dtype=torch.bool)
    b = a.clone()
    b[0, 1, 40, 3] = True  # chunk 2 of 16-row chunks
    b[0, 0, 63, 0] = True  # chunk 3
    assert flashmoba_errors.differing_rows(a, b, 16) == (2, [2, 3])
    assert flashmoba_errors.differing_rows(a, a, 16) == (0, [])
