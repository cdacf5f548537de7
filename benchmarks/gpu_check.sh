#!/usr/bin/env bash
# One command for a GPU machine (`make gpu-check`, or `bash benchmarks/gpu_check.sh` where make is missing):
# facts -> build the extension -> CUDA tests -> GPU benchmarks -> logs and results into benchmarks/results/ (and
# into $OUT when set, after every step, so a killed run still brings back what it did). Installs nothing.
#
#   bash benchmarks/gpu_check.sh                                  # everything, within BUDGET_S
#   BENCH=mod,token_choice TESTS=0 bash benchmarks/gpu_check.sh   # a later session: the benchmarks left
#   QUICK=1 bash benchmarks/gpu_check.sh                          # quick shape sets
#
# Environment: PYTHON (python3), QUICK (0), BUDGET_S (500: whole script, seconds; keep the device call's timeout
# above it), BUILD_TIMEOUT (180), TEST_TIMEOUT (150), TESTS (1: run the CUDA tests), BENCH (comma list of benchmark
# names, default all, in the priority order below), SPARSEMM_CUDA_ARCHS (default: this GPU's arch),
# SPARSEMM_GIT_COMMIT (the commit measured, recorded in every result: the copied tree has no .git), OUT,
# REQUIRE_TRITON (1: skip the benchmarks when the triton backend is not what grouped_mm would use; 0 for a dry run).
# Exit status: 0 when every step passed, 1 otherwise (the summary says which step and why).
set -u

# The benchmarks in priority order (the open issues' GPU goals first; when time runs short the last ones are
# skipped), one "module [args]" per entry; add a line per new benchmark. --out/--time-budget are appended.
BENCHMARKS=(
  "benchmarks.bench_mot_block --device cuda --dtype bf16 --modes full"
  "benchmarks.bench_moma_ffn --device cuda --dtype bf16 --configs 435M --modes full"
  "benchmarks.bench_mod --device cuda --dtype bf16 --configs 443M --modes full"
  "benchmarks.bench_token_choice --device cuda --dtype bf16 --modes full"
  "benchmarks.bench_avgk --device cuda --dtype bf16 --modes full"
  "benchmarks.bench_grouped_gemm --device cuda --dtype bf16"
  "profiling --configs gpu-quick --device cuda --set batch=4 --steps 10 --warmup 2"
)
MIN_SHARE=60    # seconds: a benchmark gets at least this or does not start
KILL_AFTER=10   # seconds between timeout's TERM and KILL (a process stuck in the driver can ignore TERM)

PYTHON=${PYTHON:-python3}
QUICK=${QUICK:-0}
BUDGET_S=${BUDGET_S:-500}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-180}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
TESTS=${TESTS:-1}
BENCH=${BENCH:-}
REQUIRE_TRITON=${REQUIRE_TRITON:-1}

cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Autotuning results cached on disk: the benchmarks run the same GEMM shapes in separate processes.
export TRITON_CACHE_AUTOTUNING=1
STAMP=$(date -u +%Y%m%d-%H%M%S)
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-$STAMP.XXXX")
RESULTS=benchmarks/results
LOGS="$RESULTS/logs/gpu-check-$STAMP"
declare -A STATUS=()
FAILED=0

banner() { printf '\n==================== %s ====================\n' "$*"; }
left() { echo $((BUDGET_S - SECONDS)); }

summary() {
  {
    gpu_name=$(nvidia-smi -L 2>/dev/null | head -1)
    echo "gpu_check $STAMP on ${gpu_name:-no GPU}; commit ${SPARSEMM_GIT_COMMIT:-unknown}"
    for step in environment build tests; do printf '  %-22s %s\n' "$step" "${STATUS[$step]:-not run}"; done
    for entry in "${BENCHMARKS[@]}"; do
      name=${entry%% *}; name=${name##*.}
      printf '  %-22s %s\n' "$name" "${STATUS[$name]:-not run}"
    done
    grep -h -E '^[0-9]+ rows' "$RUN_DIR"/bench-*.log 2>/dev/null | sed 's/^/  /'
    echo "  elapsed ${SECONDS}s; exit $FAILED"
  } >"$RUN_DIR/summary.txt"
}

# Everything so far into $OUT (the device tool brings back at most 8 files: one archive of everything, the summary
# and up to 6 reports). Called after every step and on exit, so a run killed half-way still returns its results.
copy_out() {
  summary
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  rm -f "$OUT"/gpu-check-*.tar.gz
  tar czf "$OUT/gpu-check-$STAMP.tar.gz" -C "$RUN_DIR" . 2>/dev/null
  cp "$RUN_DIR/summary.txt" "$OUT/"
  # The reports, the profiling one first (it is the make report of this machine).
  { ls "$RUN_DIR/profile-report.md" 2>/dev/null; ls -t "$RUN_DIR"/*.md 2>/dev/null | grep -v profile-report; } \
    | head -n 6 | xargs -r cp -t "$OUT/"
}
trap 'copy_out' EXIT
trap 'echo "!!!!!!!! gpu_check interrupted: results so far are in $RUN_DIR (and \$OUT)"; exit 1' TERM INT

banner "environment"
{
  date -u
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  echo "commit: ${SPARSEMM_GIT_COMMIT:-unknown (set SPARSEMM_GIT_COMMIT)}"
  "$PYTHON" - <<'EOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:  # noqa: BLE001
    tv = f"not importable ({exc})"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}")
print("cuda available:", torch.cuda.is_available(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for mod in ("pybind11", "ninja", "xdist", "pytest_timeout", "pynvml"):
    try:
        __import__(mod)
        print(f"{mod}: yes")
    except Exception:  # noqa: BLE001
        print(f"{mod}: no")
EOF
} 2>&1 | tee "$RUN_DIR/env.log"
# Which backends the package will use here: a benchmark that silently timed the torch fallback would mislead.
"$PYTHON" - >"$RUN_DIR/backends.log" 2>&1 <<'EOF'
import sys, torch
from sparsemm_kernels.backend import available_backends, unsupported_reasons
if not torch.cuda.is_available():
    print("torch sees no CUDA device")
    sys.exit(3)
dev = torch.device("cuda")
got = available_backends("grouped_mm", dev, torch.bfloat16)
print("grouped_mm bf16 backends:", got)
print("triton:", unsupported_reasons("grouped_mm", "triton", dev, torch.bfloat16) or "ok")
sys.exit(0 if got and got[0] == "triton" else 3)
EOF
rc=$?
cat "$RUN_DIR/backends.log"
if [ "$rc" -eq 0 ]; then STATUS[environment]=ok; else
  STATUS[environment]="NO TRITON BACKEND (rc $rc): benchmarks skipped, see backends.log"; FAILED=1
fi
copy_out

banner "build the extension (SPARSEMM_BUILD_CUDA=1, timeout ${BUILD_TIMEOUT}s)"
if [ -z "${SPARSEMM_CUDA_ARCHS:-}" ] && command -v nvidia-smi >/dev/null; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  # sm_90 builds as 90a (the arch-specific features the kernels use); others as themselves.
  case "$cap" in 90) export SPARSEMM_CUDA_ARCHS=90a ;; [0-9][0-9]*) export SPARSEMM_CUDA_ARCHS=$cap ;; esac
fi
echo "SPARSEMM_CUDA_ARCHS=${SPARSEMM_CUDA_ARCHS:-<setup.py default>}"
if [ ! -f setup.py ]; then
  echo "setup.py not found" | tee "$RUN_DIR/build.log"; rc=1
else
  SPARSEMM_BUILD_CUDA=1 timeout -k "$KILL_AFTER" "$BUILD_TIMEOUT" "$PYTHON" setup.py build_ext --inplace \
    >"$RUN_DIR/build.log" 2>&1
  rc=$?
  tail -n 15 "$RUN_DIR/build.log"
fi
if [ "$rc" -eq 0 ]; then STATUS[build]=ok; else
  STATUS[build]="FAILED (rc $rc)"; FAILED=1
  echo "!!!!!!!! EXTENSION BUILD FAILED (rc $rc): continuing without it; the cuda backend will be skipped !!!!!!!!"
fi
copy_out

if [ "$TESTS" = 1 ]; then
  # Parallel where pytest-xdist is installed (the cost is ~600 Triton compiles, CPU-bound); a per-test cap where
  # pytest-timeout is, so one hung test cannot take the whole step.
  extra=()
  "$PYTHON" -c 'import xdist' 2>/dev/null && extra+=(-n 8)
  "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && extra+=(--timeout 90)
  banner "CUDA tests (pytest -m gpu ${extra[*]+${extra[*]}}, timeout ${TEST_TIMEOUT}s)"
  timeout -k "$KILL_AFTER" "$TEST_TIMEOUT" "$PYTHON" -m pytest -m gpu tests -q -rf --maxfail=100 \
    -p no:cacheprovider ${extra[@]+"${extra[@]}"} 2>&1 | tee "$RUN_DIR/tests.log"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) STATUS[tests]=ok ;;
    5) STATUS[tests]="no tests collected" ;;
    124|137) STATUS[tests]="TIMED OUT after ${TEST_TIMEOUT}s"; FAILED=1 ;;
    *) STATUS[tests]="FAILED (rc $rc): $(grep -E '^[0-9]+ (passed|failed)|(passed|failed).* in ' "$RUN_DIR/tests.log" | tail -n 1)"
       FAILED=1 ;;
  esac
  copy_out
else
  STATUS[tests]="skipped (TESTS=0)"
fi

# The benchmarks asked for (BENCH, by name), in priority order.
selected=()
for entry in "${BENCHMARKS[@]}"; do
  name=${entry%% *}; name=${name##*.}; name=${name#bench_}
  if [ -z "$BENCH" ] || [[ ",$BENCH," == *",$name,"* ]]; then selected+=("$entry"); else
    key=${entry%% *}; STATUS[${key##*.}]="skipped (BENCH)"
  fi
done
n=${#selected[@]}
for i in ${selected[@]+"${!selected[@]}"}; do
  read -r -a cmd <<<"${selected[$i]}"
  name=${cmd[0]##*.}
  if [ "${STATUS[environment]}" != ok ] && [ "$REQUIRE_TRITON" = 1 ]; then
    STATUS[$name]="NOT RUN (no triton backend)"; continue
  fi
  share=$(( ($(left) - 15) / (n - i) ))  # this benchmark's share of the time left
  if [ "$share" -lt "$MIN_SHARE" ]; then
    # Too little for every remaining one: the list is in priority order, so this one still gets MIN_SHARE if it
    # exists and the last ones go without (an even split would skip the first, most important, benchmark).
    if [ $(( $(left) - 15 )) -lt "$MIN_SHARE" ]; then
      STATUS[$name]="NOT RUN ($(( $(left) - 15 ))s left)"; FAILED=1; continue
    fi
    share=$MIN_SHARE
  fi
  [ "$QUICK" = 1 ] && cmd+=(--quick)
  out="$RUN_DIR"
  [ "$name" = profiling ] && out="$RUN_DIR/profile"  # a report folder of its own (md, json, PNGs)
  # --time-budget: the benchmark starts no case that would end past it (its clock includes start-up); the hard
  # timeout is a backstop only.
  cmd+=(--out "$out" --time-budget $((share - 10)))
  banner "benchmark $name (up to ${share}s): ${cmd[*]}"
  timeout -k "$KILL_AFTER" "$share" "$PYTHON" -m "${cmd[@]}" 2>&1 | tee "$RUN_DIR/bench-$name.log"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) STATUS[$name]=ok ;;
    3) STATUS[$name]="provider(s) FAILED (validation or a case raised; see the report)"; FAILED=1 ;;
    124|137) STATUS[$name]="TIMED OUT after ${share}s (partial results kept)"; FAILED=1 ;;
    2) STATUS[$name]="BAD REQUEST (rc 2)"; FAILED=1 ;;
    *) STATUS[$name]="CRASHED (rc $rc; see bench-$name.log)"; FAILED=1 ;;
  esac
  if [ "$name" = profiling ] && [ -f "$RUN_DIR/profile/report.md" ]; then
    cp "$RUN_DIR/profile/report.md" "$RUN_DIR/profile-report.md"
  fi
  copy_out
done

banner "summary"
summary
cat "$RUN_DIR/summary.txt"
mkdir -p "$LOGS"
cp "$RUN_DIR"/*.log "$RUN_DIR/summary.txt" "$LOGS/"
cp "$RUN_DIR"/*.md "$RUN_DIR"/*.json "$RESULTS/" 2>/dev/null
rm -f "$RESULTS/profile-report.md"
if [ -f "$RUN_DIR/profile/report.md" ]; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -cs 'A-Za-z0-9' '-' | tr 'A-Z' 'a-z')
  REPORT_DIR="reports/$(date -u +%Y-%m-%d)-${gpu:-gpu}gpu-check"
  mkdir -p "$REPORT_DIR" && cp "$RUN_DIR"/profile/* "$REPORT_DIR/"
  echo "profiling report -> $REPORT_DIR/"
fi
echo "logs -> $LOGS; results -> $RESULTS/"
exit "$FAILED"
