#!/usr/bin/env bash
# One command for a GPU machine (`make gpu-check`): facts -> build the extension -> CUDA tests -> GPU benchmarks
# -> logs and results into benchmarks/results/ (and into $OUT when set). Installs nothing; uses the python there.
#
#   bash benchmarks/gpu_check.sh              # full benchmark shape set
#   QUICK=1 bash benchmarks/gpu_check.sh      # quick shape set
#
# Environment: PYTHON (python3), QUICK (0), BUDGET_S (450: whole script, seconds), BUILD_TIMEOUT (180),
# TEST_TIMEOUT (240), SPARSEMM_CUDA_ARCHS (default: this GPU's arch), OUT (also copy results there).
# Exit status: 0 when every step passed, 1 when the build, the tests or a benchmark failed (see the summary).
set -u

# The benchmarks in priority order (when time runs short the last ones are skipped), one "module [args]" per entry;
# add a line per new benchmark. --out/--time-budget are appended.
BENCHMARKS=(
  "benchmarks.bench_grouped_gemm --device cuda --dtype bf16"
  "benchmarks.bench_mot_block --device cuda --dtype bf16"
  "benchmarks.bench_moma_ffn --device cuda --dtype bf16 --configs 435M"
  "benchmarks.bench_mod --device cuda --dtype bf16 --configs 443M"
  "benchmarks.bench_token_choice --device cuda --dtype bf16"
  "benchmarks.bench_avgk --device cuda --dtype bf16"
  "profiling --configs gpu-quick --device cuda"
)

PYTHON=${PYTHON:-python3}
QUICK=${QUICK:-0}
BUDGET_S=${BUDGET_S:-450}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-180}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}

cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAMP=$(date -u +%Y%m%d-%H%M%S)
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-$STAMP.XXXX")
RESULTS=benchmarks/results
LOGS="$RESULTS/logs/gpu-check-$STAMP"
declare -A STATUS=()
FAILED=0

banner() { printf '\n==================== %s ====================\n' "$*"; }
left() { echo $((BUDGET_S - SECONDS)); }

banner "environment"
{
  date -u
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  else
    echo "nvidia-smi: not found"
  fi
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
EOF
} 2>&1 | tee "$RUN_DIR/env.log"

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
  SPARSEMM_BUILD_CUDA=1 timeout "$BUILD_TIMEOUT" "$PYTHON" setup.py build_ext --inplace >"$RUN_DIR/build.log" 2>&1
  rc=$?
  tail -n 15 "$RUN_DIR/build.log"
fi
if [ "$rc" -eq 0 ]; then STATUS[build]=ok; else
  STATUS[build]="FAILED (rc $rc)"; FAILED=1
  echo "!!!!!!!! EXTENSION BUILD FAILED (rc $rc): continuing without it; the cuda backend will be skipped !!!!!!!!"
fi

banner "CUDA tests (pytest -m gpu, timeout ${TEST_TIMEOUT}s)"
timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest -m gpu tests -q -rf --maxfail=25 -p no:cacheprovider 2>&1 | tee "$RUN_DIR/tests.log"
rc=${PIPESTATUS[0]}
case "$rc" in
  0) STATUS[tests]=ok ;;
  5) STATUS[tests]="no tests collected" ;;
  124) STATUS[tests]="TIMED OUT after ${TEST_TIMEOUT}s"; FAILED=1 ;;
  *) STATUS[tests]="FAILED (rc $rc)"; FAILED=1 ;;
esac

n=${#BENCHMARKS[@]}
for i in "${!BENCHMARKS[@]}"; do
  read -r -a cmd <<<"${BENCHMARKS[$i]}"
  name=${cmd[0]##*.}
  share=$(( ($(left) - 15) / (n - i) ))  # this benchmark's share of the time left
  if [ "$share" -lt 60 ]; then
    # Too little for every remaining one: the list is in priority order, so this one still gets 60 s if they exist
    # and the last ones go without (an even split would skip the first, most important, benchmark).
    if [ $(( $(left) - 15 )) -lt 60 ]; then
      STATUS[$name]="NOT RUN ($(( $(left) - 15 ))s left)"; FAILED=1; continue
    fi
    share=60
  fi
  [ "$QUICK" = 1 ] && cmd+=(--quick)
  # --time-budget stops starting new shapes early enough that the hard timeout is a backstop only.
  out="$RUN_DIR"
  [ "$name" = profiling ] && out="$RUN_DIR/profile"  # a report folder of its own (md, json, PNGs)
  cmd+=(--out "$out" --time-budget $((share * 3 / 4)))
  banner "benchmark $name (up to ${share}s): ${cmd[*]}"
  timeout "$share" "$PYTHON" -m "${cmd[@]}" 2>&1 | tee "$RUN_DIR/bench-$name.log"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) STATUS[$name]=ok ;;
    1) STATUS[$name]="provider(s) FAILED validation"; FAILED=1 ;;
    124) STATUS[$name]="TIMED OUT after ${share}s (partial results kept)"; FAILED=1 ;;
    *) STATUS[$name]="FAILED (rc $rc)"; FAILED=1 ;;
  esac
done

banner "summary"
{
  echo "gpu_check $STAMP on $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no GPU')"
  for step in build tests; do printf '  %-22s %s\n' "$step" "${STATUS[$step]:-not run}"; done
  for entry in "${BENCHMARKS[@]}"; do
    name=${entry%% *}; name=${name##*.}
    printf '  %-22s %s\n' "$name" "${STATUS[$name]:-not run}"
  done
  grep -h -E '^[0-9]+ rows' "$RUN_DIR"/bench-*.log 2>/dev/null | sed 's/^/  /'
  echo "  elapsed ${SECONDS}s; exit $FAILED"
} | tee "$RUN_DIR/summary.txt"

mkdir -p "$LOGS"
cp "$RUN_DIR"/*.log "$RUN_DIR/summary.txt" "$LOGS/"
cp "$RUN_DIR"/*.md "$RUN_DIR"/*.json "$RESULTS/" 2>/dev/null
if [ -f "$RUN_DIR/profile/report.md" ]; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -cs 'A-Za-z0-9' '-' | tr 'A-Z' 'a-z')
  REPORT_DIR="reports/$(date -u +%Y-%m-%d)-${gpu:-gpu}gpu-check"
  mkdir -p "$REPORT_DIR" && cp "$RUN_DIR"/profile/* "$REPORT_DIR/"
  cp "$RUN_DIR/profile/report.md" "$RUN_DIR/profile-report.md"
  echo "profiling report -> $REPORT_DIR/"
fi
echo "logs -> $LOGS; results -> $RESULTS/"
if [ -n "${OUT:-}" ]; then
  # The device tool brings back at most 8 files: one archive of everything, the summary and up to 6 reports.
  mkdir -p "$OUT"
  tar czf "$OUT/gpu-check-$STAMP.tar.gz" -C "$RUN_DIR" .
  cp "$RUN_DIR/summary.txt" "$OUT/"
  find "$RUN_DIR" -maxdepth 1 -name '*.md' | head -n 6 | xargs -r cp -t "$OUT/"  # incl. profile-report.md
  echo "copied to \$OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
exit "$FAILED"
