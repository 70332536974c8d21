#!/usr/bin/env bash
# Shared launcher of bench/gpu.sh and bench/gpu_train.sh: runs bench/<script>.py under one
# deadline of GPU_BENCH_LIMIT (default 270) seconds of wall time all told, interpreter start and
# imports included: the script stops starting work 25 s before the limit, gets SIGINT at the
# limit (it then writes what it has) and SIGKILL 10 s later.
# Installs nothing: uses the first of $PYTHON, python3, .venv/bin/python whose torch sees CUDA
# (a script exits 2 when its torch sees no GPU, and the next python is tried); with --smoke the
# first of $PYTHON, .venv/bin/python, python3. Results go to $OUT when set, else results/.
#   bench/gpu_run.sh gpu_bench [--smoke] [args...]
set -uo pipefail
START=$(date +%s)
LIMIT=${GPU_BENCH_LIMIT:-270}
SCRIPT=$1
shift
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR=${OUT:-results}
mkdir -p "$OUT_DIR"

candidates=(${PYTHON:-} python3 .venv/bin/python)
case " $* " in *" --smoke "*) candidates=(${PYTHON:-} .venv/bin/python python3) ;; esac
tried=()
for py in "${candidates[@]}"; do
  command -v "$py" >/dev/null 2>&1 || continue
  tried+=("$py")
  left=$(( LIMIT - ($(date +%s) - START) ))
  [ "$left" -gt 30 ] || { echo "$SCRIPT: out of time before a run could start" >&2; exit 1; }
  timeout -k 10 -s INT "$left" "$py" "bench/$SCRIPT.py" --deadline $(( left - 25 )) --out "$OUT_DIR" "$@"
  status=$?
  [ "$status" -eq 2 ] && continue   # this python's torch sees no GPU: try the next one
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then echo "$SCRIPT: stopped at the ${LIMIT} s limit" >&2; fi
  exit "$status"
done
echo "$SCRIPT: no python here has a torch that sees a CUDA GPU (tried ${tried[*]:-none});" \
     "on a CPU machine add --smoke" >&2
exit 2
