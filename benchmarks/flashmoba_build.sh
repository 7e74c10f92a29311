#!/usr/bin/env bash
# Build FlashMoBA (benchmark-only, never a dependency) from .flashmoba/flash-moba, run from the repository root.
#
# .flashmoba/flash-moba is made here, off the GPU machine, by
#   python -m benchmarks.flashmoba_prepare --source <flash-moba mirror> --cutlass <cutlass mirror>
# (head dim 128, bf16, causal, top-k <= 16 only: 7 translation units) and carried to the GPU machine
# (carry: .flashmoba/flash-moba). This script builds it there with FlashMoBA's own setup.py into .flashmoba/build
# (objects in temp/, the extension in lib/), beside the carried folder, so a carry of .flashmoba/flash-moba on a
# still-warm machine does not wipe the objects; an extension already built from the same prepared tree (same
# MOBA_COMPILE_DIGEST.txt) is reused and nothing is compiled. It then imports the result and prints the build time.
# benchmarks/flashmoba.py finds it there. Exits non-zero, with the compiler's errors and the log's tail, on failure.
#
# Environment: PYTHON (default python3), MAX_JOBS (16), NVCC_THREADS (2), FLASH_MOBA_CUDA_ARCHS (90),
# FLASH_MOBA_CXX_STD (c++17, or c++20 where torch's headers demand it), FLASHMOBA_BUILD (default .flashmoba/build).
set -uo pipefail
cd "$(dirname "$0")/.."

SRC=.flashmoba/flash-moba
BUILD=${FLASHMOBA_BUILD:-.flashmoba/build}
PY=${PYTHON:-python3}

if [ ! -f "$SRC/setup.py" ] || [ ! -f "$SRC/MOBA_COMPILE_DIGEST.txt" ]; then
  echo "flashmoba_build: $SRC is missing or not prepared; run python -m benchmarks.flashmoba_prepare first" >&2
  exit 2
fi
mkdir -p "$BUILD/temp" "$BUILD/lib"
BUILD=$(cd "$BUILD" && pwd)
digest=$(cat "$SRC/MOBA_COMPILE_DIGEST.txt")

check_import() {
  PYTHONPATH="$PWD/$SRC:$BUILD/lib${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
    'import torch, flash_moba_cuda, flash_moba; print("flashmoba_build: import ok:", flash_moba_cuda.__file__)'
}

if [ -f "$BUILD/lib/STAMP" ] && [ "$(cat "$BUILD/lib/STAMP")" = "$digest" ] && compgen -G "$BUILD/lib/flash_moba_cuda*.so" >/dev/null; then
  echo "flashmoba_build: reusing $BUILD/lib (prepared tree $digest)"
  check_import && exit 0
  echo "flashmoba_build: the reused build does not import; rebuilding" >&2
fi
rm -f "$BUILD/lib/STAMP" "$BUILD"/lib/flash_moba_cuda*.so

export FLASH_MOBA_CUDA_ARCHS=${FLASH_MOBA_CUDA_ARCHS:-90}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FLASH_MOBA_FORCE_BUILD=TRUE     # never look for a prebuilt wheel (no network there anyway)
export FLASH_MOBA_SKIP_CUDA_BUILD=FALSE
# Upstream compiles as C++17; torch 2.14's headers refuse anything below C++20 (2.11-2.13 accept C++17).
if [ -z "${FLASH_MOBA_CXX_STD:-}" ]; then
  FLASH_MOBA_CXX_STD=$("$PY" -c 'import os, torch
h = open(os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")).read()
print("c++20" if "C++20 or later" in h else "c++17")')
fi
export FLASH_MOBA_CXX_STD
export MAX_JOBS=${MAX_JOBS:-16}
export NVCC_THREADS=${NVCC_THREADS:-2}

# torch builds in parallel only through ninja (without it: one unit after another, about 11 minutes of compiling).
if ! command -v ninja >/dev/null; then
  ninja_dir=$("$PY" -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null) && export PATH="$ninja_dir:$PATH"
  command -v ninja >/dev/null || echo "flashmoba_build: WARNING: no ninja on PATH: the units compile one by one" >&2
fi

# varlen_sort.cu includes ATen/cuda/CUDAContext.h, which includes cuBLAS/cuSPARSE/cuSOLVER headers. A toolkit that
# has nvcc but not those libraries (as on the machine this was compile-checked on) still has them in the pip packages
# a CUDA torch depends on (site-packages/nvidia/*/include): add those to CPATH, after the toolkit's own.
extra_inc=$("$PY" - <<'EOF'
import glob
import os

from torch.utils.cpp_extension import CUDA_HOME

if CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "include", "cublas_v2.h")):
    try:
        import nvidia

        found = set()
        for base in nvidia.__path__:
            for header in ("cublas_v2.h", "cusparse.h", "cusolverDn.h"):
                found |= {os.path.dirname(h) for h in glob.glob(os.path.join(base, "*", "include", header))}
        print(":".join(sorted(found)))
    except ImportError:
        pass
EOF
)
if [ -n "$extra_inc" ]; then
  export CPATH="${CPATH:+$CPATH:}$extra_inc"
  echo "flashmoba_build: the CUDA toolkit has no cublas_v2.h; headers from pip packages: $extra_inc"
fi

echo "flashmoba_build: building $SRC ($digest) with MAX_JOBS=$MAX_JOBS NVCC_THREADS=$NVCC_THREADS" \
  "FLASH_MOBA_CUDA_ARCHS=$FLASH_MOBA_CUDA_ARCHS -std=$FLASH_MOBA_CXX_STD; log: $BUILD/build.log"
start=$(date +%s)
(cd "$SRC" && "$PY" setup.py build_ext --build-temp "$BUILD/temp" --build-lib "$BUILD/lib") >"$BUILD/build.log" 2>&1
rc=$?
secs=$(( $(date +%s) - start ))
if [ $rc -ne 0 ] || ! compgen -G "$BUILD/lib/flash_moba_cuda*.so" >/dev/null; then
  echo "flashmoba_build: FAILED after ${secs}s (exit $rc); compiler errors:" >&2
  grep -n -E '(error|Error)( #[0-9]+-D)?:|undefined (reference|symbol)|cannot find|No such file|Killed' "$BUILD/build.log" |
    head -40 >&2
  echo "flashmoba_build: last lines of $BUILD/build.log:" >&2
  tail -n 40 "$BUILD/build.log" >&2
  exit 1
fi
echo "$digest" >"$BUILD/lib/STAMP"
echo "flashmoba_build: built in ${secs}s ($(du -sh "$BUILD/lib" | cut -f1) in $BUILD/lib)"
check_import || { echo "flashmoba_build: built, but the import failed (see above)" >&2; exit 1; }
