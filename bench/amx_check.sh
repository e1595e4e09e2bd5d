#!/usr/bin/env bash
# One-shot run, on an Intel Xeon with AMX, of the measurements behind the CPU backend's AMX targets
# (README "CPU backend": the Xeon table; bench/NOTES.md v17 and v23 say what each should show):
#
#   1. targets  bench/bench_moe_ffn.py, full-size Qwen3-30B-A3B, OLMoE-1B-7B and Mixtral-8x7B,
#               against Hugging Face eager and grouped_mm and a dense matmul, AMX_CHECK_RUNS times,
#               then bench/amx_targets.py over the runs' CSVs (prefill in one run, decode rows as
#               the median over the runs);
#   2. profile  bench/profile_moe_ffn.py: each phase of a full-size moe_ffn forward and backward,
#               and the brgemm route's split (token packing, brgemm calls, the results' store),
#               from the op's own timers (no profiler needed);
#   3. routes   bench/ab_builds.py, one build: the default (brgemm auto) against
#               MOE_KERNELS_CPU_BRGEMM=0 and against MOE_KERNELS_CPU_BRGEMM_PASS_TOKENS=32, forward
#               and backward, T = 512 and 2048;
#   4. hf       bench/hf_blocks_check.py, transformers' own MoE blocks, "moe_kernels" against
#               "eager";
#   5. tests    the CPU test suite (pytest-xdist when installed).
#
#   bash bench/amx_check.sh                          # everything, on CPUs 0 and 1 (2 threads)
#   AMX_CHECK_STEPS="targets hf" AMX_CHECK_CPUS=0-3 bash bench/amx_check.sh
#
# Every step prints its start time; all of them together take tens of minutes at 2 threads (the
# full-size layers, three target runs, HF eager at T = 2048), so on a machine lent for minutes run
# them one at a time with AMX_CHECK_STEPS. Logs go to $OUT (default ./amx-check-out). The
# package is built for the CPU only unless AMX_CHECK_BUILD=0 (then the installed one is measured).
# transformers must be importable for steps 1 and 3 (wheels in .whl/ are installed to /tmp/site
# first, as bench/gpu_check.sh does).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/amx-check-out}"
PY="${PYTHON:-python3}"
CPUS="${AMX_CHECK_CPUS:-0,1}"
STEPS="${AMX_CHECK_STEPS:-targets profile routes hf tests}"
RUNS="${AMX_CHECK_RUNS:-3}"
# what each step covers (narrow them for a quick trial run of this script)
SHAPES="${AMX_CHECK_SHAPES:-qwen3-30b-a3b,olmoe-1b-7b,mixtral-8x7b}"
TOKENS="${AMX_CHECK_TOKENS:-}"                 # empty: the bench's default per shape
ROUTE_SHAPES="${AMX_CHECK_ROUTE_SHAPES:-qwen3-30b-a3b,olmoe-1b-7b}"
ROUTE_TOKENS="${AMX_CHECK_ROUTE_TOKENS:-512,2048}"
PROFILE_SHAPES="${AMX_CHECK_PROFILE_SHAPES:-qwen3-30b-a3b,olmoe-1b-7b}"
PROFILE_TOKENS="${AMX_CHECK_PROFILE_TOKENS:-512,2048}"
HF_MODELS="${AMX_CHECK_HF_MODELS:-qwen3,olmoe,mixtral}"
HF_TOKENS="${AMX_CHECK_HF_TOKENS:-16,512,2048}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 1
stamp() { echo "== $(date +%T) $*"; }
# the number of CPUs in a taskset list such as 0,1 or 0-3,8
THREADS="$("$PY" -c "import sys
n = 0
for part in sys.argv[1].split(','):
    lo, _, hi = part.partition('-')
    n += int(hi or lo) - int(lo) + 1
print(n)" "$CPUS")" || exit 2
export OMP_NUM_THREADS="$THREADS"
pin() { taskset -c "$CPUS" "$@"; }
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

stamp "machine (CPUs $CPUS, $THREADS threads)"
lscpu | grep -E "Model name|^CPU\(s\)|L2 cache|L3 cache" | cut -c1-120
grep -o -w -E "amx_bf16|amx_tile|avx512_bf16|avx512f" /proc/cpuinfo | sort | uniq -c
if ! grep -q -w amx_bf16 /proc/cpuinfo; then
  echo "warning: this CPU has no AMX-BF16; the figures are not the AMX targets' figures"
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "${AMX_CHECK_BUILD:-1}" != 0 ]; then
  stamp "build (CPU only)"
  start=$(date +%s)
  if ! MOE_KERNELS_BUILD_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -v \
    --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1; then
    grep -n -i -B2 -A8 "error" "$OUT/build.log" | head -60
    stamp "BUILD FAILED"
    exit 1
  fi
  stamp "built in $(($(date +%s) - start)) s"
fi
# from /tmp: the source tree's moe_kernels/ must not shadow the installed package
(cd /tmp && "$PY" -c "import torch, moe_kernels, moe_kernels._C as C
print('torch', torch.__version__, '| cpu backend:', moe_kernels.available_backends()['cpu'])
print('brgemm route:', C.cpu_brgemm_route(), '| own AMX kernel:', C.cpu_amx_kernel())
try:
    import transformers; print('transformers', transformers.__version__)
except ImportError:
    print('transformers: not installed (steps targets and hf need it)')") || exit 1
rc=0

if has_step targets; then
  for run in $(seq 1 "$RUNS"); do
    stamp "targets, run $run of $RUNS"
    (cd /tmp && pin timeout "${AMX_CHECK_TARGETS_TIMEOUT:-900}" "$PY" "$ROOT/bench/bench_moe_ffn.py" \
      --device cpu --plain --contenders hf-eager,hf-grouped_mm,dense-matmul --shapes "$SHAPES" \
      ${TOKENS:+--tokens "$TOKENS"} --csv "$OUT/targets-$run.csv" >"$OUT/targets-$run.txt" 2>&1)
    r=$?
    [ $r -ne 0 ] && rc=$r
    grep -E "ceiling|^(Qwen3|OLMoE|Mixtral).*T=|^(cpu|hf-eager) " "$OUT/targets-$run.txt" | head -60
    stamp "targets run $run rc=$r"
  done
  stamp "targets: the AMX targets over the $RUNS runs (bench/amx_targets.py)"
  csvs=()
  for run in $(seq 1 "$RUNS"); do csvs+=("$OUT/targets-$run.csv"); done
  "$PY" "$ROOT/bench/amx_targets.py" "${csvs[@]}" 2>&1 | tee "$OUT/amx-targets.txt"
  r=${PIPESTATUS[0]}
  [ "$r" -ne 0 ] && rc=$r
fi

if has_step profile; then
  stamp "profile: moe_ffn's phases and the brgemm route's split"
  (cd /tmp && pin timeout "${AMX_CHECK_PROFILE_TIMEOUT:-600}" "$PY" "$ROOT/bench/profile_moe_ffn.py" \
    --shapes "$PROFILE_SHAPES" --tokens "$PROFILE_TOKENS" --calls 2 --backward 2>&1 |
    tee "$OUT/profile.txt")
  r=${PIPESTATUS[0]}
  [ "$r" -ne 0 ] && rc=$r
fi

if has_step routes; then
  ab=("$PY" "$ROOT/bench/ab_builds.py" --a "$PY" --b "$PY" --threads "$THREADS" --no-evict
    --rounds "${AMX_CHECK_ROUNDS:-5}" --shapes "$ROUTE_SHAPES" --tokens "$ROUTE_TOKENS")
  for pass in fwd bwd; do
    for alt in MOE_KERNELS_CPU_BRGEMM=0 MOE_KERNELS_CPU_BRGEMM_PASS_TOKENS=32; do
      stamp "routes: default (A) against $alt (B), $pass"
      (cd /tmp && pin timeout "${AMX_CHECK_ROUTES_TIMEOUT:-900}" "${ab[@]}" --pass "$pass" \
        --b-env "$alt" 2>&1 | tee "$OUT/routes-$pass-${alt%%=*}.txt")
    done
  done
  if [[ "$SHAPES" == *mixtral* ]]; then
    stamp "routes: Mixtral T = 512, default (A) against MOE_KERNELS_CPU_BRGEMM=0 (B)"
    (cd /tmp && pin timeout "${AMX_CHECK_ROUTES_TIMEOUT:-900}" "$PY" "$ROOT/bench/ab_builds.py" \
      --a "$PY" --b "$PY" --threads "$THREADS" --no-evict --rounds 3 --shapes mixtral-8x7b \
      --tokens 512 --b-env MOE_KERNELS_CPU_BRGEMM=0 2>&1 | tee "$OUT/routes-mixtral.txt")
  fi
fi

if has_step hf; then
  stamp "Hugging Face blocks, moe_kernels against eager"
  (cd /tmp && pin timeout "${AMX_CHECK_HF_TIMEOUT:-900}" "$PY" "$ROOT/bench/hf_blocks_check.py" \
    --models "$HF_MODELS" --tokens "$HF_TOKENS" 2>&1 | tee "$OUT/hf-blocks.txt")
  r=${PIPESTATUS[0]}
  [ "$r" -ne 0 ] && rc=$r
fi

if has_step tests; then
  stamp "CPU test suite"
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${AMX_CHECK_JOBS:-$(nproc)}")
  (cd tests && MOE_KERNELS_TEST_INSTALLED=1 timeout -s INT -k 20 "${AMX_CHECK_TEST_TIMEOUT:-1200}" \
    "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" -rfE --tb=short \
    --ignore=test_cuda_gpu.py --ignore=test_cuda_tc_gpu.py --ignore=test_triton_gpu.py \
    >"$OUT/tests.log" 2>&1)
  r=$?
  [ $r -ne 0 ] && rc=$r
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-220 | head -40
  tail -n 5 "$OUT/tests.log"
  stamp "tests rc=$r"
fi
stamp "done rc=$rc (logs in $OUT)"
exit "$rc"
