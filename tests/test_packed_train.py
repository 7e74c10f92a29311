"""``examples/train.py --pack``: training on packed documents of the offline corpus runs document-aware MoBA."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs transformers (the tiny-llama preset)"
)

# Chunk 16, top-2 on documents of 16-96 tokens: the longer documents are sparse MoBA; the last layer dense.
POLICY = "version = 1\nchunk_size = 16\ntopk = 2\ndense_last = 1\n"


def test_packed_batch_restarts_positions_and_masks_labels_at_boundaries() -> None:
    sys.path.insert(0, str(REPO))
    from examples import _training as training
    from examples.reproduce import corpus as corpus_mod

    corpus = corpus_mod.load_corpus()
    inputs, labels, positions, lengths = training.packed_step_batch(
        corpus, seed=0, step=1, total=300, min_doc=10, max_doc=90, byte_offset=3
    )
    assert inputs.shape == labels.shape == positions.shape == (1, 300) and sum(lengths) == 300
    assert all(10 <= n <= 90 for n in lengths[:-1]) and 1 <= lengths[-1] <= 90
    starts = [0, *[int(x) for x in torch.tensor(lengths).cumsum(0)[:-1]]]
    assert [int(i) for i in (positions[0] == 0).nonzero().flatten()] == starts
    assert bool((labels[0, starts] == -100).all()) and int((labels == -100).sum()) == len(lengths)
    assert int(inputs.min()) >= 3  # byte offset applied
    again = training.packed_step_batch(corpus, seed=0, step=1, total=300, min_doc=10, max_doc=90, byte_offset=3)
    assert again[3] == lengths and bool((again[0] == inputs).all())  # a pure function of (seed, step)


def test_train_pack_runs_document_aware_moba(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY, encoding="utf-8")
    args = ["--pack", "--steps", "2", "--seq-len", "128", "--min-doc", "16", "--max-doc", "96", "--policy",
            str(policy), "--device", "cpu", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "examples/train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "packed rows of 256 tokens (documents of 16-96)" in result.stdout
    docs = re.search(r"document-aware MoBA in the MoBA run: (\d+) \(layer, document\)", result.stdout)
    assert docs and int(docs.group(1)) >= 2 * 3 * 3  # 2 steps x 3 MoBA layers x at least 3 documents of <= 96
    assert "attention_backward:packed:reference" in result.stdout
    assert "OK: MoBA ran in 3 of 4 layers" in result.stdout


def test_train_pack_refuses_the_gpt_and_bad_ranges(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(REPO))
    from examples import train

    assert train.main(["--pack", "--model", "gpt", "--steps", "2", "--no-progress", "--device", "cpu"]) == 2
    assert "--pack needs a Hugging Face model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        train.main(["--pack", "--min-doc", "9", "--max-doc", "8", "--steps", "2", "--device", "cpu"])
    assert exc.value.code == 2 and "1 <= min <= max" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--max-doc", "8", "--steps", "2", "--device", "cpu"])
    assert "--min-doc and --max-doc need --pack" in capsys.readouterr().err
