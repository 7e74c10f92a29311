"""Helpers the benchmark scripts share: timing, device choice, the recorded environment, result paths, and the
ahead-of-time compile check (registers and spills for ``sm_<arch>`` without a GPU)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
GiB = float(1 << 30)

# One compile-check variant: (name, jit kernel, pointer dtypes by argument name, constexprs, num_warps, num_stages).
Variant = tuple[str, Any, dict[str, str], dict[str, Any], int, int]


# ----------------------------------------------------------------------------------------------------------------------
# Timing and device
# ----------------------------------------------------------------------------------------------------------------------
def fmt_or_dash(x: Any, spec: str = ".3f") -> str:
    """One table cell: ``x`` formatted with ``spec``, or ``-`` where the field was not measured (``None``)."""
    return "-" if x is None else format(x, spec)


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, rep: int) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on CUDA; a wall-clock median on the CPU (smoke).

    On the CPU (the ``--smoke`` runs, whose numbers are not results): one untimed call, then up to 3 timed calls while
    the ``rep`` budget (ms) lasts, at least one. An interpreted Triton kernel takes 0.2-0.7 s a call there, so the
    budget bounds the smoke runs as ``--rep`` bounds ``do_bench`` on a GPU, instead of always costing 4 calls.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    samples: list[float] = []
    deadline = time.perf_counter() + rep / 1e3
    while len(samples) < 3:
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
        samples.append((end - start) * 1e3)
        if end >= deadline:
            break
    return sorted(samples)[len(samples) // 2]


def release(device: torch.device) -> None:
    """Wait for the device and hand cached blocks back (CUDA only), so the next measurement starts clean."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def field_recorder(row: dict[str, Any], device: torch.device | None) -> Callable[[str, Callable[[], Any]], None]:
    """``record(field, fn)``: ``row[field] = fn()``, or ``None`` with the failure's first line in ``row["errors"]``
    (out of memory named as such), so one failed measurement never costs the others; then, with a ``device``, the
    memory it held is released (:func:`release`)."""

    def record(field: str, fn: Callable[[], Any]) -> None:
        try:
            row[field] = fn()
        except torch.OutOfMemoryError as exc:
            row[field] = None
            row["errors"][field] = f"out of memory: {str(exc).splitlines()[0]}"
        except Exception as exc:  # noqa: BLE001 - a benchmark records every failure and moves on
            row[field] = None
            row["errors"][field] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if device is not None:
            release(device)

    return record


def bench_device(args: argparse.Namespace) -> torch.device | None:
    """The device a run measures on: the CPU interpreter for ``--smoke`` (no warmup/repetitions), else CUDA.

    Returns ``None`` (after saying so on stderr) when a real run has no CUDA GPU.
    """
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (moba_compile imports it lazily)
        args.warmup, args.rep = 0, 0
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print("no CUDA GPU: use --dry-run for the plan or --smoke to exercise the script", file=sys.stderr)
        return None
    return torch.device("cuda")


# ----------------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    """The stripped stdout of ``git <args>`` run in the repository, or None when git or the repository is missing."""
    try:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """The commit the benchmarks measure: ``{"commit": <HEAD sha or None>, "dirty": <bool or None>}``.

    Read with ``git rev-parse HEAD`` and ``git status --porcelain`` in the repository holding this file; both are None
    outside a git checkout (an installed copy, no ``git`` on the machine). ``dirty`` is True when tracked files differ
    from the commit or untracked, non-ignored files exist: the numbers then measure code the commit does not hold.

    Returns:
        A new dict with the keys ``commit`` and ``dirty``.

    Example:
        >>> sorted(git_state())
        ['commit', 'dirty']
    """
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment(device: torch.device) -> dict[str, Any]:
    """GPU and library versions, and the git commit measured (:func:`git_state`), recorded with the results.

    Args:
        device: the device measured on (CUDA: its name, memory and SM count are recorded).

    Returns:
        A new JSON-serialisable dict: ``torch``, ``cuda``, ``python``, ``date``, ``commit``, ``dirty``, ``triton``,
        ``gpu`` and, on CUDA, ``gpu_memory_gib``/``sm_count``, else ``device``.
    """
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        **git_state(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = props.total_memory / GiB
        env["sm_count"] = props.multi_processor_count
    else:
        env["gpu"] = None
        env["device"] = f"{device.type} ({platform.processor() or platform.machine()}), TRITON_INTERPRET=1"
    return env


def results_path(out_dir: Path, kind: str, env: dict[str, Any]) -> Path:
    """``<out_dir>/<kind>-<gpu>-<date>.json`` (``out_dir`` created); never an earlier run's file of the same day."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env.get("gpu") or "cpu").strip("-").lower()
    stamp = _dt.datetime.now().strftime("%Y%m%d")
    path = out_dir / f"{kind}-{gpu}-{stamp}.json"
    if path.exists():  # never overwrite an earlier run of the same day
        path = out_dir / f"{kind}-{gpu}-{stamp}-{_dt.datetime.now().strftime('%H%M%S')}.json"
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (no GPU needed)
# ----------------------------------------------------------------------------------------------------------------------
def ptxas(arch: int = 90) -> str | None:
    """The ``ptxas`` Triton itself uses for ``sm_<arch>`` (``TRITON_PTXAS_PATH`` and friends honoured, so the PTX
    version Triton emits is one this ``ptxas`` reads); Triton's bundled binaries when that lookup is unavailable."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
        if path and Path(path).exists():
            return str(path)
    except Exception:  # noqa: BLE001 - older/newer Triton layouts: fall back to the bundled binaries below
        pass
    bin_dir = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    return None


def triton_compile(
    fn: Any,
    ptr_types: dict[str, str],
    consts: dict[str, Any],
    warps: int,
    stages: int,
    arch: int,
    div16: Iterable[str],
) -> Any:
    """Compile one kernel variant for ``sm_<arch>`` as a launch would: pointers and the integer arguments named in
    ``div16`` flagged divisible by 16, unit strides specialised to 1 through ``consts``. Returns Triton's compiled
    kernel (``.asm`` holds its ``ptx`` and the ``cubin`` a launch would load, built by Triton's own ``ptxas``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    div16 = set(div16)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, "*i32")
        else:
            sig[name] = "fp32" if name in ("qk_scale", "scale") else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n][0] == "*" or n in div16}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def aot_compile(
    fn: Any,
    ptr_types: dict[str, str],
    consts: dict[str, Any],
    warps: int,
    stages: int,
    arch: int,
    div16: Iterable[str],
) -> dict:
    """Compile one kernel variant with :func:`triton_compile` and read registers/spills from ``ptxas -v``."""
    import subprocess
    import tempfile

    kernel = triton_compile(fn, ptr_types, consts, warps, stages, arch, div16)
    info: dict[str, Any] = {"shared_bytes": kernel.metadata.shared, "registers": None, "spill_bytes": None}
    exe = ptxas(arch)
    if exe is not None:
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(kernel.asm["ptx"])
            res = subprocess.run(
                [exe, "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                capture_output=True,
                text=True,
            )
        if res.returncode != 0:
            # A ptxas that cannot read the PTX must fail the check loudly, not leave registers/spills unknown.
            raise RuntimeError(f"{exe} failed on sm_{arch}a (exit {res.returncode}): {res.stderr[-2000:]}")
        regs = re.search(r"Used (\d+) registers", res.stderr)
        spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stderr)
        info["registers"] = int(regs.group(1)) if regs else None
        info["spill_bytes"] = sum(map(int, spills)) if spills else None
    return info


def require_compiled_kernels() -> None:
    """Raise when ``TRITON_INTERPRET`` is set: the compile check needs real jit kernels, not interpreted objects."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("--compile-check needs TRITON_INTERPRET unset (kernels are interpreted objects otherwise)")


def compile_variants(
    variants: list[Variant], arch: int, div16: Iterable[str], error_chars: int
) -> list[dict[str, Any]]:
    """Compile every variant with :func:`aot_compile`; one record each (name, config, shared memory, registers,
    spill bytes; ``ok`` False with the error's first ``error_chars`` characters when compiling failed)."""
    records = []
    for name, fn, ptrs, consts, warps, stages in variants:
        rec: dict[str, Any] = {"kernel": name, "num_warps": warps, "num_stages": stages}
        rec.update({k: v for k, v in consts.items() if k.isupper() and k not in ("UPCAST",)})
        try:
            rec.update(aot_compile(fn, ptrs, consts, warps, stages, arch, div16))
            rec["ok"] = True
        except Exception as exc:  # noqa: BLE001 - report every variant
            rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:error_chars]}")
        records.append(rec)
    return records


def print_compile_records(records: list[dict[str, Any]], name_width: int) -> int:
    """One line per compile-check record; returns the exit code (1 when a variant failed to compile)."""
    for r in records:
        detail = r.get("error") or (
            f"regs={r['registers']} spill={r['spill_bytes']}B smem={r['shared_bytes'] // 1024}KiB"
        )
        name = r["kernel"].ljust(name_width)
        print(f"{'ok ' if r['ok'] else 'FAIL'} {name} w{r['num_warps']} s{r['num_stages']} {detail}")
    return 0 if all(r["ok"] for r in records) else 1


# ----------------------------------------------------------------------------------------------------------------------
# Tiling sweeps (tune_forward, tune_backward)
# ----------------------------------------------------------------------------------------------------------------------
def run_tiling_sweep(
    argv: list[str] | None,
    *,
    doc: str,
    name: str,
    shapes: dict[str, Any],
    configs: list[str],
    rep: int,
    default: Callable[[], Any],
    sweep: Callable[[str, list[str], torch.device, int], dict[str, Any]],
) -> int:
    """The command line of a tiling sweep: ``--shapes``, ``--configs``, ``--out-dir``, ``--rep``; one JSON file.

    Args:
        argv: the arguments (default ``sys.argv[1:]``). doc: the module docstring (its first paragraph is the help).
        name: the JSON file's prefix. shapes: the shape table (its keys are the default ``--shapes``). configs: the
            default configurations. rep: the default do_bench milliseconds. default: the launcher's default
            configuration (a dataclass), recorded with the results. sweep: ``(shape, configs, device, rep)`` -> the
            shape's results, written after every shape so a run cut short keeps what it measured.

    Returns:
        The exit code: 0, or 2 without a CUDA device.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(shapes), help=f"comma-separated names from {list(shapes)}")
    parser.add_argument("--configs", default="/".join(configs), help="slash-separated configurations")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--rep", type=int, default=rep, help="do_bench milliseconds per measurement")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the sweep needs a CUDA device")
        return 2
    device = torch.device("cuda")
    env = environment(device)
    record: dict[str, Any] = {"environment": env, "default": dataclasses.asdict(default()), "shapes": {}}
    out_path = Path(args.out_dir) / f"{name}-{env['gpu'].replace(' ', '_').lower()}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes.split(","):
        record["shapes"][shape] = sweep(shape, args.configs.split("/"), device, args.rep)
        out_path.write_text(json.dumps(record, indent=2))
        torch.cuda.empty_cache()
    print(f"wrote {out_path}")
    return 0
