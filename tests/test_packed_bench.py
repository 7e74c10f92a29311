"""The packed-sequence benchmark's CPU path (``--smoke``, interpreted Triton) and its document drawing."""

import json
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import packed  # noqa: E402


def test_documents_fill_the_row_within_the_range() -> None:
    lengths = packed.draw_documents(131072, 2048, 65536, seed=0)
    assert sum(lengths) == 131072
    assert all(2048 <= n <= 65536 for n in lengths[:-1]) and 1 <= lengths[-1] <= 65536
    assert packed.draw_documents(131072, 2048, 65536, seed=0) == lengths  # seeded
    assert packed.causal_pairs([3, 2]) == 6 + 3
    # chunk 2, top-2 over 5 tokens: chunks {0,1} {2,3} {4}: 3 + (3 + 2*2) + (1 + 1*2) pairs at most.
    assert packed.moba_pairs_bound([5], 2, 2) == 3 + 7 + 3


def test_smoke_run_measures_every_column_and_packed_equals_unpacked(tmp_path: Path) -> None:
    assert packed.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("packed-*.json")
    (row,) = json.loads(result.read_text())["rows"]
    assert sum(row["documents"]) == row["total"] == 96
    for field in ("moba_packed_fwd_bwd_ms", "moba_unpacked_sum_fwd_bwd_ms", "dense_mask_fwd_bwd_ms",
                  "dense_varlen_sum_fwd_bwd_ms", "packed_over_unpacked_fwd_bwd"):  # fmt: skip
        assert row[field] is not None and row[field] > 0, (field, row["errors"])
    assert set(row["errors"]) == {"flex_document_fwd_bwd_ms"}  # skipped in smoke runs, with the reason
    assert row["packed_vs_unpacked_max_abs"] == {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}
    assert row["all_chunks_vs_dense_max_abs"] < 1e-5
    assert row["calls"]["packed_attention:triton"] >= row["n_documents"]
