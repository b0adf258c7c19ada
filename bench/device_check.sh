#!/usr/bin/env bash
# The GPU proof in one command, for a fresh GPU machine (the device image: torch, triton, transformers, peft,
# accelerate; no diffusers or open_clip — those travel as wheels in .whl/, made here by `make device-wheels`).
#
#   bash bench/device_check.sh                 # install, info, pytest -m gpu, every bench suite
#   bash bench/device_check.sh --suites stage,dfusion --no-tests   # a second, shorter call
#   bash bench/device_check.sh --dry-run       # CPU: no install, tiny shapes, Triton interpreted (CI runs this)
#
# Everything must end within B2K_CHECK_BUDGET_S seconds (default 470: an 8-minute lease slot, build included);
# each stage gets what is left, suites are stopped at their limits and keep the rows they finished. Results go
# to $OUT when set (the device tool brings that folder back), else bench/results/: one JSON per suite,
# summary-<gpu>-<date>-<hhmm>.md and device-check-<gpu>-<date>-<hhmm>.log, at most 8 files. Commit them under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${B2K_CHECK_BUDGET_S:-470}
DEADLINE=$((START + BUDGET))
DRY=0 TESTS=1 SUITES=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-tests) TESTS=0 ;;
    --suites) SUITES="$2"; shift ;;
    *) echo "device_check.sh: unknown option $1 (use --dry-run, --no-tests, --suites a,b)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
fi
SLUG=$($PY -c "from bench.common import device_slug; print(device_slug())" 2>/dev/null || echo unknown-device)
STAMP=$(date -u +%F-%H%M)  # a second call the same day must not overwrite the first one's summary and log
LOG="$OUT_DIR/device-check-$SLUG-$STAMP.log"
: >"$LOG"
say() { echo "[device_check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
left() { echo $((DEADLINE - $(date +%s))); }
trap 'say "stopped by a signal"; exit 124' TERM INT

if [ "$DRY" = 0 ]; then
  say "install (budget ${BUDGET}s)"
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl >>"$LOG" 2>&1 \
      || { say "FAILED: installing the carried wheels (.whl/)"; exit 1; }
  else
    $PY -c "import diffusers" 2>/dev/null \
      || say "WARNING: no .whl/ and no diffusers: run 'make device-wheels' here and carry .whl"
  fi
  $PY -m pip install -q --no-build-isolation --no-deps . >>"$LOG" 2>&1 \
    || { say "FAILED: pip install --no-build-isolation --no-deps ."; tail -30 "$LOG"; exit 1; }
  # the tests and benches import b2kernels from this checkout: give it the compiled extension just built
  SO=$(cd / && $PY -c "import b2kernels._C as c; print(c.__file__)" 2>>"$LOG") && cp "$SO" b2kernels/ \
    || say "WARNING: b2kernels._C did not build; the arena runs its python backend"
fi

say "python -m b2kernels.info"
$PY -m b2kernels.info 2>&1 | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw \
  --format=csv 2>&1 | tee -a "$LOG"

TEST_RESULT="not run"
if [ "$TESTS" = 1 ] && [ "$DRY" = 0 ]; then
  # the GPU tests get at most a quarter of what is left: the measurements are the point of the lease
  T=$(($(left) / 4)); [ "$T" -gt 90 ] && T=90
  say "pytest -m gpu (limit ${T}s)"
  # shellcheck disable=SC2086  # B2K_PYTEST_ARGS: extra pytest words, e.g. -k "not kv_inject" after a fault
  timeout -s TERM "$T" $PY -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -ra ${B2K_PYTEST_ARGS:-} tests >>"$LOG" 2>&1
  rc=$?
  TEST_RESULT=$(grep -E "^(=+ )?[0-9]+ (passed|failed)|no tests ran|(passed|failed|error).* in [0-9.]+s" "$LOG" | tail -1)
  [ $rc = 124 ] && TEST_RESULT="stopped at ${T}s: $TEST_RESULT"
  say "pytest -m gpu: exit $rc: $TEST_RESULT"
fi

say "bench suites ($(left)s left)"
ARGS=(--out "$OUT_DIR" --deadline $((DEADLINE - 5)) --log "$LOG" --stamp "$STAMP" --note "gpu tests=$TEST_RESULT")
[ "$DRY" = 1 ] && ARGS+=(--dry-run)
[ -n "$SUITES" ] && ARGS+=(--suites "$SUITES")
$PY -m bench.device_check "${ARGS[@]}"
rc=$?
say "done (exit $rc)"
exit $rc
