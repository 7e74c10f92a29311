"""Tests for moba_compile.policy: schema validation, loading (TOML/JSON/dict), decisions and round trips."""

from __future__ import annotations

import dataclasses
import doctest
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moba_compile.policy as policy_mod
from moba_compile.policy import DEFAULT_POLICY, Decision, Policy, PolicyError, Rule, load_policy

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"
TOP_KEYS = (
    "chunk_size, decode, dense_decode, dense_last, dense_sdpa, min_seq_len, num_layers, routing, rules, topk, version"
)
RULE_KEYS = "chunk_size, layers, mode, module, routing, topk"


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(spec: object) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(spec)  # type: ignore[arg-type]
    return str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# Defaults and basic loading
# --------------------------------------------------------------------------------------------------------------------


def test_default_policy_is_paper_llama8b_1m() -> None:
    assert DEFAULT_POLICY == Policy()
    assert (DEFAULT_POLICY.chunk_size, DEFAULT_POLICY.topk, DEFAULT_POLICY.dense_last) == (4096, 12, 3)
    assert DEFAULT_POLICY.version == 1
    assert DEFAULT_POLICY.num_layers is None
    assert DEFAULT_POLICY.min_seq_len == 0
    assert DEFAULT_POLICY.decode == "moba"
    assert DEFAULT_POLICY.rules == ()
    assert DEFAULT_POLICY.source == "<default>"


def test_load_none_and_policy_passthrough() -> None:
    assert load_policy(None) is DEFAULT_POLICY
    p = Policy(chunk_size=512)
    assert load_policy(p) is p


def test_load_empty_dict_is_default() -> None:
    p = load_policy({})
    assert p == DEFAULT_POLICY
    assert p.source == "<dict>"


def test_policy_is_frozen_and_hashable() -> None:
    p = load_policy({"rules": [{"layers": [0, -1], "mode": "dense"}]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.chunk_size = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.rules[0].mode = "moba"  # type: ignore[misc]
    assert isinstance(p.rules, tuple)
    assert p.rules[0].layers == (0, -1)
    assert hash(p) == hash(load_policy(p.to_dict()))


def test_policy_in_code_accepts_lists_and_dict_rules() -> None:
    p = Policy(rules=[{"layers": [1], "topk": 2}, Rule(module="m", mode="dense")])  # type: ignore[list-item]
    assert p.rules == (Rule(layers=(1,), topk=2), Rule(module="m", mode="dense"))
    assert Rule(layers=[3, 4], mode="dense").layers == (3, 4)  # type: ignore[arg-type]


def test_source_not_part_of_equality() -> None:
    assert Policy(source="a.toml") == Policy(source="b.json")


def test_replace_revalidates() -> None:
    with pytest.raises(PolicyError, match=r"<Policy>: chunk_size = 0 is not valid"):
        dataclasses.replace(DEFAULT_POLICY, chunk_size=0)


def test_doctests() -> None:
    result = doctest.testmod(policy_mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 10


def test_docs_policy_md_code_runs() -> None:
    # docs/policy.md's Python blocks: the ">>>" ones are checked output for output, the others must run.
    text = (EXAMPLES.parent.parent / "docs" / "policy.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    parser = doctest.DocTestParser()
    for i, block in enumerate(blocks):
        if block.lstrip().startswith(">>>"):
            runner.run(parser.get_doctest(block, {}, f"policy.md block {i}", "docs/policy.md", 0))
        else:
            exec(compile(block, f"docs/policy.md block {i}", "exec"), {})
    assert runner.failures == 0
    assert runner.tries >= 4 and len(blocks) >= 3


# --------------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------------

TOML_TEXT = """
version = 1
chunk_size = 2048
topk = 3
dense_last = 2
num_layers = 16
min_seq_len = 128
decode = "dense"
dense_sdpa = "flash_when_causal"
dense_decode = "sdpa"
routing = "group"

[[rules]]
layers = [0, -1]
mode = "dense"

[[rules]]
module = "re:.*layers\\\\.(4|5)\\\\.self_attn"
chunk_size = 1024
topk = 2
"""

JSON_DATA = {
    "version": 1,
    "chunk_size": 2048,
    "topk": 3,
    "dense_last": 2,
    "num_layers": 16,
    "min_seq_len": 128,
    "decode": "dense",
    "dense_sdpa": "flash_when_causal",
    "dense_decode": "sdpa",
    "routing": "group",
    "rules": [
        {"layers": [0, -1], "mode": "dense"},
        {"module": "re:.*layers\\.(4|5)\\.self_attn", "chunk_size": 1024, "topk": 2},
    ],
}


def test_toml_and_json_load_identically(tmp_path: Path) -> None:
    t = load_policy(write(tmp_path, "p.toml", TOML_TEXT))
    j = load_policy(write(tmp_path, "p.json", json.dumps(JSON_DATA)))
    d = load_policy(JSON_DATA)
    assert t == j == d
    assert t.to_dict() == j.to_dict() == JSON_DATA
    assert t.source.endswith("p.toml") and j.source.endswith("p.json") and d.source == "<dict>"
    assert t.decide("model.layers.5.self_attn", 5, None) == j.decide("model.layers.5.self_attn", 5, None)


def test_pathlike_and_uppercase_suffix(tmp_path: Path) -> None:
    path = Path(write(tmp_path, "P.TOML", "chunk_size = 8\n"))
    assert load_policy(path).chunk_size == 8
    assert load_policy(str(path)).chunk_size == 8


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".toml", ".json")))
def test_example_files_load(name: str) -> None:
    p = load_policy(EXAMPLES / name)
    assert p.version == 1
    assert load_policy(p.to_dict()) == p


def test_example_files_settings() -> None:
    names = {p.name for p in EXAMPLES.iterdir()}
    assert {"scaling_law.toml", "llama8b_1m.toml", "llama8b_1m.json", "hybrid.toml", "example_rules.toml"} <= names
    settings_of = {n: load_policy(EXAMPLES / n) for n in names}
    s = settings_of["scaling_law.toml"]
    assert (s.chunk_size, s.topk, s.dense_last) == (512, 3, 0)
    s = settings_of["llama8b_1m.toml"]
    assert (s.chunk_size, s.topk, s.dense_last) == (4096, 12, 3)
    assert s == DEFAULT_POLICY == settings_of["llama8b_1m.json"]
    s = settings_of["hybrid.toml"]
    assert (s.chunk_size, s.topk) == (2048, 3)
    r = settings_of["example_rules.toml"]
    assert r.rules[0].layers == (0,) and r.rules[0].mode == "dense"
    assert r.rules[1].module == "re:.*layers\\.(4|5)\\.self_attn"
    assert r.decide("model.layers.0.self_attn", 0, 32).mode == "dense"
    d = r.decide("model.layers.4.self_attn", 4, 32)
    assert (d.mode, d.chunk_size, d.topk, d.rule_index) == ("moba", 2048, 3, 1)
    assert r.decide("model.layers.14.self_attn", 14, 32).rule_index is None


def test_bad_suffix(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.yaml", "chunk_size: 1\n")
    msg = error_of(path)
    assert path in msg and ".toml" in msg and ".json" in msg and "'.yaml'" in msg
    msg = error_of(write(tmp_path, "policy", "x"))
    assert "(none)" in msg and ".toml, .json" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    msg = error_of(path)
    assert msg.startswith(f"{path}: ") and "not found" in msg


def test_missing_relative_file_shows_resolved_path() -> None:
    msg = error_of("surely-missing-policy-file.json")
    assert msg.startswith("surely-missing-policy-file.json: policy file not found (resolved to ")


def test_directory_is_unreadable(tmp_path: Path) -> None:
    d = tmp_path / "dir.toml"
    d.mkdir()
    msg = error_of(d)
    assert msg.startswith(f"{d}: ")


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.toml", "chunk_size = = 3\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}: invalid TOML: ") and "line 1" in msg


def test_json_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.json", '{"chunk_size": 3,}')
    msg = error_of(path)
    assert msg.startswith(f"{path}: invalid JSON: ") and "line 1" in msg


def test_json_top_level_not_object(tmp_path: Path) -> None:
    path = write(tmp_path, "list.json", "[1, 2]")
    assert error_of(path) == f"{path}: the top level must be a JSON object, got list"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes(b"# \xff\xfe\nchunk_size = 1\n")
    assert "not valid UTF-8" in error_of(path)


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path, "policy.toml", '[[rules]]\nlayers = [0]\nmode = "dense"\n[[rules]]\nlayers = [1]\nmode = "sparse"\n'
    )
    assert error_of(path) == f"{path}: rules[1].mode = 'sparse' is not valid; allowed: 'moba', 'dense'"
    path = write(tmp_path, "policy2.toml", "chunk = 3\n")
    assert error_of(path) == (
        f"{path}: unknown key 'chunk' at top level; valid keys: {TOP_KEYS} (did you mean 'chunk_size'?)"
    )
    path = write(tmp_path, "policy3.json", '{"rules": [{"layers": [0], "mode": "dense", "topK": 3}]}')
    assert error_of(path) == f"{path}: unknown key 'topK' in rules[0]; valid keys: {RULE_KEYS} (did you mean 'topk'?)"


def test_toml_rules_not_array_of_tables(tmp_path: Path) -> None:
    path = write(tmp_path, "p.toml", "rules = [1, 2]\n")
    assert error_of(path).startswith(f"{path}: rules[0] = 1 is not valid; allowed: a table with the keys ")
    path = write(tmp_path, "q.toml", "[rules]\nlayers = [0]\n")
    assert error_of(path).startswith(f"{path}: rules = {{'layers': [0]}} is not valid; allowed: a list of tables")


def test_bad_spec_type() -> None:
    for spec in (3, [1], b"p.toml", 1.5):
        msg = error_of(spec)
        assert msg.startswith("cannot load a policy from ") and "allowed: None, a Policy, a dict" in msg


# --------------------------------------------------------------------------------------------------------------------
# Top-level validation: every key, every kind of bad value
# --------------------------------------------------------------------------------------------------------------------

POS_INT = "an integer from 1 to 2147483647"
NONNEG_INT = "an integer from 0 to 2147483647"
LAYER_INDEX = "an integer layer index from -2147483647 to 2147483647 (negative counts from the end)"


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("version", 2, "1"),
        ("version", 0, "1"),
        ("version", "1", "1"),
        ("version", True, "1"),
        ("version", 1.0, "1"),
        ("chunk_size", 0, POS_INT),
        ("chunk_size", -4, POS_INT),
        ("chunk_size", 4096.0, POS_INT),
        ("chunk_size", "4096", POS_INT),
        ("chunk_size", True, POS_INT),
        ("chunk_size", None, POS_INT),
        ("topk", 0, POS_INT),
        ("topk", 2.5, POS_INT),
        ("topk", False, POS_INT),
        ("topk", [3], POS_INT),
        ("dense_last", -1, NONNEG_INT),
        ("dense_last", "3", NONNEG_INT),
        ("dense_last", True, NONNEG_INT),
        ("num_layers", 0, POS_INT),
        ("num_layers", -32, POS_INT),
        ("num_layers", "32", POS_INT),
        ("num_layers", True, POS_INT),
        ("min_seq_len", -1, NONNEG_INT),
        ("min_seq_len", 1.5, NONNEG_INT),
        ("min_seq_len", True, NONNEG_INT),
        ("decode", "sparse", "'moba', 'dense'"),
        ("decode", "MOBA", "'moba', 'dense'"),
        ("decode", None, "'moba', 'dense'"),
        ("decode", 1, "'moba', 'dense'"),
        ("dense_sdpa", "flash", "'as_is', 'flash_when_causal'"),
        ("dense_sdpa", True, "'as_is', 'flash_when_causal'"),
        ("dense_sdpa", None, "'as_is', 'flash_when_causal'"),
        ("dense_decode", "splitk", "'sdpa', 'split_k'"),
        ("dense_decode", "SDPA", "'sdpa', 'split_k'"),
        ("dense_decode", True, "'sdpa', 'split_k'"),
        ("dense_decode", None, "'sdpa', 'split_k'"),
        ("rules", "dense", "a list of tables ([[rules]] in TOML)"),
        ("rules", {"layers": [0]}, "a list of tables ([[rules]] in TOML)"),
        ("rules", 3, "a list of tables ([[rules]] in TOML)"),
        ("rules", None, "a list of tables ([[rules]] in TOML)"),
    ],
)
def test_top_level_bad_values(key: str, value: object, allowed: str) -> None:
    assert error_of({key: value}) == f"<dict>: {key} = {value!r} is not valid; allowed: {allowed}"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"version": 2}, "version"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"topk": True}, "topk"),
        ({"dense_last": -1}, "dense_last"),
        ({"num_layers": 0}, "num_layers"),
        ({"min_seq_len": -5}, "min_seq_len"),
        ({"decode": "x"}, "decode"),
        ({"dense_sdpa": "x"}, "dense_sdpa"),
        ({"dense_decode": "x"}, "dense_decode"),
        ({"rules": "x"}, "rules"),
    ],
)
def test_constructor_validates(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(PolicyError, match=rf"^<Policy>: {key} = .* is not valid; allowed: "):
        Policy(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match=rf"^my\.toml: {key} = "):
        Policy(**kwargs, source="my.toml")  # type: ignore[arg-type]


# Item 7 of "no policy or result is silently wrong": chunk_size = 2**31 loaded, then asked for 512 GB inside the op;
# values no run can use fail at load time, naming the file, the key and the value.
@pytest.mark.parametrize("key", ["chunk_size", "topk", "dense_last", "num_layers", "min_seq_len"])
@pytest.mark.parametrize("value", [2**31, 2**63 - 1, 10**30], ids=["2^31", "int64-max", "1e30"])
def test_top_level_values_above_the_cap(key: str, value: int, tmp_path: Path) -> None:
    allowed = NONNEG_INT if key in ("dense_last", "min_seq_len") else POS_INT
    assert error_of({key: value}) == f"<dict>: {key} = {value!r} is not valid; allowed: {allowed}"
    if value < 2**63:  # TOML integers are int64
        path = write(tmp_path, "big.toml", f"{key} = {value}\n")
        assert error_of(path) == f"{path}: {key} = {value!r} is not valid; allowed: {allowed}"
    path = write(tmp_path, "big.json", json.dumps({key: value}))
    assert error_of(path) == f"{path}: {key} = {value!r} is not valid; allowed: {allowed}"


@pytest.mark.parametrize("key", ["chunk_size", "topk"])
def test_rule_values_above_the_cap(key: str, tmp_path: Path) -> None:
    path = write(tmp_path, "p.toml", f"[[rules]]\nlayers = [1]\n{key} = 2147483648\n")
    assert error_of(path) == f"{path}: rules[0].{key} = 2147483648 is not valid; allowed: {POS_INT}"
    with pytest.raises(PolicyError) as info:
        Rule(layers=(0,), **{key: 2**31})  # type: ignore[arg-type]
    assert str(info.value) == f"<Rule>: {key} = 2147483648 is not valid; allowed: {POS_INT}"


@pytest.mark.parametrize("index", [2**31, -(2**31), 10**19])
def test_layer_index_beyond_the_cap(index: int) -> None:
    msg = rule_error({"layers": [0, index], "mode": "dense"}, index=0)
    assert msg == f"<dict>: rules[0].layers[1] = {index!r} is not valid; allowed: {LAYER_INDEX}"


def test_the_cap_itself_is_valid() -> None:
    cap = policy_mod.MAX_INT
    assert cap == 2**31 - 1
    p = load_policy(
        {
            "chunk_size": cap,
            "topk": cap,
            "dense_last": cap,
            "num_layers": cap,
            "min_seq_len": cap,
            "rules": [{"layers": [cap, -cap], "chunk_size": cap, "topk": cap}],
        }
    )
    assert (p.chunk_size, p.topk, p.rules[0].layers) == (cap, cap, (cap, -cap))
    assert load_policy(p.to_dict()) == p


def test_valid_edge_values() -> None:
    p = load_policy({"chunk_size": 1, "topk": 1, "dense_last": 0, "num_layers": 1, "min_seq_len": 0, "rules": []})
    assert (p.chunk_size, p.topk, p.dense_last, p.num_layers) == (1, 1, 0, 1)
    assert load_policy({"num_layers": None}).num_layers is None
    assert load_policy({"decode": "dense"}).decode == "dense"
    assert load_policy({"dense_sdpa": "flash_when_causal"}).dense_sdpa == "flash_when_causal"
    assert DEFAULT_POLICY.dense_sdpa == "as_is"  # spec section 3: a site left dense keeps its SDPA call bit for bit
    assert load_policy({"dense_decode": "sdpa"}).dense_decode == "sdpa"  # the opt-out
    assert load_policy({"dense_decode": "split_k"}) == DEFAULT_POLICY  # "split_k" is the default: nothing changes
    # Measured faster on the H200 (issue 16): a dense decode step runs the split-K kernels where they take it.
    assert DEFAULT_POLICY.dense_decode == "split_k"
    assert load_policy({"rules": ()}).rules == ()


@pytest.mark.parametrize("key", ["chunk", "Chunk_Size", "source", "layers", "mode", "top_k", ""])
def test_unknown_top_level_key(key: str) -> None:
    msg = error_of({key: 1})
    assert msg.startswith(f"<dict>: unknown key {key!r} at top level; valid keys: {TOP_KEYS}")


def test_unknown_non_string_key() -> None:
    assert error_of({1: 2}).startswith(f"<dict>: unknown key 1 at top level; valid keys: {TOP_KEYS}")


def test_unknown_key_misplaced_hint() -> None:
    assert error_of({"layers": [0]}).endswith("('layers' belongs in a [[rules]] table)")
    assert error_of({"mode": "dense"}).endswith("('mode' belongs in a [[rules]] table)")
    msg = error_of({"rules": [{"layers": [0], "mode": "dense", "dense_last": 1}]})
    assert msg.endswith("('dense_last' is a top-level key, not a rule key)")


def test_unknown_key_suggestion() -> None:
    assert error_of({"top_k": 3}).endswith("(did you mean 'topk'?)")
    assert "did you mean" not in error_of({"zzzzzz": 3})


def test_error_is_value_error() -> None:
    assert issubclass(PolicyError, ValueError)
    with pytest.raises(ValueError):
        load_policy({"topk": 0})


# --------------------------------------------------------------------------------------------------------------------
# Rule validation
# --------------------------------------------------------------------------------------------------------------------


def rule_error(rule: object, index: int = 1) -> str:
    rules = [{"layers": [0], "mode": "dense"}] * index + [rule]
    return error_of({"rules": rules})


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("mode", "sparse", "'moba', 'dense'"),
        ("mode", "Dense", "'moba', 'dense'"),
        ("mode", 1, "'moba', 'dense'"),
        ("mode", True, "'moba', 'dense'"),
        ("chunk_size", 0, POS_INT),
        ("chunk_size", "64", POS_INT),
        ("chunk_size", True, POS_INT),
        ("chunk_size", 64.0, POS_INT),
        ("topk", -1, POS_INT),
        ("topk", False, POS_INT),
        ("topk", 1.5, POS_INT),
        ("layers", [], "a non-empty list of integer layer indices (negative counts from the end)"),
        ("layers", 3, "a non-empty list of integer layer indices (negative counts from the end)"),
        ("layers", "0", "a non-empty list of integer layer indices (negative counts from the end)"),
        ("layers", {"0": 1}, "a non-empty list of integer layer indices (negative counts from the end)"),
        (
            "module",
            "",
            "a non-empty exact module path, or 're:' followed by a regex that must match the whole path",
        ),
        (
            "module",
            3,
            "a non-empty exact module path, or 're:' followed by a regex that must match the whole path",
        ),
        (
            "module",
            "re:",
            "a non-empty exact module path, or 're:' followed by a regex that must match the whole path",
        ),
    ],
)
def test_rule_bad_values(key: str, value: object, allowed: str) -> None:
    rule: dict[str, object] = {"layers": [2], "module": "m", "mode": "dense"}
    rule[key] = value
    assert rule_error(rule) == f"<dict>: rules[1].{key} = {value!r} is not valid; allowed: {allowed}"


@pytest.mark.parametrize("bad", [True, "1", 1.0, None, [0]])
def test_rule_bad_layer_entry(bad: object) -> None:
    msg = rule_error({"layers": [0, bad], "mode": "dense"}, index=0)
    assert msg == (f"<dict>: rules[0].layers[1] = {bad!r} is not valid; allowed: {LAYER_INDEX}")


def test_rule_bad_regex() -> None:
    msg = rule_error({"module": "re:.*layers\\.(4|5\\.self_attn", "mode": "dense"}, index=2)
    assert msg.startswith("<dict>: rules[2].module = 're:.*layers\\\\.(4|5\\\\.self_attn' is not a valid regex: ")
    assert "missing )" in msg
    with pytest.raises(PolicyError, match=r"^<Rule>: module = 're:\[' is not a valid regex: "):
        Rule(module="re:[", mode="dense")


def test_rule_without_selector() -> None:
    assert rule_error({"mode": "dense"}) == (
        "<dict>: rules[1] sets neither 'layers' nor 'module'; a rule needs at least one selector "
        "(layers = [...] and/or module = '...')"
    )
    assert rule_error({"layers": None, "module": None, "topk": 2}).startswith("<dict>: rules[1] sets neither")
    with pytest.raises(PolicyError, match=r"^<Rule>: rule sets neither 'layers' nor 'module'"):
        Rule(mode="dense")


def test_rule_without_settings() -> None:
    assert rule_error({"layers": [3]}) == (
        "<dict>: rules[1] sets none of 'mode', 'chunk_size', 'topk', 'routing'; a rule must change at least one setting"
    )
    assert rule_error({"module": "x", "mode": None}).startswith("<dict>: rules[1] sets none of")
    with pytest.raises(PolicyError, match=r"^<Rule>: rule sets none of 'mode', 'chunk_size', 'topk', 'routing'"):
        Rule(layers=(0,))


def test_empty_rule_table() -> None:
    assert "rules[0] sets neither" in rule_error({}, index=0)


@pytest.mark.parametrize("key", ["layer", "modules", "Mode", "chunk", "dense_last", "num_layers"])
def test_unknown_rule_key(key: str) -> None:
    msg = rule_error({"layers": [0], "mode": "dense", key: 1}, index=3)
    assert msg.startswith(f"<dict>: unknown key {key!r} in rules[3]; valid keys: {RULE_KEYS}")


@pytest.mark.parametrize("bad", [1, "x", [1], None])
def test_rule_not_a_table(bad: object) -> None:
    msg = rule_error(bad)
    assert msg == f"<dict>: rules[1] = {bad!r} is not valid; allowed: a table with the keys {RULE_KEYS}"


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"layers": (0,), "mode": "sparse"}, r"^<Rule>: mode = 'sparse' is not valid; allowed: 'moba', 'dense'$"),
        ({"layers": (0,), "topk": 0}, r"^<Rule>: topk = 0 is not valid; allowed: an integer from 1 to 2147483647$"),
        ({"layers": (0,), "chunk_size": True}, r"^<Rule>: chunk_size = True is not valid"),
        ({"layers": (), "mode": "dense"}, r"^<Rule>: layers = \(\) is not valid"),
        ({"layers": (True,), "mode": "dense"}, r"^<Rule>: layers\[0\] = True is not valid"),
        ({"module": "", "mode": "dense"}, r"^<Rule>: module = '' is not valid"),
    ],
)
def test_rule_constructor_validates(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(PolicyError, match=pattern):
        Rule(**kwargs)  # type: ignore[arg-type]


def test_policy_constructor_rule_path() -> None:
    with pytest.raises(PolicyError, match=r"^<Policy>: rules\[0\]\.mode = 'x' is not valid"):
        Policy(rules=[{"layers": [0], "mode": "x"}])  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------------------------------
# decide() and matches()
# --------------------------------------------------------------------------------------------------------------------


def test_decide_defaults() -> None:
    d = DEFAULT_POLICY.decide("model.layers.0.self_attn", 0, 32)
    assert d == Decision("moba", 4096, 12, "default policy", None)
    d = Policy(chunk_size=512, topk=3, dense_last=0).decide("x", 31, 32)
    assert d == Decision("moba", 512, 3, "default policy", None)


def test_decide_dense_last() -> None:
    modes = [DEFAULT_POLICY.decide(f"model.layers.{i}.self_attn", i, 32).mode for i in range(32)]
    assert modes == ["moba"] * 29 + ["dense"] * 3
    d = DEFAULT_POLICY.decide("model.layers.30.self_attn", 30, 32)
    assert d == Decision("dense", 4096, 12, "dense_last=3: layer 30 is among the last 3 of 32 attention layers", None)
    assert Policy(dense_last=32).decide("x", 0, 32).mode == "dense"
    assert Policy(dense_last=100).decide("x", 0, 4).mode == "dense"
    assert [Policy(dense_last=1).decide("x", i, 2).mode for i in range(2)] == ["moba", "dense"]


def test_decide_dense_last_needs_layer_and_count() -> None:
    d = DEFAULT_POLICY.decide("x", None, 32)
    assert d.mode == "moba" and d.reason.startswith("default policy") and "layer unknown" in d.reason
    d = DEFAULT_POLICY.decide("x", 31, None)
    assert d.mode == "moba" and d.reason.startswith("default policy") and "number of layers unknown" in d.reason
    assert Policy(dense_last=0).decide("x", None, None).reason == "default policy"


def test_decide_num_layers_override() -> None:
    p = Policy(num_layers=32)
    # The policy's count wins over the graph's (a graph break hid layers).
    assert p.decide("x", 29, 16).mode == "dense"
    assert p.decide("x", 15, 16).mode == "moba"
    assert p.decide("x", 29, None).mode == "dense"
    assert "of 32 attention layers" in p.decide("x", 29, 16).reason
    # and it resolves negative rule indices too
    q = Policy(num_layers=10, dense_last=0, rules=(Rule(layers=(-1,), topk=1),))
    assert q.decide("x", 9, 40).rule_index == 0
    assert q.decide("x", 39, 40).rule_index is None


def test_decide_negative_indices() -> None:
    p = Policy(dense_last=0, rules=(Rule(layers=(-1, -2), mode="dense"),))
    assert [p.decide("x", i, 6).mode for i in range(6)] == ["moba"] * 4 + ["dense"] * 2
    # unknown layer count: a negative index matches nothing
    assert p.decide("x", 5, None).mode == "moba"
    assert p.decide("x", 5, None).rule_index is None
    # an index reaching before the first layer matches nothing
    q = Policy(dense_last=0, rules=(Rule(layers=(-10,), mode="dense"),))
    assert all(q.decide("x", i, 4).mode == "moba" for i in range(4))
    # out-of-range positive index matches nothing either
    r = Policy(dense_last=0, rules=(Rule(layers=(99,), mode="dense"),))
    assert all(r.decide("x", i, 4).rule_index is None for i in range(4))


def test_decide_layer_none_never_matches_layers_rule() -> None:
    p = Policy(rules=(Rule(layers=(0,), mode="dense"), Rule(module="m", topk=2)))
    assert p.decide("m", None, 4).rule_index == 1
    assert p.decide("other", None, 4).rule_index is None


def test_decide_first_match_wins() -> None:
    p = Policy(
        dense_last=0,
        rules=(
            Rule(layers=(1,), chunk_size=64),
            Rule(layers=(1, 2), mode="dense", topk=5),
            Rule(module="re:.*", topk=7),
        ),
    )
    d = p.decide("a.1", 1, 4)
    assert (d.mode, d.chunk_size, d.topk, d.rule_index) == ("moba", 64, 12, 0)
    assert d.reason == "rule 0 (layers=[1])"
    d = p.decide("a.2", 2, 4)
    assert (d.mode, d.chunk_size, d.topk, d.rule_index) == ("dense", 4096, 5, 1)
    d = p.decide("a.3", 3, 4)
    assert (d.mode, d.chunk_size, d.topk, d.rule_index) == ("moba", 4096, 7, 2)
    assert d.reason == "rule 2 (module='re:.*')"


def test_decide_inheritance_of_unset_fields() -> None:
    p = Policy(chunk_size=1024, topk=4, dense_last=2, rules=(Rule(module="re:.*", chunk_size=256),))
    d = p.decide("layers.9", 9, 10)  # among the last 2: stays dense, chunk from the rule, topk from the default
    assert (d.mode, d.chunk_size, d.topk, d.rule_index) == ("dense", 256, 4, 0)
    assert d.reason.startswith("rule 0 (module='re:.*')") and "dense_last=2" in d.reason
    d = p.decide("layers.0", 0, 10)
    assert (d.mode, d.chunk_size, d.topk) == ("moba", 256, 4)
    assert d.reason == "rule 0 (module='re:.*')"
    # an explicit mode overrides dense_last
    q = Policy(dense_last=2, rules=(Rule(layers=(-1,), mode="moba"),))
    assert q.decide("x", 9, 10).mode == "moba"
    assert q.decide("x", 8, 10).mode == "dense"


def test_decide_module_exact_and_regex() -> None:
    p = Policy(
        dense_last=0,
        rules=(
            Rule(module="model.layers.3.self_attn", mode="dense"),
            Rule(module="re:.*layers\\.(4|5)\\.self_attn", chunk_size=2048, topk=3),
        ),
    )
    assert p.decide("model.layers.3.self_attn", 3, 8).rule_index == 0
    # exact means exact: no prefix, suffix or regex interpretation
    assert p.decide("model.layers.3.self_attn.inner", 3, 8).rule_index is None
    assert p.decide("xmodel.layers.3.self_attn", 3, 8).rule_index is None
    assert p.decide("model.layers.4.self_attn", 4, 8).rule_index == 1
    assert p.decide("model.layers.5.self_attn", 5, 8).rule_index == 1
    # full match: trailing text and other layers do not match
    assert p.decide("model.layers.5.self_attn.sdpa", 5, 8).rule_index is None
    assert p.decide("model.layers.45.self_attn", 45, 80).rule_index is None
    assert p.decide("model.layers.14.self_attn", 14, 80).rule_index is None
    assert p.decide("model.layers.6.self_attn", 6, 8).rule_index is None
    # the module rule ignores the layer index
    assert p.decide("model.layers.4.self_attn", None, None).rule_index == 1


def test_regex_is_full_match_not_search() -> None:
    rule = Rule(module="re:layers\\.4", mode="dense")
    assert rule.matches("layers.4", None, None)
    assert not rule.matches("model.layers.4", None, None)
    assert not rule.matches("layers.40", None, None)
    assert Rule(module="re:a|b", mode="dense").matches("b", None, None)
    assert not Rule(module="re:a|b", mode="dense").matches("ab", None, None)


def test_matches_both_criteria() -> None:
    rule = Rule(layers=(2,), module="re:enc\\..*", mode="dense")
    assert rule.matches("enc.2", 2, 4)
    assert not rule.matches("dec.2", 2, 4)
    assert not rule.matches("enc.2", 3, 4)
    assert not rule.matches("enc.2", None, 4)


def test_describe_rule() -> None:
    p = load_policy(EXAMPLES / "example_rules.toml")
    assert p.describe_rule(0) == "rule 0 (layers=[0])"
    assert p.describe_rule(1) == "rule 1 (module='re:.*layers\\\\.(4|5)\\\\.self_attn')"
    assert p.describe_rule(-1) == p.describe_rule(1)
    both = Policy(rules=(Rule(layers=(0, -1), module="m", mode="dense"),))
    assert both.describe_rule(0) == "rule 0 (layers=[0, -1], module='m')"
    with pytest.raises(IndexError):
        p.describe_rule(2)


# --------------------------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------------------------


def test_to_dict_round_trip() -> None:
    p = load_policy(JSON_DATA)
    d = p.to_dict()
    assert d == JSON_DATA
    assert load_policy(d) == p
    assert load_policy(json.loads(json.dumps(d))) == p
    assert DEFAULT_POLICY.to_dict() == {
        "version": 1,
        "chunk_size": 4096,
        "topk": 12,
        "dense_last": 3,
        "min_seq_len": 0,
        "decode": "moba",
        "dense_sdpa": "as_is",
        "dense_decode": "split_k",
        "routing": "head",
        "rules": [],
    }
    assert load_policy(DEFAULT_POLICY.to_dict()) == DEFAULT_POLICY
    # to_dict returns a fresh dict each time
    d["rules"].append({"layers": [0], "mode": "dense"})
    assert p.to_dict() == JSON_DATA


modes = st.sampled_from(["moba", "dense"])
pos_ints = st.integers(min_value=1, max_value=1 << 20)
layer_idx = st.integers(min_value=-40, max_value=40)
module_paths = st.sampled_from(
    [
        "model.layers.0.self_attn",
        "model.layers.4.self_attn",
        "model.layers.5.self_attn",
        "model.layers.31.self_attn",
        "encoder.block.2.attn",
        "",
    ]
)
module_specs = st.one_of(
    module_paths.filter(bool),
    st.sampled_from(["re:.*", "re:.*layers\\.(4|5)\\.self_attn", "re:model\\.layers\\.\\d+\\.self_attn", "re:enc.*"]),
)


@st.composite
def rule_dicts(draw: st.DrawFn) -> dict[str, object]:
    rule: dict[str, object] = {}
    selectors = draw(st.sampled_from([("layers",), ("module",), ("layers", "module")]))
    if "layers" in selectors:
        rule["layers"] = draw(st.lists(layer_idx, min_size=1, max_size=4))
    if "module" in selectors:
        rule["module"] = draw(module_specs)
    settings_ = draw(st.sets(st.sampled_from(["mode", "chunk_size", "topk"]), min_size=1))
    if "mode" in settings_:
        rule["mode"] = draw(modes)
    if "chunk_size" in settings_:
        rule["chunk_size"] = draw(pos_ints)
    if "topk" in settings_:
        rule["topk"] = draw(pos_ints)
    return rule


@st.composite
def policy_dicts(draw: st.DrawFn) -> dict[str, object]:
    d: dict[str, object] = {}
    options = {
        "version": st.just(1),
        "chunk_size": pos_ints,
        "topk": pos_ints,
        "dense_last": st.integers(min_value=0, max_value=40),
        "num_layers": st.one_of(st.none(), st.integers(min_value=1, max_value=40)),
        "min_seq_len": st.integers(min_value=0, max_value=1 << 20),
        "decode": modes,
        "rules": st.lists(rule_dicts(), max_size=4),
    }
    for key, strategy in options.items():
        if draw(st.booleans()):
            d[key] = draw(strategy)
    return d


@settings(deadline=None, derandomize=True, database=None, max_examples=100)
@given(
    d=policy_dicts(),
    sites=st.lists(
        st.tuples(module_paths, st.one_of(st.none(), st.integers(0, 40)), st.one_of(st.none(), st.integers(1, 40))),
        min_size=1,
        max_size=5,
    ),
)
def test_property_round_trip_and_decisions(
    d: dict[str, object], sites: list[tuple[str, int | None, int | None]]
) -> None:
    p = load_policy(d)
    out = p.to_dict()
    assert load_policy(out) == p
    assert load_policy(json.loads(json.dumps(out))) == p
    assert out == load_policy(out).to_dict()
    for key, value in d.items():
        if key == "num_layers" and value is None:
            assert "num_layers" not in out
        else:
            assert out[key] == value
    for module, layer, n in sites:
        dec = p.decide(module, layer, n)
        assert dec.mode in ("moba", "dense")
        assert isinstance(dec.chunk_size, int) and dec.chunk_size >= 1
        assert isinstance(dec.topk, int) and dec.topk >= 1
        assert dec.reason
        if dec.rule_index is None:
            assert (dec.chunk_size, dec.topk) == (p.chunk_size, p.topk)
        else:
            rule = p.rules[dec.rule_index]
            assert rule.matches(module, layer, p.num_layers if p.num_layers is not None else n)
            assert not any(
                r.matches(module, layer, p.num_layers if p.num_layers is not None else n)
                for r in p.rules[: dec.rule_index]
            )
            assert dec.reason.startswith(p.describe_rule(dec.rule_index))


def test_regex_escape_of_paths_matches_itself() -> None:
    path = "model.layers.7.self_attn"
    assert Rule(module="re:" + re.escape(path), mode="dense").matches(path, 7, 8)


def test_dense_last_and_negative_layers_count_attention_layers():
    # A hybrid model (Jamba-like) with attention in decoder layers 1 and 5 of 8: the last attention layer is 5.
    p = Policy(dense_last=1)
    assert p.decide("model.layers.5.self_attn", 5, 8, attention_layers=[1, 5]).mode == "dense"
    assert p.decide("model.layers.1.self_attn", 1, 8, attention_layers=[1, 5]).mode == "moba"
    rule = Policy(dense_last=0, rules=[{"layers": [-2], "mode": "dense"}])
    assert rule.decide("a", 1, 8, attention_layers=[1, 5]).mode == "dense"
    assert rule.decide("a", 5, 8, attention_layers=[1, 5]).mode == "moba"
    # num_layers counts attention layers: when it equals the count seen, the indices seen are used.
    assert Policy(dense_last=1, num_layers=2).decide("a", 5, None, attention_layers=[1, 5]).mode == "dense"


def test_policy_built_in_code_is_not_the_automatic_policy():
    assert DEFAULT_POLICY.automatic and load_policy(None).automatic
    assert not Policy().automatic
    assert Policy().source == "<Policy>"
    assert not load_policy({}).automatic


# --------------------------------------------------------------------------------------------------------------------
# check_against: valid policies that do not fit the model (item 9: these were reported only at INFO)
# --------------------------------------------------------------------------------------------------------------------


def test_check_against_fitting_policy_says_nothing() -> None:
    policy = load_policy({"dense_last": 3, "rules": [{"layers": [0, -1], "mode": "dense"}, {"module": "x", "topk": 2}]})
    assert policy.check_against(32) == []
    assert policy.check_against(None, [0, 5, 9, 13]) == []
    assert policy.check_against(None) == []  # nothing known about the layers: nothing to check
    assert Policy(num_layers=48).check_against(32) == []  # graph breaks hide layers: more than seen is fine


@pytest.mark.parametrize("dense_last", [4, 5, 1000])
def test_check_against_dense_last_covering_every_layer(dense_last: int, tmp_path: Path) -> None:
    path = write(tmp_path, "p.toml", f"dense_last = {dense_last}\n")
    assert load_policy(path).check_against(4) == [
        f"{path}: dense_last = {dense_last} covers all 4 attention layers: every layer runs dense unless a rule sets "
        "mode = 'moba'"
    ]
    # Counted in attention layers: a hybrid model with attention in decoder layers 1 and 5 has 2.
    assert len(load_policy(path).check_against(None, [5, 1])) == 1
    # Every layer really is dense: the warning describes what decide() does.
    assert {load_policy(path).decide("m", i, 4).mode for i in range(4)} == {"dense"}


def test_check_against_default_policy_names_itself() -> None:
    assert DEFAULT_POLICY.check_against(2) == [
        "default policy: dense_last = 3 covers all 2 attention layers: every layer runs dense unless a rule sets "
        "mode = 'moba'"
    ]


def test_check_against_num_layers_below_the_count_seen() -> None:
    policy = load_policy({"num_layers": 2, "dense_last": 1})
    (warning,) = policy.check_against(4)
    assert warning.startswith("<dict>: num_layers = 2 but 4 attention layers are seen: dense_last and negative")
    assert "count back from layer 1" in warning
    # What it warns about: layer 1, not the model's last layer 3, is the one dense_last keeps dense.
    assert [policy.decide("m", i, 4).mode for i in range(4)] == ["moba", "dense", "moba", "moba"]
    assert len(policy.check_against(None, [0, 2, 4, 6])) == 1  # counted from the attention layers seen


def test_check_against_rule_layers_beyond_the_count() -> None:
    policy = load_policy(
        {
            "dense_last": 0,
            "rules": [
                {"layers": [0, 31], "mode": "dense"},
                {"layers": [32, -33, -32], "topk": 2},
                {"layers": [-40], "module": "re:.*", "chunk_size": 64},
            ],
        }
    )
    assert policy.check_against(32) == [
        "<dict>: rule 1 (layers=[32, -33, -32]): layers 32, -33 are not attention layers (the 32 attention layers "
        "are 0-31)",
        "<dict>: rule 2 (layers=[-40], module='re:.*'): layer -40 is not an attention layer (the 32 attention layers "
        "are 0-31)",
    ]


def test_check_against_hybrid_rule_on_a_layer_without_attention() -> None:
    policy = Policy(dense_last=1, rules=[Rule(layers=(1, 3), mode="dense")])
    assert policy.check_against(None, [1, 5, 6, 7, 12]) == [
        "<Policy>: rule 0 (layers=[1, 3]): layer 3 is not an attention layer (the 5 attention layers are 1, 5-7, 12)"
    ]


# --------------------------------------------------------------------------------------------------------------------
# Policy.for_site: one site's decision as a policy of its own (per-block compilation)
# --------------------------------------------------------------------------------------------------------------------


def test_for_site_of_a_moba_site_is_the_decision_without_rules_or_dense_last():
    policy = load_policy(
        {
            "chunk_size": 512,
            "topk": 3,
            "dense_last": 1,
            "min_seq_len": 100,
            "decode": "dense",
            "dense_sdpa": "flash_when_causal",
            "dense_decode": "sdpa",
            "rules": [{"layers": [1], "topk": 5}],
        }
    )
    site = policy.for_site("model.layers.1.self_attn", 1, 4)
    # What examples/train_distributed.py built by hand before compile_blocks: the decision, run-time settings kept.
    assert site.to_dict() == {
        "version": 1,
        "chunk_size": 512,
        "topk": 5,
        "dense_last": 0,
        "min_seq_len": 100,
        "decode": "dense",
        "dense_sdpa": "flash_when_causal",
        "dense_decode": "sdpa",
        "routing": "head",
        "rules": [],
    }
    assert site.source == "<dict> for model.layers.1.self_attn" and not site.automatic
    # A one-block graph knows neither the layer nor the full path: every site gets the decision.
    for path, layer, n in (("self_attn", None, None), ("x", 7, 1), ("", 0, 32)):
        decision = site.decide(path, layer, n)
        assert (decision.mode, decision.chunk_size, decision.topk) == ("moba", 512, 5)


def test_for_site_of_a_dense_site_is_one_catch_all_dense_rule():
    policy = Policy(chunk_size=512, topk=3, dense_last=1)
    site = policy.for_site("layers.3.attn", 3, 4)
    assert site.to_dict()["rules"] == [{"module": "re:.*", "mode": "dense"}] and site.dense_last == 0
    assert site.num_layers is None
    assert site.decide("attn", None, None).mode == "dense"
    assert site.decide("anything.else", 0, 1).mode == "dense"


@pytest.mark.parametrize("layer", range(6))
def test_for_site_agrees_with_decide_on_hybrid_models(layer):
    # Attention in decoder layers 1, 3 and 5 only: dense_last and negative indices count these.
    policy = Policy(chunk_size=64, topk=2, dense_last=1, rules=[Rule(layers=(-2,), chunk_size=32)])
    path, attention = f"model.layers.{layer}.self_attn", [1, 3, 5]
    want = policy.decide(path, layer, None, attention)
    got = policy.for_site(path, layer, None, attention).decide("self_attn", None, None)
    assert (got.mode, got.chunk_size, got.topk) == (want.mode, want.chunk_size, want.topk)


def test_for_site_keeps_the_automatic_policy_automatic():
    # The automatic policy may fall back to dense where it cannot serve a site exactly; its one-site form too.
    site = DEFAULT_POLICY.for_site("model.layers.0.self_attn", 0, 32)
    assert site.automatic and site.chunk_size == DEFAULT_POLICY.chunk_size and site.topk == DEFAULT_POLICY.topk
    assert DEFAULT_POLICY.for_site("model.layers.31.self_attn", 31, 32).decide("self_attn", None, None).mode == "dense"
    # Unknown layer: dense_last cannot apply, as in decide().
    assert DEFAULT_POLICY.for_site("m", None, None).decide("m", None, None).mode == "moba"


def test_for_site_round_trips_and_is_frozen():
    site = Policy(chunk_size=128, topk=4, dense_last=2).for_site("layers.0", 0, 3)
    assert load_policy(site.to_dict()) == site
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.topk = 1  # type: ignore[misc]


def test_dense_sdpa_bad_value_in_a_file_names_the_file_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "p.toml", 'version = 1\ndense_sdpa = "flash"\n')
    assert error_of(path) == f"{path}: dense_sdpa = 'flash' is not valid; allowed: 'as_is', 'flash_when_causal'"
    path = write(tmp_path, "p.json", json.dumps({"dense_sdpa": 1}))
    assert error_of(path) == f"{path}: dense_sdpa = 1 is not valid; allowed: 'as_is', 'flash_when_causal'"


def test_dense_decode_bad_value_in_a_file_names_the_file_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "p.toml", 'version = 1\ndense_decode = "splitk"\n')
    assert error_of(path) == f"{path}: dense_decode = 'splitk' is not valid; allowed: 'sdpa', 'split_k'"
    path = write(tmp_path, "p.json", json.dumps({"dense_decode": 1}))
    assert error_of(path) == f"{path}: dense_decode = 1 is not valid; allowed: 'sdpa', 'split_k'"
    path = write(tmp_path, "p.toml", 'version = 1\ndense_decode = "sdpa"\n')
    assert load_policy(path).dense_decode == "sdpa"
