#!/usr/bin/env bash
# One-shot device check on a GPU machine that has CUDA, torch and Triton but no network: build the
# package for the GPU present with the machine's own python, run the test suite's device cases
# (the op suites on the cuda and triton backends, the gpu-marked modules) in parallel, then a short
# moe-bench.  Logs and results go to $OUT (default ./gpu-check-out).
#
#   bash bench/gpu_check.sh                 # everything
#   GPU_CHECK_TESTS="test_cuda_gpu.py" GPU_CHECK_BENCH=0 bash bench/gpu_check.sh
#
# Python packages the machine lacks can be put as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu-check-out}"
PY="${PYTHON:-python3}"
JOBS="${GPU_CHECK_JOBS:-12}"
TESTS="${GPU_CHECK_TESTS:-.}"
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-300}"
mkdir -p "$OUT"
cd "$ROOT" || exit 1
stamp() { echo "== $(date +%T) $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm --format=csv
lscpu | grep -E "Model name|^CPU\(s\)|amx" | cut -c1-120
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' ')"
  case "$cap" in 9.0) TORCH_CUDA_ARCH_LIST="9.0a" ;; *) TORCH_CUDA_ARCH_LIST="$cap" ;; esac
fi
export TORCH_CUDA_ARCH_LIST MOE_KERNELS_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
stamp "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
start=$(date +%s)
if ! "$PY" -m pip install -v --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1; then
  grep -n -i -B2 -A8 "error" "$OUT/build.log" | head -80
  stamp "BUILD FAILED"
  exit 1
fi
stamp "built in $(($(date +%s) - start)) s"
grep -i "spill\|warning" "$OUT/build.log" | grep -v "^ *$" | sort | uniq -c | head -20

stamp "tests: $TESTS"
cd tests || exit 1
read -r -a test_args <<<"$TESTS"  # a space-separated list of test files
# the CPU-only modules (ISA emulation, the CUDA emulator, gloo processes, workflow linting) are left
# to the CPU CI run; at the time limit pytest is interrupted (SIGINT), so it still prints its summary
MOE_KERNELS_REQUIRE_BACKENDS=reference,cuda,triton MOE_KERNELS_REQUIRE_BUILT=_C,_C_cuda \
  MOE_KERNELS_TEST_INSTALLED=1 PYTHONUNBUFFERED=1 timeout -s INT -k 20 "$TEST_TIMEOUT" \
  "$PY" -m pytest -q -p no:cacheprovider -n "$JOBS" -rfE --tb=short --durations=15 \
  --ignore=test_cpu_isa_emulated.py --ignore=test_cuda_emulated.py --ignore=test_parallel.py \
  --ignore=test_workflows.py --ignore=test_cpu_isa_env.py --ignore=test_cli.py \
  --junitxml="$OUT/junit.xml" "${test_args[@]}" >"$OUT/tests.log" 2>&1
rc=$?
# A test that kills its worker (a segfault or abort) is rerun alone, in one process, so that its
# log shows where: Python's faulthandler traceback, and gdb's native backtrace where gdb exists.
mapfile -t crashed < <(grep -o "crashed while running '[^']*'" "$OUT/tests.log" | cut -d"'" -f2 |
  sort -u | head -n 4)
for i in "${!crashed[@]}"; do
  id="${crashed[$i]}"
  stamp "rerun alone (crashed a worker): $id"
  env_run=(env MOE_KERNELS_TEST_INSTALLED=1 PYTHONFAULTHANDLER=1 timeout 120)
  if command -v gdb >/dev/null; then
    "${env_run[@]}" gdb -q -batch -ex run -ex "bt 30" -ex "info registers rip" \
      --args "$PY" -m pytest -q -p no:cacheprovider -x "$id" >"$OUT/crash-$i.log" 2>&1
  else
    "${env_run[@]}" "$PY" -m pytest -q -p no:cacheprovider -x "$id" >"$OUT/crash-$i.log" 2>&1
  fi
  echo "   rc=$?"
  grep -E "Fatal Python|Segmentation|SIG|^#[0-9]+ |File \"|passed|failed" "$OUT/crash-$i.log" |
    cut -c1-200 | head -n 40
done
cd "$ROOT" || exit 1
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-220 | head -60
tail -n 25 "$OUT/tests.log"
stamp "tests rc=$rc"

if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
  stamp "moe-bench"
  (cd /tmp && timeout "${GPU_CHECK_BENCH_TIMEOUT:-150}" "$PY" -m moe_kernels.cli --plain --pass both \
    --shape "${GPU_CHECK_SHAPES:-qwen3-30b-a3b,mixtral-8x7b}" --tokens "${GPU_CHECK_TOKENS:-16,4096}" \
    --ops "${GPU_CHECK_OPS:-all}" --peers "${GPU_CHECK_PEERS:-all}" \
    --full-size --json "$OUT/bench.json" >"$OUT/bench.txt" 2>&1)
  stamp "moe-bench rc=$?"
  tail -n 60 "$OUT/bench.txt"
fi
exit $rc
