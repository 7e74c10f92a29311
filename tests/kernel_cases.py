"""Helpers the interpreted Triton kernel tests share: seeded inputs, the out/lse budget, the compile check, the device.

Kernel test modules import them as ``from kernel_cases import ...`` (pytest puts ``tests/`` on ``sys.path``), after
setting ``TRITON_INTERPRET``. Nothing here imports triton.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
from conftest import Case, make_mask

# "cpu" (default): the kernels run under the Triton interpreter. "cuda" (run with TRITON_INTERPRET=0 on a GPU machine):
# every kernel launcher the tests call through ``on_test_device`` runs compiled on the GPU, while inputs, oracles and
# budgets stay exactly those of the CPU run, so the same suite checks the compiled kernels.
TEST_DEVICE = torch.device(os.environ.get("MOBA_TEST_DEVICE", "cpu"))


def _tree_map(fn: Callable[[torch.Tensor], torch.Tensor], x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # named tuples (the flip's lists)
        return type(x)(*(_tree_map(fn, i) for i in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_map(fn, i) for i in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):  # FlipResult
        return dataclasses.replace(x, **{f.name: _tree_map(fn, getattr(x, f.name)) for f in dataclasses.fields(x)})
    return x


def on_test_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run on ``TEST_DEVICE``: CPU tensor arguments are copied there (strides kept), tensor results come back
    to the CPU. The identity when ``TEST_DEVICE`` is the CPU; tensors on other devices (``meta``) pass unchanged."""
    if TEST_DEVICE.type == "cpu":
        return fn

    def there(t: torch.Tensor) -> torch.Tensor:
        return t.to(TEST_DEVICE) if t.device.type == "cpu" else t

    def back(t: torch.Tensor) -> torch.Tensor:
        return t.cpu() if t.device == TEST_DEVICE or t.device.type == TEST_DEVICE.type else t

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _tree_map(back, fn(*_tree_map(there, args), **{k: _tree_map(there, v) for k, v in kwargs.items()}))

    return wrapper


def layout_randn(case: Any, g: torch.Generator) -> Callable[[int, int, int], torch.Tensor]:
    """``rand(heads, length, dim)``: a seeded ``[B, heads, length, dim]`` tensor in the case's dtype and layout."""

    def rand(h: int, length: int, dim: int) -> torch.Tensor:
        if case.strided:  # the [B, L, H, D] layout of a projection, viewed as [B, H, L, D]
            return torch.randn(case.b, length, h, dim, generator=g).to(case.dtype).transpose(1, 2)
        return torch.randn(case.b, h, length, dim, generator=g).to(case.dtype)

    return rand


def prefill_inputs(case: Case, seed: int = 0, *, grad_out: bool = False) -> tuple[torch.Tensor | None, ...]:
    """Seeded ``(q, k, v, mask)``, or ``(q, k, v, dO, mask)`` with ``grad_out`` (``mask`` may be ``None``): the inputs
    of a :func:`conftest.kernel_case` or (``lq = 1``) :func:`conftest.decode_case`."""
    g = torch.Generator().manual_seed(seed)
    lk, dv = case.len_k, case.dv or case.d
    rand = layout_randn(case, g)
    tensors = [rand(case.hq, case.lq, case.d), rand(case.hkv, lk, case.d), rand(case.hkv, lk, dv)]
    if grad_out:
        tensors.append(rand(case.hq, case.lq, dv))
    # Drawn after the tensors, from the same generator (the order every kernel test's data was made in).
    mask = make_mask(case.mask, case.b, case.hq, case.lq, lk, generator=g)
    return (*tensors, mask)


def assert_out_lse_within_budget(out, lse, out64, out_lp, lse64, lse_lp, empty, dtype: torch.dtype) -> None:
    """The forward/decode budgets (module docs of the tests): exact empty rows, ``out`` and ``lse`` errors.

    ``out64``/``lse64`` are the float64 oracle, ``out_lp``/``lse_lp`` the reference on the same ``dtype`` inputs,
    ``empty`` the rows without an attended key (``lse = -inf`` and ``out = 0`` there, exactly).
    """
    assert torch.equal(torch.isinf(lse), empty), "rows without keys must be exactly the reference's"
    assert torch.all(lse[empty] == -math.inf)
    assert torch.all(out[empty] == 0)
    ref_err = (out_lp.double() - out64).abs().max().item()
    err = (out.double() - out64).abs().max().item()
    tol = 2 * ref_err + torch.finfo(dtype).eps * max(out64.abs().max().item(), 1e-3)
    assert err <= tol, f"out error {err:.3e} > {tol:.3e} (reference's own error {ref_err:.3e})"
    if (~empty).any():
        lse_ref_err = (lse_lp.double() - lse64)[~empty].abs().max().item()
        lse_err = (lse.double() - lse64)[~empty].abs().max().item()
        lse_tol = 2 * lse_ref_err + 8 * torch.finfo(torch.float32).eps * max(1.0, lse64[~empty].abs().max().item())
        assert lse_err <= lse_tol, f"lse error {lse_err:.3e} > {lse_tol:.3e}"


def compile_check_records(args: list[str]) -> dict[str, dict[str, Any]]:
    """Run ``python <args>`` (a compile check printing its JSON records last) in the repository root without
    ``TRITON_INTERPRET``; assert it succeeded and return the records by kernel name."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return {r["kernel"]: r for r in json.loads(res.stdout.strip().splitlines()[-1])}


def record_allocations(monkeypatch: Any, module: Any) -> list[tuple[int, torch.dtype]]:
    """``(numel, dtype)`` of every buffer ``module`` allocates through ``launch.empty`` from now on (the list fills as
    the launcher runs): how the kernel tests bound a launcher's scratch memory."""
    from moba_compile.kernels import launch

    sizes: list[tuple[int, torch.dtype]] = []

    def spy(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = launch.empty(*shape, dtype=dtype, device=device)
        sizes.append((t.numel(), dtype))
        return t

    monkeypatch.setattr(module, "empty", spy)
    return sizes
