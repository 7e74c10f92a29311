"""The int8 residual of the forward's running output (``moba_forward_triton(..., residual="int8")``), interpreted.

Between the own-chunk pass and each key-major merge a row's output lives as ``out`` (the output dtype) plus a residual
``lo``. The int8 residual stores ``q = round((o - hi) * 2^(MANT + 8 - e))`` (``hi`` = ``o`` rounded to the output dtype,
``e`` its exponent, ``MANT`` = 7 for bf16 and 10 for fp16) and decodes ``hi + q * 2^(e - MANT - 8)``.

The bound the encode/decode test asserts, derived: ``o - hi`` is exact in fp32 and at most half an ulp of ``hi``,
``2^(e - MANT - 1)``, i.e. at most 128 steps of ``2^(e - MANT - 8)``. Rounding to the nearest step costs half a step;
a residual of exactly half an ulp (``|q| = 128``) is clamped to 127 and costs one step. The decode ``hi + q * step`` is
exact in fp32 (at most MANT + 9 significant bits). So ``|decode - o| <= step``, and ``<= step / 2`` wherever
``|q| < 127``. ``e`` is clamped below (fp16: at its smallest normal exponent, -14, where its subnormals' ulp is;
bf16: at -111, where the step stays a normal fp32 number), so zeros and tiny values keep an absolute error of at most
one step there: 2^-32 for fp16 (its subnormal ulp / 256) and 2^-126 for bf16. The test checks it element by element in
float64, and checks the codes themselves against a float64 model of the formula.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from conftest import kernel_case  # noqa: E402
from kernel_cases import TEST_DEVICE, on_test_device, prefill_inputs  # noqa: E402

from moba_compile import reference  # noqa: E402
from moba_compile.kernels import moba_forward_triton  # noqa: E402
from moba_compile.kernels.forward import (  # noqa: E402
    decode_residual,
    encode_residual,
    residual_exponent_floor,
    residual_mantissa_bits,
    round_to_output,
)

moba_forward_triton = on_test_device(moba_forward_triton)


@triton.jit
def _roundtrip_kernel(
    o_ptr, hi_ptr, q_ptr, dec_ptr, n, MANT: tl.constexpr, E_LO: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    o = tl.load(o_ptr + offs, mask=ok, other=0.0)
    hi = round_to_output(o, hi_ptr, INTERP)  # the kernels' own rounding of the running output
    q = encode_residual(o, hi, MANT, E_LO, INTERP)
    tl.store(hi_ptr + offs, hi, mask=ok)
    tl.store(q_ptr + offs, q, mask=ok)
    tl.store(dec_ptr + offs, decode_residual(hi, q, MANT, E_LO, INTERP), mask=ok)


@on_test_device
def roundtrip(o: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hi, q, decoded)`` of the fp32 values ``o`` through the kernels' own encode and decode."""
    hi = torch.empty(o.shape, dtype=dtype, device=o.device)
    q = torch.empty(o.shape, dtype=torch.int8, device=o.device)
    dec = torch.empty(o.shape, dtype=torch.float32, device=o.device)
    block = 256
    mant, e_lo = residual_mantissa_bits(dtype), residual_exponent_floor(dtype)
    interp = o.device.type == "cpu"
    grid = (triton.cdiv(o.numel(), block),)
    _roundtrip_kernel[grid](o, hi, q, dec, o.numel(), MANT=mant, E_LO=e_lo, INTERP=interp, BLOCK=block)
    return hi, q, dec


def hard_values(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """fp32 values that exercise the encoding: zeros, subnormals, the dtype's extremes, exact rounding ties, and random
    values over the dtype's whole exponent range (both signs)."""
    fi = torch.finfo(dtype)
    mant = residual_mantissa_bits(dtype)
    vals = [0.0, -0.0, 1e-45, -1e-45, 1e-40, 2.0**-126, 2.0**-130, fi.tiny, fi.tiny / 2, fi.tiny / 3]
    if dtype == torch.float16:
        vals += [2.0**-24, 2.0**-24 * 1.5, 2.0**-20 + 2.0**-26, 6e-8, 3e-5, -3e-5 * 1.37]  # fp16 subnormals
    else:
        vals += [2.0**-133, 2.0**-120, 2.0**-111 * 1.7, 2.0**-112 * 1.3]  # bf16 subnormals and the clamped exponents
    # The largest finite value, and values just inside and outside it that still round to it.
    top_ulp = 2.0 ** (math.floor(math.log2(fi.max)) - mant)
    vals += [fi.max, -fi.max, fi.max - top_ulp / 3, fi.max + top_ulp / 4, -(fi.max + top_ulp * 0.49)]
    g = torch.Generator().manual_seed(seed)
    # Exact ties (o = hi +- half an ulp): |q| = 128 before the clamp, the worst case. Also just beside them.
    base = torch.randn(64, generator=g).to(dtype).float()
    ulp = 2.0 ** (torch.floor(torch.log2(base.abs())) - mant)
    for frac in (0.5, -0.5, 0.5 - 2.0**-12, -0.5 + 2.0**-12, 1 / 256, 1 / 512, 0.25):
        vals += (base + frac * ulp).tolist()
    # Just below and above powers of two (hi's exponent changes between o and hi).
    for k in (-100, -14, -13, -1, 0, 1, 7, 15, 100):
        if 2.0**k < fi.max:
            vals += [2.0**k * (1 - 2.0**-20), 2.0**k * (1 + 2.0**-20), -(2.0**k) * (1 - 2.0 ** -(mant + 2))]
    # Random values over the exponent range, random mantissas (fp32, below the dtype's ulp).
    lo_e, hi_e = (-26, 15) if dtype == torch.float16 else (-130, 126)
    e = torch.randint(lo_e, hi_e, (4000,), generator=g).double()
    m = 1 + torch.rand(4000, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(4000, generator=g) < 0.5, -1.0, 1.0).double()
    rand = (sign * m * 2.0**e).float()
    vals += rand[rand.abs() <= fi.max].tolist()
    return torch.tensor(vals, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_encode_decode_against_float64(dtype: torch.dtype) -> None:
    o = hard_values(dtype)
    hi, q, dec = roundtrip(o, dtype)
    mant, e_lo = residual_mantissa_bits(dtype), residual_exponent_floor(dtype)
    o64, hi64, dec64 = o.double(), hi.double(), dec.double()
    assert torch.equal(hi, o.to(dtype)), "hi is o rounded to the output dtype (nearest even)"
    assert torch.isfinite(dec).all(), o[~torch.isfinite(dec)]
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    # The step, 2^(max(e, E_LO - 127) - MANT - 8), from hi's exponent (frexp: hi = m * 2^(e + 1), 0.5 <= |m| < 1).
    e = torch.frexp(hi64)[1].double() - 1
    e = torch.where(hi64 == 0, -1e9, e).clamp(min=e_lo - 127)
    step = 2.0 ** (e - mant - 8)
    # The codes are exactly the formula's: round half to even of (o - hi) / step, clamped to +-127.
    want_q = torch.round((o64 - hi64) / step).clamp(-127, 127)
    assert torch.equal(q.double(), want_q), (o[q.double() != want_q], q[q.double() != want_q])
    err = (dec64 - o64).abs()
    assert (err <= step).all(), (o[err > step], err[err > step] / step[err > step])
    inside = q.abs() < 127
    assert (err[inside] <= step[inside] / 2).all()
    # Relative to the element (not to a row maximum): 2^-(MANT + 8) of |hi| where hi is normal and not clamped.
    normal = (hi64.abs() >= 2.0 ** (e_lo - 127)) & (hi64 != 0)
    assert (err[normal] <= 2.0 ** -(mant + 8) * hi64.abs()[normal]).all()
    # Far below anything measurable where the exponent is clamped: tiny absolute errors.
    assert err[~normal].max().item() <= 2.0 ** (e_lo - 127 - mant - 8)
    # A residual of exactly half an ulp was in the set (the clamp at 127 is exercised).
    assert (q.abs() == 127).any() and (q == 0).any()


def _max_err(residual: str, case, seed: int) -> tuple[float, torch.Tensor, float, float]:
    q, k, v, _ = prefill_inputs(case, seed)
    out, _ = moba_forward_triton(q, k, v, case.c, case.k, 0.125, residual=residual)
    kw = dict(chunk_size=case.c, topk=case.k, scale=0.125)
    out64, _ = reference.moba_attention_forward(q.double(), k.double(), v.double(), **kw)
    out_lp, _ = reference.moba_attention_forward(q, k, v, **kw)
    ref_err = (out_lp.double() - out64).abs().max().item()
    tol = 2 * ref_err + torch.finfo(case.dtype).eps * out64.abs().max().item()  # test_kernels_forward's budget
    return (out.double() - out64).abs().max().item(), out, tol, out64.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_forward_with_many_merges_int8_as_accurate_as_bf16(dtype: torch.dtype) -> None:
    # K = 12 over 14 chunks of 16, one head (which keeps the interpreted run short): the last rows' states go through
    # 11 merges (own chunk, then 11 chosen chunks), each rounding the running output to the dtype and storing its
    # residual. Both residuals must meet the forward budget against float64, and the int8 one must not be measurably
    # worse than the bf16 one.
    case = kernel_case(1, 224, 1, 1, 16, 12, dtype, d=32)  # one head: the merges per row are what counts
    err8, out8, tol, top = _max_err("int8", case, seed=3)
    err16, out16, tol16, _ = _max_err("bf16", case, seed=3)
    assert tol == tol16
    assert err8 <= tol and err16 <= tol, (err8, err16, tol)
    one_ulp = torch.finfo(dtype).eps * top
    assert err8 <= 1.5 * err16 + one_ulp, (err8, err16)
    # The max error is the final rounding's and the P operand's (both paths share them), so compare the paths element
    # by element: they compute the same fp32 partials in the same order and differ only in the residual, so their
    # outputs differ only where the int8 state's error (<= 2^-(MANT+8) of the state) moves the final rounding: by one
    # ulp of the element, plus one int8 step of the largest state where the merge cancels (tiny outputs). Dropping the
    # residual (decoding ``hi`` alone) changes 44% of the elements; the int8 residual about 0.6%.
    a, b = out8.double(), out16.double()
    diff = (a - b).abs()
    step = 2.0 ** -(residual_mantissa_bits(dtype) + 8) * top
    assert (diff <= torch.finfo(dtype).eps * torch.maximum(a.abs(), b.abs()) + step).all(), diff.max()
    assert (diff > 0).double().mean().item() < 0.03, (diff > 0).double().mean().item()


def test_residual_argument_is_checked() -> None:
    q = torch.zeros(1, 2, 32, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="residual must be one of"):
        moba_forward_triton(q, q, q, 16, 2, 0.25, residual="fp8")


@pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="counts the launcher's allocations on the CPU")
def test_fp32_keeps_no_residual(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernel_cases import record_allocations

    from moba_compile.kernels import forward as kernel_forward

    case = kernel_case(1, 48, 2, 1, 16, 3, torch.float32, d=16)
    q, k, v, _ = prefill_inputs(case, 1)
    for residual in ("int8", "bf16"):
        sizes = record_allocations(monkeypatch, kernel_forward)
        moba_forward_triton(q, k, v, 16, 3, 0.25, residual=residual)
        assert [dt for _, dt in sizes] == [torch.float32, torch.float32], sizes  # out and lse only


@pytest.mark.parametrize(
    "dtype, residual, mask",
    [
        (torch.bfloat16, "int8", None),
        (torch.float16, "bf16", "random_b1_empty"),
        (torch.float32, "int8", "random_b1_empty"),  # no residual: the state is `out` itself
    ],
    ids=["bf16-int8", "fp16-bf16-mask", "fp32-mask"],
)
def test_prefetched_state_changes_no_bit(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, residual: str, mask
) -> None:
    # PREFETCH_STATE only moves the key-major kernel's state loads before its key loop: the same values meet the same
    # arithmetic, so out and lse must be bitwise those of the loads after the loop (GQA, a chunked prefill, K = 4 so
    # that each row's state goes through three merges; with a user mask and rows without any key).
    from moba_compile.kernels import forward as kernel_forward

    case = kernel_case(1, 40, 4, 2, 16, 4, dtype, lk=90, d=32, mask=mask)
    q, k, v, m = prefill_inputs(case, 4)
    real = kernel_forward._fwd_config
    results = []
    for prefetch in (0, 1):
        cfg = real(32, 32, dtype, m is not None, 16)

        def patched(*args, _cfg=cfg, _p=prefetch, **kwargs):
            return kernel_forward._FwdConfig(*dataclasses.astuple(_cfg)[:8], sp_prefetch=_p)

        monkeypatch.setattr(kernel_forward, "_fwd_config", patched)
        results.append(moba_forward_triton(q, k, v, 16, 4, 0.25, m, residual=residual))
    (out0, lse0), (out1, lse1) = results
    assert torch.equal(out0, out1) and torch.equal(lse0, lse1)
    if m is not None:
        assert torch.isinf(lse0).any() and (lse0 > -math.inf).any()  # both kinds of rows were there
