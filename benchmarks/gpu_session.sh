#!/usr/bin/env bash
# One GPU session's stages, each under its own time limit, all output appended to $LOG. Used on the lent H100/H200 (the
# device machine: torch/triton preinstalled, no network) as:
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh env tests "attention:--suite spec --no-flex" decode e2e train
#
# Stages, each STAGE or STAGE:ARGS (ARGS split as shell words): env | tests | gputests | attention | decode | e2e |
# train | tune | tune_forward | profile_decode | profile_forward | reproduce | packed | cp (2 GPUs, torchrun) | aoti.
# A stage that fails or runs out of time is logged and the next one still runs (a
# failure in one must not cost the measurements of the others). Limits: <STAGE>_LIMIT variables, in seconds.
# Wheels in .whl/ (git-ignored; e.g. `pip download --no-deps -d .whl hypothesis sortedcontainers attrs tqdm`) are
# installed to /tmp/site when the GPU machine, which has no network, lacks hypothesis or tqdm.
set -u
OUT=${OUT:-/tmp/moba-out}
mkdir -p "$OUT"
LOG=${LOG:-$OUT/session.log}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=".:${PYTHONPATH:-}"
if ! python3 -c "import hypothesis, tqdm" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=".:/tmp/site:${PYTHONPATH#.:}"
fi

stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  # SIGINT first: pytest and the benchmarks then print what they have (failures so far, rows measured) before exiting.
  timeout -s INT --kill-after=30 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
}

for spec in "$@"; do
  name=${spec%%:*}
  args=""
  [[ $spec == *:* ]] && args=${spec#*:}
  eval "extra=($args)"  # shell words, so quoted arguments with spaces (pytest -k "a or b") stay one argument
  case $name in
    env)
      stage env 60 bash -c 'nvidia-smi -L; python3 -c "import torch, triton, transformers; \
print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"' ;;
    tests)  # the interpreted CPU suites, with the kernel launchers compiled on the GPU; ARGS replace the file list
      [[ ${#extra[@]} -eq 0 ]] && extra=(tests/test_kernels_forward.py tests/test_kernels_backward.py \
        tests/test_kernels_decode.py tests/test_kernels_dense_decode.py tests/test_kernels_static_decode.py)
      stage tests "${TESTS_LIMIT:-240}" env MOBA_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -rfE \
        -n "${TEST_WORKERS:-8}" -k "not compile_for_h100 and not compile_check" "${extra[@]}" ;;
    gputests)
      [[ ${#extra[@]} -eq 0 ]] && extra=(tests/gpu)
      stage gputests "${GPUTESTS_LIMIT:-300}" python3 -m pytest -q -p no:cacheprovider -rfE "${extra[@]}" ;;
    attention)
      stage attention "${ATTENTION_LIMIT:-420}" python3 -m benchmarks.attention --out-dir "$OUT" "${extra[@]}" ;;
    decode)
      stage decode "${DECODE_LIMIT:-180}" python3 -m benchmarks.decode --out-dir "$OUT" "${extra[@]}" ;;
    e2e)
      stage e2e "${E2E_LIMIT:-420}" python3 -m benchmarks.end_to_end --out "$OUT" "${extra[@]}" ;;
    train)
      stage train "${TRAIN_LIMIT:-180}" python3 examples/train.py --no-progress "${extra[@]}" ;;
    tune)
      stage tune "${TUNE_LIMIT:-300}" python3 -m benchmarks.tune_backward --out-dir "$OUT" "${extra[@]}" ;;
    tune_forward)
      stage tune_forward "${TUNE_FORWARD_LIMIT:-300}" python3 -m benchmarks.tune_forward --out-dir "$OUT" "${extra[@]}" ;;
    profile_forward)
      stage profile_forward "${PROFILE_FORWARD_LIMIT:-120}" python3 -m benchmarks.profile_forward "${extra[@]}" ;;
    profile_decode)
      stage profile_decode "${PROFILE_DECODE_LIMIT:-90}" python3 -m benchmarks.profile_decode "${extra[@]}" ;;
    reproduce)
      stage reproduce "${REPRODUCE_LIMIT:-420}" python3 -m examples.reproduce "${extra[@]}" ;;
    packed)
      stage packed "${PACKED_LIMIT:-200}" python3 -m benchmarks.packed --out-dir "$OUT" "${extra[@]}" ;;
    cp)  # context parallelism over the machine's GPUs; NVLink multicast stays off (the device README)
      stage cp "${CP_LIMIT:-420}" env NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc-per-node "$(nvidia-smi -L | wc -l)" -m benchmarks.context_parallel --out "$OUT" "${extra[@]}" ;;
    aoti)
      stage aoti "${AOTI_LIMIT:-240}" python3 -m benchmarks.aoti_probe "${extra[@]}" ;;
    *) echo "unknown stage $name" | tee -a "$LOG" ;;
  esac
done
