"""Does this machine's AOTInductor load packages at all? A probe for issue 18, independent of MoBA.

On the H200 machine (torch 2.11.0+cu130) every package load crashed or hung, a plain ``nn.Linear`` model's too, so
``tests/gpu/test_cuda_export.py`` could not pass there. This builds the smallest package (a seeded ``nn.Linear``,
exported and compiled with ``torch._inductor.aoti_compile_and_package``) and then loads and runs it in a FRESH
process with ``faulthandler`` on (a crash prints the Python stack of the load), timing each phase and comparing the
package's output with the eager model's. Run it under ``cuda-gdb -batch -ex run -ex bt --args python ...`` for the
native stack.

    PYTHONPATH=. python -m benchmarks.aoti_probe --device cuda          # build, then load in a child process
    PYTHONPATH=. python -m benchmarks.aoti_probe --device cuda --stage load --path /tmp/probe.pt2

Exit status: 0 when the package ran with the eager output (max |difference| <= 1e-4), 1 when it ran with another
output, the child's own status when the load crashed (e.g. -11 for a segmentation fault), 124 on ``--timeout``.
"""

from __future__ import annotations

import argparse
import faulthandler
import subprocess
import sys
import time

import torch


def _model_and_input(device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)  # the same weights and input in the building and the loading process
    return torch.nn.Linear(16, 16).to(device).eval(), torch.randn(4, 16).to(device)


def build(path: str, device: str) -> float:
    """Export and package the probe model at ``path``; returns the seconds it took."""
    model, x = _model_and_input(device)
    start = time.perf_counter()
    program = torch.export.export(model, (x,))
    torch._inductor.aoti_compile_and_package(program, package_path=path)
    return time.perf_counter() - start


def _extract_so(path: str) -> str:
    """Unpack the package's compiled model library (``*.so``, weights inside it by default) next to ``path``."""
    import zipfile

    out = path + ".unpacked"
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(".so")]
        if not names:
            raise SystemExit(f"{path}: no .so in the package ({archive.namelist()})")
        archive.extractall(out)
    return f"{out}/{names[0]}"


def load_and_run(path: str, device: str, loader: str = "package") -> int:
    """Load the package (``loader="package"``: ``aoti_load_package``; ``"so"``: its model library alone through
    ``torch._export.aot_load``, bypassing the package loader), run it once and compare with the eager model; prints
    each phase. Returns the exit status."""
    faulthandler.enable()
    model, x = _model_and_input(device)
    print(f"loading {path} ({loader})", flush=True)
    start = time.perf_counter()
    if loader == "so":
        so = _extract_so(path)
        print(f"model library {so}", flush=True)
        runner = torch._export.aot_load(so, device)
    else:
        runner = torch._inductor.aoti_load_package(path)
    print(f"loaded in {time.perf_counter() - start:.1f} s", flush=True)
    with torch.no_grad():
        got, want = runner(x), model(x)
    err = float((got - want).abs().max())
    print(f"ran: max |package - eager| = {err:.3g}", flush=True)
    return 0 if err <= 1e-4 else 1


def main(argv: list[str] | None = None) -> int:
    """Build then load in a child process (``--stage both``), or one stage; returns the exit status (docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stage", choices=["both", "build", "load"], default="both")
    parser.add_argument("--path", default="/tmp/aoti_probe.pt2")
    parser.add_argument(
        "--loader", choices=["package", "so"], default="package", help="aoti_load_package, or the .so alone"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds the loading child may take")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, device {args.device}", flush=True)
    if args.stage in ("both", "build"):
        print(f"built {args.path} in {build(args.path, args.device):.1f} s", flush=True)
    if args.stage == "load":
        return load_and_run(args.path, args.device, args.loader)
    if args.stage == "both":
        cmd = [sys.executable, "-m", "benchmarks.aoti_probe", "--stage", "load", "--device", args.device]
        cmd += ["--loader", args.loader]
        try:
            child = subprocess.run([*cmd, "--path", args.path], timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"the load did not finish in {args.timeout:.0f} s", flush=True)
            return 124
        print(f"loading process exited with {child.returncode}", flush=True)
        return child.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
