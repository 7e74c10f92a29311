"""Static SASS count of the dK/dV kernel's loops: instructions per iteration by class, no GPU needed.

Compiles ``backward._bwd_dkdv_kernel`` for sm_90a at the launcher's CUDA configuration (bf16, D=128; the variants of
``python -m benchmarks.attention --compile-check``), takes the cubin Triton itself built (the one a launch loads, with
line info), disassembles it with the ``nvdisasm`` bundled with Triton, finds the three innermost loops (backward
branches; in address order: (a) own-chunk diagonal tiles, (a) own-chunk full tiles, (b) gathered list tiles) and counts
each loop body's instructions by class, optionally by source line.

    python -m benchmarks.sass_dkdv                       # both modes, unmasked (the tuned, spilling tiles)
    python -m benchmarks.sass_dkdv --lines 12 --out /tmp/sass   # + the 12 costliest source lines per loop; keep files

An iteration's count is the static body of one trip; predicated-off instructions are counted too. Numbers are for the
Triton in use (the GPU machines run 3.6).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

# Order matters: the first matching pattern names the class.
CLASSES: list[tuple[str, str]] = [
    ("tensor", r"HGMMA|HMMA|WARPGROUP"),
    ("ffma", r"FFMA"),
    ("fmul", r"FMUL"),
    ("fadd", r"FADD"),
    ("fsel/fmnmx", r"FSEL|FMNMX|FSETP|FSET"),
    ("mufu", r"MUFU"),
    ("conv", r"F2FP|F2F|I2F|F2I|I2FP|F2IP"),
    ("spill", r"LDL|STL"),
    ("ldgsts", r"LDGSTS|LDGDEPBAR|DEPBAR"),
    ("ldg", r"LDG"),
    ("lds", r"LDSM|LDS"),
    ("sts", r"STSM|STS"),
    ("red/atom", r"REDG|RED|ATOMG|ATOM"),
    ("stg", r"STG"),
    ("bar/sync", r"BAR|SYNCS|MEMBAR|FENCE|BSSY|BSYNC|WARPSYNC|ERRBAR"),
    ("branch", r"BRA|EXIT|CALL|RET|NOP|YIELD"),
    (
        "int",
        r"U?(IMAD|IADD3|IADD|LEA|SHF|LOP3|LOP|ISETP|SEL|IABS|IMNMX|VIADD|VIMNMX|SGXT|BMSK|FLO|POPC|PRMT|IMUL|"
        r"MOV|P2R|R2P|PLOP3|CS2R|S2R|S2UR|R2UR|LDC|VOTEU|SHFL|VOTE)",
    ),
]
LOOP_NAMES = ("(a) diagonal", "(a) full", "(b) list")
COLUMNS = ("total", "tensor", "ffma", "fmul", "fadd", "mufu", "fsel/fmnmx", "conv", "int", "ldgsts", "ldg", "lds",
           "sts", "spill", "red/atom", "bar/sync", "branch", "other")  # fmt: skip


def classify(opcode: str) -> str:
    """The class of a SASS opcode (``IMAD.WIDE`` -> ``int``), ``other`` when no pattern matches."""
    base = opcode.split(".")[0]
    for name, pattern in CLASSES:
        if re.fullmatch(pattern, base):
            return name
    return "other"


def parse_sass(text: str) -> list[tuple[int, str, int | None]]:
    """``(address, instruction without predicate, source line)`` per instruction of ``nvdisasm -g`` output; branch
    targets are rewritten from labels to addresses."""
    rows: list[tuple[int, str, int | None]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    line: int | None = None
    for raw in text.splitlines():
        m = re.match(r'\s*//## File "[^"]*", line (\d+)', raw)
        if m:
            line = int(m.group(1))
            continue
        m = re.match(r"^(\.L_x_\d+):", raw)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", raw)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            rows.append((addr, re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(2)), line))
    out = []
    for addr, ins, src in rows:
        m = re.search(r"\(\s*(\.L_x_\d+)\s*\)", ins)
        out.append((addr, f"BRA {labels[m.group(1)]:#x}" if ins.startswith("BRA") and m else ins, src))
    return out


def innermost_loops(ins: list[tuple[int, str, int | None]]) -> list[tuple[int, int]]:
    """``(first, last)`` addresses of every loop (a backward branch) that contains no other, in address order."""
    loops = []
    for addr, text, _ in ins:
        m = re.match(r"BRA (0x[0-9a-f]+)$", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    return sorted(x for x in loops if not any(y != x and x[0] <= y[0] and y[1] <= x[1] for y in loops))


def count_loops(sass: str, lines: int = 0) -> dict[str, dict[str, Any]]:
    """Per innermost loop: instruction counts by class (``total`` included) and, with ``lines``, the costliest source
    lines as ``(line, count, {class: count})``."""
    ins = parse_sass(sass)
    loops = innermost_loops(ins)
    if len(loops) != len(LOOP_NAMES):
        raise RuntimeError(f"expected {len(LOOP_NAMES)} innermost loops in the dK/dV kernel, found {len(loops)}")
    result = {}
    for name, (lo, hi) in zip(LOOP_NAMES, loops):
        body = [(text.split()[0], src) for addr, text, src in ins if lo <= addr <= hi]
        counts = collections.Counter(classify(op) for op, _ in body)
        entry: dict[str, Any] = {"total": len(body), **counts}
        if lines:
            by_line: dict[int | None, collections.Counter] = collections.defaultdict(collections.Counter)
            for op, src in body:
                by_line[src][classify(op)] += 1
            top = sorted(by_line.items(), key=lambda kv: -sum(kv[1].values()))[:lines]
            entry["lines"] = [(src, sum(c.values()), dict(c.most_common(4))) for src, c in top]
        result[name] = entry
    return result


def nvdisasm() -> str:
    """The ``nvdisasm`` bundled with Triton."""
    import triton

    return str(Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin" / "nvdisasm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default="bwd_dkdv-nomask", help="compile-check variants to count (name prefix)")
    parser.add_argument("--lines", type=int, default=0, help="also list the N costliest source lines of each loop")
    parser.add_argument("--out", type=Path, default=None, help="keep PTX, cubin and SASS here")
    parser.add_argument("--json", type=Path, default=None, help="write the counts here")
    args = parser.parse_args(argv)

    import triton

    from benchmarks.attention import _DIV16, _backward_variants
    from benchmarks.common import aot_compile, require_compiled_kernels, triton_compile

    require_compiled_kernels()
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="sass_dkdv-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    from moba_compile.kernels import backward

    src_lines = Path(backward.__file__).read_text().splitlines()
    report: dict[str, Any] = {"triton": triton.__version__, "variants": {}}
    for name, fn, ptrs, consts, warps, stages in _backward_variants(128):
        if not name.startswith(args.prefix) or fn.__name__ != "_bwd_dkdv_kernel":
            continue
        kernel = triton_compile(fn, ptrs, consts, warps, stages, 90, _DIV16)
        cubin = out_dir / f"{name}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        (out_dir / f"{name}.ptx").write_text(kernel.asm["ptx"])
        sass = subprocess.run([nvdisasm(), "-c", "-g", str(cubin)], capture_output=True, text=True, check=True).stdout
        (out_dir / f"{name}.sass").write_text(sass)
        info = aot_compile(fn, ptrs, consts, warps, stages, 90, _DIV16)
        loops = count_loops(sass, args.lines)
        report["variants"][name] = {**info, "instructions": len(parse_sass(sass)), "loops": loops}
        print(f"{name}: triton {triton.__version__}, {info['registers']} registers, {info['spill_bytes']} B spilled, "
              f"{info['shared_bytes'] // 1024} KiB shared, {len(parse_sass(sass))} instructions")  # fmt: skip
        widths = [max(7, len(c)) + 1 for c in COLUMNS]
        print("  " + "loop".ljust(14) + "".join(c.rjust(w) for c, w in zip(COLUMNS, widths)))
        for loop, entry in loops.items():
            print("  " + loop.ljust(14) + "".join(str(entry.get(c, 0)).rjust(w) for c, w in zip(COLUMNS, widths)))
            for src, n, classes in entry.get("lines", []):
                text = src_lines[src - 1].strip()[:72] if src else "?"
                print(f"      {n:5d}  line {src}: {text}  {classes}")
    print(f"files in {out_dir}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
