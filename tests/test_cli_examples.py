"""The ``moba-compile`` command (``moba_compile.cli.main``) and the scripts in ``examples/``.

The command is run in process (``capsys`` reads its table); ``python -m moba_compile`` and the examples run as
subprocesses from the repository root with ``PYTHONPATH`` set to it, as a user would run them from a checkout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from report_text import parse_report_table

from moba_compile.cli import load_factory, main, parse_shape

REPO = Path(__file__).resolve().parents[1]

# Four attention layers (the tiny presets): layer 0 dense by rule, layers 1-2 MoBA, layer 3 dense by dense_last.
POLICY = """\
version = 1
chunk_size = 8
topk = 2
dense_last = 1

[[rules]]
layers = [0]
mode = "dense"
"""

FACTORY = """\
import torch
import torch.nn.functional as F
from torch import nn


class Attn(nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.causal = causal
        self.qkv = nn.Linear(32, 96)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return y.transpose(1, 2).reshape(b, n, 32)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.blocks = nn.ModuleList([Attn(False), Attn(True), Attn(True)])

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return x


def build():
    torch.manual_seed(0)
    return Net(), (torch.randint(0, 64, (1, 40)),)


def build_bare():
    torch.manual_seed(0)
    return Net()


def build_wrong():
    return 42


def build_sized(n_layers, *extra, width=32, **options):
    return Net()
"""


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every explain() compiles with a new backend callable; Dynamo counts those as recompiles of the same forward and
    # stops compiling after 8, so this file starts each test from an empty cache.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def policy_file(tmp_path: Path) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return str(path)


@pytest.fixture
def factory_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "moba_cli_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("moba_cli_factory", None)


def _rows(out: str) -> dict[str, list[str]]:
    """Report rows by module path: [graph, layer, module, decision, chunk, topk, form, impl, reason].

    A reason moved under the table as a note (``[2]`` in the row) is replaced by the note's text, unwrapped.
    """
    table, notes = parse_report_table(out)
    rows = {}
    for cells in table:
        if len(cells) == 9:
            cells[8] = notes.get(cells[8], cells[8])
            rows[cells[2]] = cells
    return rows


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


# ----------------------------------------------------------------------------------------------------------------------
# moba-compile explain
# ----------------------------------------------------------------------------------------------------------------------


def test_explain_hf_preset_names_layers_and_decisions(policy_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    assert main(["explain", "--hf-config", "tiny-llama", "--seq-len", "32", "--policy", policy_file]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM from tiny-llama" in out
    assert "input_ids [1, 32]" in out
    assert "2 of 4 attention sites on MoBA" in out
    rows = _rows(out)
    assert sorted(rows) == [f"model.layers.{i}.self_attn" for i in range(4)]
    layer = {int(r[1]): r for r in rows.values()}
    assert layer[0][3] == "dense" and "rule 0 (layers=[0])" in layer[0][8]
    for i in (1, 2):
        assert layer[i][3:7] == ["moba", "8", "2", "is_causal"]
    assert layer[3][3] == "dense" and "dense_last=1" in layer[3][8]


def test_explain_hf_mask_form_from_config_file(
    tmp_path: Path, policy_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    from moba_compile.hf.models import load_hf_config

    config = tmp_path / "config.json"
    load_hf_config("tiny-qwen2").to_json_file(str(config))
    argv = ["explain", "--hf-config", str(config), "--seq-len", "24", "--batch", "2", "--mask-form"]
    assert main([*argv, "--policy", policy_file]) == 0
    out = capsys.readouterr().out
    assert "Qwen2ForCausalLM" in out and "input_ids [2, 24], attention_mask all ones, use_cache=False" in out
    rows = _rows(out)
    assert [r[3] for r in rows.values()] == ["dense", "moba", "moba", "dense"]
    assert all(r[6] == "mask" for r in rows.values())
    assert "repeat_kv seen through" in rows["model.layers.1.self_attn"][8]


def test_explain_factory_pair_and_input_shape(
    factory_dir: Path, policy_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", "--factory", "moba_cli_factory:build", "--policy", policy_file]) == 0
    out = capsys.readouterr().out
    assert "Net from moba_cli_factory:build" in out and "int64 [1, 40]" in out
    rows = _rows(out)
    assert rows["blocks.0"][3] == "dense" and "non-causal" in rows["blocks.0"][8]
    assert rows["blocks.1"][3:6] == ["moba", "8", "2"]
    assert rows["blocks.2"][3] == "dense" and "dense_last=1" in rows["blocks.2"][8]

    script = str(factory_dir / "moba_cli_factory.py")
    assert main(["explain", "--factory", f"{script}:build_bare", "--input-shape", "2,48"]) == 0
    out = capsys.readouterr().out
    assert "int64 [2, 48]" in out and "policy: <default>" in out
    assert len(_rows(out)) == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hf-config", "no/such/config.json"], "no/such/config.json: no such file or directory"),
        (["--hf-config", "{tmp}"], "directory has no config.json"),
        (["--factory", "no_colon_here"], "bad --factory 'no_colon_here': expected module:function"),
        (["--factory", "no_such_module_xyz:build"], "cannot import 'no_such_module_xyz'"),
        (["--factory", "moba_cli_factory:missing"], "has no attribute 'missing'"),
        (["--factory", "moba_cli_factory:build_bare"], "without example inputs; pass --input-shape"),
        (["--factory", "moba_cli_factory:build_wrong"], "returned int; expected an nn.Module"),
        (["--factory", "moba_cli_factory:build_sized"], "build_sized': it needs arguments (n_layers)"),
        (["--factory", "moba_cli_factory:Attn"], "it needs arguments (causal)"),
        (["--factory", "{tmp}/nope.py:build"], "nope.py: no such file"),
        (["--factory", "moba_cli_factory:build", "--seq-len", "8"], "--seq-len: only with --hf-config"),
        (["--hf-config", "tiny-llama", "--policy", "{tmp}/missing.toml"], "missing.toml: policy file not found"),
        (["--hf-config", "tiny-llama", "--policy", "{tmp}/bad.json"], "unknown key 'chunk' at top level"),
        (["--hf-config", "tiny-llama", "--seq-len", "0"], "argument --seq-len: '0' must be >= 1"),
        (["--hf-config", "tiny-llama", "--factory", "m:f"], "not allowed with argument"),
    ],
)
def test_explain_errors_exit_2_with_one_line(
    argv: list[str], message: str, tmp_path: Path, factory_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "--hf-config" in argv:
        pytest.importorskip("transformers")
    (tmp_path / "bad.json").write_text(json.dumps({"version": 1, "chunk": 512}))
    assert main(["explain", *(a.replace("{tmp}", str(tmp_path)) for a in argv)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1, captured.err


@pytest.mark.parametrize(
    ("interpret", "why"),
    [("0", "CPU tensors need TRITON_INTERPRET=1"), ("1", "chunk_size 8 is not a multiple of 16")],
    ids=["cpu-not-interpreted", "unsupported-chunk"],
)
def test_explain_impl_triton_that_cannot_run_is_one_line(
    interpret: str,
    why: str,
    factory_dir: Path,
    policy_file: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # It printed Dynamo's 48-line BackendCompilerFailed traceback and exited 1.
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    argv = ["explain", "--factory", "moba_cli_factory:build", "--policy", policy_file, "--impl", "triton"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("moba-compile: error: backend 'moba': impl='triton' cannot run this call: ")
    assert why in captured.err


def test_explain_backend_bug_keeps_its_traceback(
    factory_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only errors the user can fix become one line; a failure inside the backend is a bug and must stay visible.
    import moba_compile.backend

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("bug in the pass")

    monkeypatch.setattr(moba_compile.backend, "rewrite_sdpa", broken)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="bug in the pass"):
        main(["explain", "--factory", "moba_cli_factory:build"])


def test_explain_json(factory_dir: Path, policy_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--factory", "moba_cli_factory:build", "--policy", policy_file, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "Net from moba_cli_factory:build" and data["inputs"] == "int64 [1, 40]"
    report = data["report"]
    assert report["policy_source"] == policy_file
    assert (report["num_sites"], report["num_moba"]) == (3, 1)
    sites = {s["module"]: s for s in report["sites"]}
    assert sites["blocks.0"]["decision"] == "dense" and "non-causal" in sites["blocks.0"]["reason"]
    assert (sites["blocks.1"]["decision"], sites["blocks.1"]["chunk_size"], sites["blocks.1"]["topk"]) == ("moba", 8, 2)
    assert sites["blocks.1"]["impl"].startswith("reference") and sites["blocks.2"]["impl"] == "-"


def test_explain_without_transformers(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    assert main(["explain", "--hf-config", "tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transformers is not installed" in err and "moba-compile[hf]" in err


def test_usage_without_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "explain" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_parse_shape_and_load_factory() -> None:
    assert parse_shape("2,128,3") == (2, 128, 3)
    assert load_factory("collections:OrderedDict").__name__ == "OrderedDict"


def test_python_dash_m(policy_file: str) -> None:
    pytest.importorskip("transformers")
    proc = _run(
        "-m", "moba_compile", "explain", "--hf-config", "tiny-mistral", "--seq-len", "16", "--policy", policy_file
    )
    assert proc.returncode == 0, proc.stderr
    assert "MistralForCausalLM from tiny-mistral" in proc.stdout
    assert "model.layers.3.self_attn" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------------
# examples/
# ----------------------------------------------------------------------------------------------------------------------


def test_quickstart_runs_and_matches_reference() -> None:
    proc = _run("examples/quickstart.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "2 of 4 attention sites on MoBA" in out
    rows = _rows(out)
    assert [rows[f"layers.{i}.attn"][3] for i in range(4)] == ["dense", "moba", "moba", "dense"]
    assert rows["layers.2.attn"][5] == "4"
    dense_diff = float(re.search(r"MoBA vs dense attention.*max \|diff\| = ([0-9.e+-]+)", out).group(1))
    assert dense_diff > 1e-3  # the sparse path really ran
    ref_diff = float(re.search(r"MoBA vs eager reference.*max \|diff\| = ([0-9.e+-]+)", out).group(1))
    assert ref_diff < 1e-4
    assert "OK: 2 of 4 attention layers ran MoBA" in out


def test_convert_hf_tiny_llama(policy_file: str) -> None:
    pytest.importorskip("transformers")
    args = ["examples/convert_hf.py", "tiny-llama", "--policy", policy_file, "--seq-len", "48"]
    proc = _run(*args, "--compiler", "aot_eager", "--mask-form")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "LlamaForCausalLM from tiny-llama (random weights, torch.float32)" in out
    assert [r[3] for r in _rows(out).values()] == ["dense", "moba", "moba", "dense"]
    assert "logits: [1, 48, 512] float32" in out
    diff = float(re.search(r"uncompiled model: max ([0-9.e+-]+)", out).group(1))
    assert diff > 0  # 48 tokens > chunk 8 * top-k 2: MoBA differs from dense attention


def test_convert_hf_bad_policy_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In this process (a subprocess would spend its ~5 s importing torch): main's exit status and its one-line error.
    pytest.importorskip("transformers")
    from examples.convert_hf import main  # the repository root is on sys.path (pyproject.toml)

    assert main(["tiny-llama", "--policy", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert "policy file not found" in err and "Traceback" not in err
