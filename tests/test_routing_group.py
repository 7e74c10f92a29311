"""GQA-shared ("group") routing (spec section 6, issue 15 part 4): reference, ops, interpreted kernels, policy, pass.

``routing = "group"``: for GQA/MQA one selection per (batch, key head, query position). The gate score of chunk ``c``
is the sum over the group's query heads of ``q_h . mean(key[c])`` (fp32), its top-(K-1) (ties to the later chunk) is
shared by every query head of the group. With ``Hq == Hkv`` it is head routing.

Oracles and budgets (each named):

- :func:`naive_group_allowed` below: the rule read literally, one (batch, key head, row) at a time in float64, sharing
  no code with the reference. The reference must give its selection exactly (float64 inputs: two correct sums in
  another order differ by ~1e-16, far below any score gap of N(0, 1) data; exact ties are exact in both) and its
  output within ``conftest.F64``.
- The interpreted Triton kernels reuse the kernel suites' checks with ``routing="group"``: exact gate index sets, the
  forward's ``out``/``lse`` and the backward's gradients within those suites' data-derived budgets (module docs of
  ``test_kernels_forward.py`` / ``test_kernels_backward.py``), deterministic mode bitwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (a missing triton must fail the tests, not skip them)
from conftest import F64, decode_case, kernel_case, masked_attention  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_cases import TEST_DEVICE, assert_out_lse_within_budget, on_test_device, prefill_inputs  # noqa: E402
from models import TinyLM  # noqa: E402
from test_kernels_backward import check_backward  # noqa: E402
from test_kernels_decode import check_decode  # noqa: E402
from test_kernels_forward import check_forward, check_gate  # noqa: E402

import moba_compile  # noqa: E402
from moba_compile import ops, reference  # noqa: E402
from moba_compile.backend import make_backend  # noqa: E402
from moba_compile.kernels import launch as kernel_launch  # noqa: E402
from moba_compile.kernels import moba_backward_triton, moba_decode_static_triton, moba_forward_triton  # noqa: E402
from moba_compile.kernels.decode import decode_chunk_means  # noqa: E402
from moba_compile.policy import Policy, PolicyError, Rule, load_policy  # noqa: E402
from moba_compile.report import Report, SiteRecord  # noqa: E402

moba_backward_triton = on_test_device(moba_backward_triton)
moba_decode_static_triton = on_test_device(moba_decode_static_triton)
moba_forward_triton = on_test_device(moba_forward_triton)
decode_chunk_means = on_test_device(decode_chunk_means)

torch._dynamo.config.fail_on_recompile_limit_hit = True  # a test must never pass on Dynamo's silent eager fallback

BAD_ROUTING = "routing must be one of 'head', 'group'; got 'token'"


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    # Launcher buffers start as NaN / the largest integer: a selection entry the group gate failed to write for some
    # query head of a group fails the test instead of reading the allocator's leftovers.
    monkeypatch.setattr(kernel_launch, "POISON_BUFFERS", True)


# --------------------------------------------------------------------------------------------------------------------
# The naive oracle
# --------------------------------------------------------------------------------------------------------------------
def naive_group_allowed(query: torch.Tensor, key: torch.Tensor, chunk_size: int, topk: int) -> torch.Tensor:
    """Bool ``[B, Hq, Lq, Lk]``: MoBA's attended keys under group routing, spec section 6 read literally (float64)."""
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    group = hq // hkv
    n_chunks = math.ceil(lk / chunk_size)
    allowed = torch.zeros(b, hq, lq, lk, dtype=torch.bool)
    for bi in range(b):
        for h in range(hkv):
            kh = key[bi, h].double()
            means = [kh[c * chunk_size : min(lk, (c + 1) * chunk_size)].mean(0) for c in range(n_chunks)]
            for i in range(lq):
                p = lk - lq + i
                own = p // chunk_size
                heads = range(h * group, (h + 1) * group)
                scored = [(sum(float(query[bi, g, i].double() @ means[c]) for g in heads), c) for c in range(own)]
                scored.sort(reverse=True)  # highest summed score first; equal scores: the later chunk first
                for g in heads:
                    for _, c in scored[: topk - 1]:
                        allowed[bi, g, i, c * chunk_size : min(lk, (c + 1) * chunk_size)] = True
                    allowed[bi, g, i, own * chunk_size : p + 1] = True
    return allowed


def selected_sets(sel: torch.Tensor) -> list:
    """The chosen chunk indices of every row as sets (``-1`` slots dropped), in row-major order."""
    rows = sel.reshape(sel.shape[:-1].numel(), sel.shape[-1])  # K' - 1 may be 0 (topk = 1)
    return [frozenset(int(c) for c in row if c >= 0) for row in rows.tolist()]


def allowed_chunks(allowed: torch.Tensor, query_len: int, chunk_size: int) -> list:
    """The earlier chunks an ``allowed`` mask gives each row (own chunk excluded), as sets in row-major order."""
    lk = allowed.shape[-1]
    rows = allowed.reshape(-1, query_len, lk)
    out = []
    for plane in rows:
        for i, row in enumerate(plane):
            own = (lk - query_len + i) // chunk_size
            out.append(frozenset(int(k) // chunk_size for k in row.nonzero().flatten() if int(k) // chunk_size < own))
    return out


def gqa_inputs(b, hq, hkv, lq, lk, d, seed, *, dtype=torch.float64):
    """Seeded N(0, 1) ``q [b, hq, lq, d], k, v [b, hkv, lk, d]`` (drawn in float64, then cast to ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_ties(q: torch.Tensor, k: torch.Tensor, chunk_size: int) -> None:
    """In place: chunks 2, 3 := chunks 0, 1 where they exist (complete), and every third query row := 0."""
    lk = k.shape[2]
    for src, dst in ((0, 2), (1, 3)):
        if (dst + 1) * chunk_size <= lk:
            k[:, :, dst * chunk_size : (dst + 1) * chunk_size] = k[:, :, src * chunk_size : (src + 1) * chunk_size]
    q[:, :, ::3] = 0


# --------------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------------
@settings(deadline=None, derandomize=True, database=None, max_examples=40)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 3),
    group=st.integers(1, 4),
    chunk=st.integers(1, 6),
    lk=st.integers(1, 40),
    lq_frac=st.floats(0.0, 1.0),
    topk=st.integers(1, 6),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(b=1, hkv=1, group=4, chunk=4, lk=32, lq_frac=1.0, topk=3, ties=True, seed=0)  # MQA with exact ties
@example(b=2, hkv=2, group=3, chunk=5, lk=37, lq_frac=0.3, topk=2, ties=False, seed=1)  # Lq < Lk, partial chunk
def test_reference_matches_naive_group_routing(b, hkv, group, chunk, lk, lq_frac, topk, ties, seed) -> None:
    lq = max(1, round(lq_frac * lk))
    q, k, v = gqa_inputs(b, hkv * group, hkv, lq, lk, 4, seed)
    if ties:
        make_ties(q, k, chunk)
    allowed = naive_group_allowed(q, k, chunk, topk)
    sel = reference.select_chunks(q, k, chunk_size=chunk, topk=topk, routing="group")
    assert selected_sets(sel) == allowed_chunks(allowed, lq, chunk)
    # One selection per (batch, key head, row): every query head of a group holds the same list, in the same order.
    per_group = sel.view(b, hkv, group, lq, -1)
    assert torch.equal(per_group, per_group[:, :, :1].expand_as(per_group))
    out, lse = reference.moba_attention_forward(q, k, v, chunk_size=chunk, topk=topk, routing="group")
    torch.testing.assert_close(out, masked_attention(q, k, v, allowed), **F64)
    assert torch.equal(torch.isinf(lse), ~allowed.any(-1))


@settings(deadline=None, derandomize=True, database=None, max_examples=20)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    chunk=st.integers(1, 6),
    lk=st.integers(1, 40),
    lq_frac=st.floats(0.0, 1.0),
    topk=st.integers(1, 6),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equal_head_counts_make_group_routing_head_routing(b, h, chunk, lk, lq_frac, topk, ties, seed) -> None:
    lq = max(1, round(lq_frac * lk))
    q, k, v = gqa_inputs(b, h, h, lq, lk, 4, seed, dtype=torch.float32)
    if ties:
        make_ties(q, k, chunk)
    kw = dict(chunk_size=chunk, topk=topk)
    assert torch.equal(
        reference.select_chunks(q, k, **kw, routing="group"), reference.select_chunks(q, k, **kw, routing="head")
    )
    head, group = (reference.moba_attention_forward(q, k, v, **kw, routing=r) for r in ("head", "group"))
    assert torch.equal(head[0], group[0]) and torch.equal(head[1], group[1])
    do = torch.randn_like(head[0])
    grads = [reference.moba_attention_backward(do, q, k, v, *head, **kw, routing=r) for r in ("head", "group")]
    assert all(torch.equal(a, c) for a, c in zip(*grads))


def test_group_routing_changes_the_selection_of_gqa() -> None:
    # A check that the option does something: on random GQA data some query heads disagree with their group's choice.
    q, k, v = gqa_inputs(1, 8, 2, 64, 64, 8, seed=3)
    head = reference.select_chunks(q, k, chunk_size=8, topk=3)
    group = reference.select_chunks(q, k, chunk_size=8, topk=3, routing="group")
    assert selected_sets(head) != selected_sets(group)
    out_h = reference.moba_attention(q, k, v, chunk_size=8, topk=3)
    out_g = reference.moba_attention(q, k, v, chunk_size=8, topk=3, routing="group")
    assert (out_h - out_g).abs().max() > 1e-3


def test_reference_gradients_are_autograd_of_the_group_forward() -> None:
    q, k, v = gqa_inputs(2, 6, 2, 24, 30, 8, seed=5)
    kw = dict(chunk_size=4, topk=3, routing="group")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = reference.moba_attention_forward(*leaves, **kw)
    do = torch.randn_like(out)
    out.backward(do)
    grads = reference.moba_attention_backward(do, q, k, v, out.detach(), lse, **kw)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, **F64)


def test_static_decode_reference_follows_the_device_length() -> None:
    q, k, v = gqa_inputs(2, 4, 1, 1, 48, 8, seed=7)
    length = torch.tensor([29, 48])
    out, _ = reference.moba_static_decode_forward(q, k, v, length, chunk_size=4, topk=3, routing="group")
    for i, n in enumerate(length.tolist()):
        ref = reference.moba_attention(q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], chunk_size=4, topk=3,
                                       routing="group")  # fmt: skip
        torch.testing.assert_close(out[i : i + 1], ref, **F64)


def test_packed_documents_route_by_group_each_on_its_own() -> None:
    q, k, v = gqa_inputs(1, 4, 2, 30, 30, 8, seed=9)
    cu = torch.tensor([0, 11, 30])
    out = moba_compile.moba_attention(q, k, v, chunk_size=4, topk=2, cu_seqlens=cu, routing="group")
    for s, e in ((0, 11), (11, 30)):
        ref = reference.moba_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], chunk_size=4, topk=2, routing="group")
        torch.testing.assert_close(out[:, :, s:e], ref, **F64)


# --------------------------------------------------------------------------------------------------------------------
# The op boundary
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda q, k: reference.moba_attention(q, k, k, chunk_size=4, topk=2, routing="token"),
        lambda q, k: reference.select_chunks(q, k, chunk_size=4, topk=2, routing="token"),
        lambda q, k: moba_compile.moba_attention(q, k, k, chunk_size=4, topk=2, routing="token"),
        lambda q, k: ops.packed_attention(q, k, k, torch.tensor([0, 16]), chunk_size=4, topk=2, routing="token"),
        lambda q, k: torch.ops.moba.attention(q, k, k, None, None, 4, 2, 0.5, 0, "reference", None, "token"),
        lambda q, k: moba_forward_triton(q, k, k, 16, 2, 0.5, routing="token"),
    ],
    ids=["reference", "select_chunks", "api", "packed", "op", "kernel"],
)
def test_bad_routing_names_the_value_and_the_allowed_ones(call) -> None:
    q = torch.randn(1, 2, 16, 16)
    with pytest.raises(ValueError, match=BAD_ROUTING):
        call(q, q[:, :1])


def test_op_gradients_and_forward_mode_follow_group_routing() -> None:
    q, k, v = gqa_inputs(1, 4, 2, 20, 20, 8, seed=11)
    kw = dict(chunk_size=4, topk=2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = moba_compile.moba_attention(*leaves, **kw, routing="group", impl="reference")
    do = torch.randn_like(out)
    out.backward(do)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference.moba_attention(*ref_leaves, **kw, routing="group")
    ref.backward(do)
    torch.testing.assert_close(out, ref, **F64)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, **F64)
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    _, t_out = torch.func.jvp(
        lambda *x: moba_compile.moba_attention(*x, **kw, routing="group", impl="reference"), (q, k, v), tangents
    )
    t_ref, _ = reference.moba_attention_jvp(q, k, v, *tangents, **kw, routing="group")
    torch.testing.assert_close(t_out, t_ref, **F64)
    # vmap folds the vmapped dim into the batch: the routing argument must survive the rule.
    batched = torch.func.vmap(lambda x: moba_compile.moba_attention(x, k, v, **kw, routing="group"))(
        q[None].repeat(2, 1, 1, 1, 1)
    )
    torch.testing.assert_close(batched[1], ref.detach(), **F64)


def test_static_decode_op_routes_by_group() -> None:
    q, k, v = gqa_inputs(1, 4, 2, 1, 64, 16, seed=13, dtype=torch.float32)
    means = ops.static_chunk_means_buffer(k, 8)
    length = torch.tensor(45)
    with torch.no_grad():
        ops.update_static_chunk_means_(means, k, length, new_tokens=45, chunk_size=8)
        out = ops.static_decode(q, k, v, chunk_means=means, length=length, chunk_size=8, topk=3, routing="group")
        ref = ops.attention(q, k[:, :, :45], v[:, :, :45], chunk_size=8, topk=3, routing="group")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)  # fp32: means summed in another order (one ulp or so)


# --------------------------------------------------------------------------------------------------------------------
# Interpreted Triton kernels (tiny shapes: ~2 ms per program and key block)
# --------------------------------------------------------------------------------------------------------------------
KERNEL_GRID = [
    kernel_case(1, 64, 4, 2, 16, 3, torch.bfloat16),  # GQA, group of 2
    kernel_case(1, 64, 4, 2, 16, 3, torch.float16),
    kernel_case(1, 96, 4, 1, 32, 2, torch.bfloat16),  # MQA
    kernel_case(2, 48, 6, 2, 16, 4, torch.float16, lk=80),  # group of 3 (not a power of two), Lq < Lk, batch 2
    kernel_case(1, 64, 4, 2, 16, 3, torch.bfloat16, mask="random_b1_empty"),  # mask incl. fully masked rows
    kernel_case(1, 64, 4, 2, 16, 3, torch.float32),  # fp32: IEEE dots
    kernel_case(1, 64, 2, 2, 16, 3, torch.bfloat16),  # MHA: the head-routing gate is launched
]


@pytest.mark.parametrize("case", KERNEL_GRID, ids=lambda c: c.id)
def test_triton_gate_forward_and_backward_match_the_reference(case) -> None:
    q, k, v, do, mask = prefill_inputs(case, grad_out=True)
    check_gate(q, k, case.c, case.k, routing="group")
    check_forward(q, k, v, case.c, case.k, mask, routing="group")
    check_backward(q, k, v, do, case.c, case.k, mask, routing="group")


def test_triton_gate_exact_ties_go_to_the_later_chunk() -> None:
    q, k, _ = gqa_inputs(1, 4, 2, 96, 96, 16, seed=17, dtype=torch.bfloat16)
    make_ties(q, k, 16)
    sel = check_gate(q, k, 16, 3, routing="group")
    ref = reference.select_chunks(q, k, chunk_size=16, topk=3, routing="group")
    assert torch.equal(sel.long(), ref), "ties: the same chunks in the same order (later chunk first)"


def test_triton_deterministic_backward_is_bitwise_reproducible() -> None:
    q, k, v, do, _ = prefill_inputs(kernel_case(1, 64, 4, 1, 16, 3, torch.bfloat16), grad_out=True)
    out, lse = moba_forward_triton(q, k, v, 16, 3, 0.125, routing="group")
    runs = [moba_backward_triton(do, q, k, v, out, lse, 16, 3, 0.125, None, True, routing="group") for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    check_backward(q, k, v, do, 16, 3, deterministic=True, routing="group")


DECODE_GRID = [
    decode_case(2, 100, 4, 2, 16, 3, torch.bfloat16),  # GQA, partial own chunk
    decode_case(2, 100, 4, 1, 16, 3, torch.float16),  # MQA
    decode_case(1, 600, 4, 2, 16, 4, torch.float16),  # 37 earlier chunks: two-stage gate (ranges + merge)
    decode_case(1, 50, 80, 1, 16, 2, torch.float16),  # 80 query heads: two row blocks per key head score one group
    decode_case(3, 100, 4, 2, 16, 3, torch.bfloat16, mask="left_pad_spread"),
]


@pytest.mark.parametrize("case", DECODE_GRID, ids=lambda c: c.id)
def test_triton_decode_matches_the_reference(case) -> None:
    q, k, v, mask = prefill_inputs(case)
    check_decode(q, k, v, case.c, case.k, mask, routing="group")


def test_triton_static_decode_matches_the_reference() -> None:
    q, k, v, _ = prefill_inputs(decode_case(2, 128, 4, 2, 16, 3, torch.bfloat16))
    means = decode_chunk_means(k, 16)
    length = torch.tensor([77, 128])
    out, lse = moba_decode_static_triton(q, k, v, means, length, 16, 3, 0.125, routing="group")
    kw = dict(chunk_size=16, topk=3, scale=0.125, routing="group")
    out64, lse64 = reference.moba_static_decode_forward(q.double(), k.double(), v.double(), length, **kw)
    out_lp, lse_lp = reference.moba_static_decode_forward(q, k, v, length, **kw)
    assert_out_lse_within_budget(out, lse, out64, out_lp, lse64, lse_lp, torch.isinf(lse64), q.dtype)


def test_through_the_op_on_the_triton_path() -> None:
    # The op's forward and registered backward must hand routing to the launchers: its results are bitwise the group
    # launchers' (deterministic mode: no float atomics, also on a GPU), and differ from head routing's.
    q, k, v, do, _ = prefill_inputs(kernel_case(1, 64, 4, 2, 16, 3, torch.float16), grad_out=True)
    leaves = [t.clone().to(TEST_DEVICE).requires_grad_() for t in (q, k, v)]
    before = ops.CALLS["attention_backward:triton"]
    torch.use_deterministic_algorithms(True, warn_only=True)  # the op's backward then takes the deterministic path
    try:
        out = moba_compile.moba_attention(*leaves, chunk_size=16, topk=3, routing="group", impl="triton")
        out.backward(do.to(TEST_DEVICE))
    finally:
        torch.use_deterministic_algorithms(False)
    assert ops.CALLS["attention_backward:triton"] == before + 1
    for routing, same in (("group", True), ("head", False)):
        o, lse = moba_forward_triton(q, k, v, 16, 3, 0.125, routing=routing)
        grads = moba_backward_triton(do, q, k, v, o, lse, 16, 3, 0.125, deterministic=True, routing=routing)
        assert torch.equal(out.detach().cpu(), o) is same
        assert all(torch.equal(leaf.grad.cpu(), g) for leaf, g in zip(leaves, grads)) is same


# --------------------------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------------------------
def test_policy_routing_at_top_level_and_per_rule(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('routing = "group"\ndense_last = 0\n[[rules]]\nlayers = [1]\nrouting = "head"\n')
    policy = load_policy(str(path))
    assert policy.routing == "group"
    assert policy.decide("layers.0.attn", 0, 3).routing == "group"
    assert policy.decide("layers.1.attn", 1, 3).routing == "head"
    assert policy.rules[0] == Rule(layers=(1,), routing="head")  # a rule may set routing alone
    assert load_policy(policy.to_dict()) == policy
    assert policy.to_dict()["routing"] == "group" and policy.to_dict()["rules"][0]["routing"] == "head"
    assert Policy().to_dict()["routing"] == "head"  # every top-level key is written
    assert policy.for_site("layers.0.attn", 0, 3).decide("x", None, None).routing == "group"
    assert Policy().decide("layers.0.attn", 0, 8).routing == "head"


@pytest.mark.parametrize(
    "text,message",
    [
        ('routing = "token"\n', "{path}: routing = 'token' is not valid; allowed: 'head', 'group'"),
        (
            '[[rules]]\nlayers = [0]\nrouting = "heads"\n',
            "{path}: rules[0].routing = 'heads' is not valid; allowed: 'head', 'group'",
        ),  # fmt: skip
        ("routing = 1\n", "{path}: routing = 1 is not valid; allowed: 'head', 'group'"),
    ],
    ids=["top-level", "rule", "type"],
)
def test_policy_errors_name_file_key_and_value(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        load_policy(str(path))
    assert str(err.value) == message.format(path=path)


def test_report_shows_routing_only_where_a_site_routes_by_group() -> None:
    head = SiteRecord("layers.0.attn", 0, "moba", 8, 2, "default policy", impl="reference")
    group = SiteRecord("layers.1.attn", 1, "moba", 8, 2, "default policy", impl="reference", routing="group")
    dense = SiteRecord("layers.2.attn", 2, "dense", None, None, "dense_last=1", routing="group")
    assert dense.routing is None  # a dense site runs SDPA: no routing
    assert "routing" not in str(Report([head, dense]))
    lines = str(Report([head, group, dense])).splitlines()
    assert lines[2].split()[:8] == ["graph", "layer", "module", "decision", "chunk", "topk", "routing", "form"]
    assert [line.split()[6] for line in lines[4:7]] == ["head", "group", "-"]
    assert Report([group]).to_dict()["sites"][0]["routing"] == "group"
    with pytest.raises(ValueError, match="SiteRecord.routing = 'x' is not valid"):
        SiteRecord("a", 0, "moba", 8, 2, "r", routing="x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# The compile pass
# --------------------------------------------------------------------------------------------------------------------
POLICY = {
    "chunk_size": 8,
    "topk": 2,
    "dense_last": 0,
    "routing": "group",
    "rules": [{"layers": [1], "routing": "head"}],
}


def test_pass_gives_each_site_its_routing_and_the_outputs_follow_it() -> None:
    torch.manual_seed(0)
    model = TinyLM(kv_heads=2, n_layers=3)  # 4 query heads, 2 key heads
    ids = torch.randint(0, 50, (1, 40))
    graphs = []
    torch._dynamo.reset()
    backend = make_backend({"policy": POLICY, "compiler": "eager"})

    def capture(gm, example_inputs):
        compiled = backend(gm, example_inputs)
        graphs.append(gm)
        return compiled

    out = torch.compile(model, backend=capture)(ids)
    calls = [n for n in graphs[0].graph.nodes if n.target is torch.ops.moba.attention.default]
    assert [n.args[-1] for n in calls] == ["group", "head", "group"]
    # The oracle twin: each layer's SDPA replaced by the reference with that layer's routing.
    twin = TinyLM(kv_heads=2, n_layers=3)
    twin.load_state_dict(model.state_dict())
    for attn, routing in zip(twin.attention_modules(), ("group", "head", "group")):
        attn.sdpa = lambda q, k, v, routing=routing, **_: reference.moba_attention(q, k, v, chunk_size=8, topk=2,
                                                                                   routing=routing)  # fmt: skip
    torch.testing.assert_close(out, twin(ids), atol=2e-5, rtol=0)  # fp32 rounding through three layers


def test_explain_reports_the_routing() -> None:
    torch.manual_seed(0)
    report = moba_compile.explain(TinyLM(kv_heads=2, n_layers=3), torch.randint(0, 50, (1, 24)), policy=POLICY)
    assert [s.routing for s in report.sites] == ["group", "head", "group"]
    header = str(report).splitlines()[2].split()
    assert header[6] == "routing"


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face attention function (attn_implementation="moba")
# --------------------------------------------------------------------------------------------------------------------
def test_hf_attention_function_routes_by_group_prefill_and_decode() -> None:
    transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")
    from models import TINY_LLAMA, TOKEN_IDS
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import moba_compile.hf

    def oracle(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = reference.moba_attention(query, key, value, chunk_size=8, topk=2, scale=scaling, routing="group")
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("group_oracle", oracle)
    AttentionMaskInterface.register("group_oracle", sdpa_mask)
    attention = moba_compile.hf.register({**POLICY, "rules": []}, name="moba_group")  # every layer group-routed
    # One config object per model: the attention implementation is read from the (shared) config at every call.
    config = {**TINY_LLAMA, **TOKEN_IDS}  # 4 query heads, 2 key/value heads
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**config), attn_implementation="moba_group"
    ).eval()
    twin = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**config), attn_implementation="group_oracle"
    ).eval()
    twin.load_state_dict(model.state_dict())
    ids = torch.randint(3, 64, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids).logits
        expected = twin(ids).logits
    torch.testing.assert_close(logits, expected, atol=3e-5, rtol=0)  # fp32 model, same reference math per layer
    assert {s.routing for s in attention.report().sites} == {"group"}
    # A decode step over the KV cache (the last row of a prefill over the same keys) takes the same routing.
    with torch.no_grad():
        cache = model(ids[:, :-1], use_cache=True).past_key_values
        step = model(ids[:, -1:], **{moba_compile.hf.cache_keyword(): cache}, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, expected[:, -1], atol=3e-5, rtol=0)
