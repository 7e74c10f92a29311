"""The report (``moba_compile.report``): the table within 120 columns, its notes, the JSON form, and the fields a dense
site must not claim (an impl, effective density)."""

from __future__ import annotations

import dataclasses
import doctest
import json

import pytest
from report_text import parse_report_table

import moba_compile.report as report_mod
from moba_compile.report import TABLE_WIDTH, Report, SiteRecord

# What a 32-layer Hugging Face model on the CPU gives under the hybrid policy: long module paths, the impl's reason,
# reasons of 60-110 characters shared by many layers, and a few short ones.
MASK_REASON = (
    "default policy; boolean mask, checked for causality once per forward; repeat_kv seen through (key/value not "
    "repeated)"
)


def hf_like_report() -> Report:
    sites = [SiteRecord("model.layers.0.self_attn", 0, "dense", None, None, "rule 0 (layers=[0])", form="mask")]
    for i in range(1, 29):
        sites.append(
            SiteRecord(
                f"model.layers.{i}.self_attn",
                i,
                "moba",
                2048,
                3,
                MASK_REASON,
                form="mask",
                impl="reference (CPU tensors)",
                mask_tag="g0:mask:0",
            )
        )
    for i in range(29, 32):
        reason = f"dense_last=3: layer {i} is among the last 3 of 32 attention layers"
        sites.append(SiteRecord(f"model.layers.{i}.self_attn", i, "dense", None, None, reason, form="mask"))
    unmatched = [f"rule {i} (module='re:.*vision_tower\\\\.blocks\\\\.{i}\\\\.attn')" for i in range(1, 6)]
    return Report(sites, unmatched, policy_source="examples/policies/hybrid.toml")


def test_hf_sized_report_fits_120_columns_and_keeps_every_reason() -> None:
    report = hf_like_report()
    text = str(report)
    assert max(len(line) for line in text.splitlines()) <= TABLE_WIDTH
    rows, notes = parse_report_table(text)
    assert len(rows) == 32 and all(len(r) == 9 for r in rows)
    # Every reason is recoverable, in full, from its row or its note.
    assert [notes.get(r[8], r[8]) for r in rows] == [s.reason for s in report.sites]
    # Short reasons stay in the row; the 28 identical long ones share one note.
    assert rows[0][8] == "rule 0 (layers=[0])"
    assert {r[8] for r in rows[1:29]} == {"[1]"} and notes["[1]"] == MASK_REASON
    # The rules that matched no site are wrapped, not cut.
    tail = text[text.index("rules that matched no site:") :]
    assert " ".join(tail.split()).count("vision_tower") == 5


def test_short_reports_keep_reasons_inline() -> None:
    sites = [SiteRecord("layers.1.attn", 1, "moba", 64, 2, "default policy", form="is_causal", impl="reference")]
    text = str(Report(sites))
    assert "notes:" not in text
    assert text.splitlines()[-1].split() == ["0", "1", "layers.1.attn", "moba", "64", "2", "is_causal", "reference"] + [
        "default",
        "policy",
    ]


@pytest.mark.parametrize("width", [110, 120, 160])
def test_width_is_respected_for_any_width_the_fixed_columns_allow(width: int) -> None:
    report = hf_like_report()
    text = report.format(width=width)
    rows, notes = parse_report_table(text)
    assert max(len(line) for line in text.splitlines()) <= width
    assert [notes.get(r[8], r[8]) for r in rows] == [s.reason for s in report.sites]


def test_dense_sites_show_no_impl() -> None:
    site = SiteRecord("a", 0, "dense", None, None, "rule 0", impl="triton", effectively_dense=True)
    assert site.impl == "-" and site.effectively_dense is False
    # A site planned as MoBA and sent dense by the run-time mask check loses its impl too.
    planned = SiteRecord("a", 0, "moba", 8, 2, "default", impl="reference (CPU tensors)", mask_tag="t")
    ended = Report([planned]).with_mask_observations({"t": 2}, {2: "mask not causal"}).sites[0]
    assert (ended.decision, ended.impl, ended.chunk_size, ended.topk) == ("dense", "-", None, None)
    rows, _ = parse_report_table(str(Report([ended])))
    assert rows[0][7] == "-"


def test_effectively_dense_sites_are_marked_and_counted() -> None:
    sites = [
        SiteRecord("l.0", 0, "moba", 4096, 12, "default policy", impl="reference", effectively_dense=True),
        SiteRecord("l.1", 1, "moba", 16, 2, "default policy", impl="reference"),
        SiteRecord("l.2", 2, "dense", None, None, "dense_last=1"),
    ]
    report = Report(sites)
    text = str(report)
    assert text.splitlines()[0] == "moba-compile report: 2 of 3 attention sites on MoBA (1 effectively dense)"
    rows, _ = parse_report_table(text)
    assert [r[3] for r in rows] == ["moba*", "moba", "dense"]
    assert "moba*: effectively dense" in text
    assert report.effectively_dense_sites == [sites[0]]
    assert "effectively dense" not in str(Report(sites[1:]))


def test_to_dict_is_json_and_holds_every_field() -> None:
    report = hf_like_report()
    data = json.loads(json.dumps(report.to_dict()))
    assert data["policy_source"] == "examples/policies/hybrid.toml"
    assert (data["num_sites"], data["num_moba"], data["num_effectively_dense"]) == (32, 28, 0)
    assert data["unmatched_rules"] == report.unmatched_rules
    names = [f.name for f in dataclasses.fields(SiteRecord)]
    assert all(list(site) == names for site in data["sites"])
    assert [SiteRecord(**site) for site in data["sites"]] == report.sites


def test_site_record_rejects_unknown_decision() -> None:
    with pytest.raises(ValueError, match=r"decision = 'sparse' is not valid"):
        SiteRecord("a", 0, "sparse", None, None, "")  # type: ignore[arg-type]


def test_empty_report() -> None:
    text = str(Report())
    assert "0 of 0 attention sites" in text and "(no scaled_dot_product_attention call found)" in text


def test_doctests() -> None:
    result = doctest.testmod(report_mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
