#!/usr/bin/env bash
# One short, self-contained GPU run for issue 4 (about 3-5 minutes on one H100/H200):
#   1. every Triton kernel (forward, input gradient, weight gradient, fused low-rank and bias, autograd,
#      autocast) against the dense float64 reference, for every block size and dtype;
#   2. the speed table: Pixelfly (layer and fused kernel) vs its sparse part alone (Triton, torch BSR)
#      vs Monarch vs dense nn.Linear at GPT-2 small/medium and Mixer-B MLP shapes, bf16.
# Prints everything as it goes and writes results/gpu_bench.csv. Exit status 1 if a check failed.
# Arguments go to bench/gpu_bench.py, e.g.  bench/gpu.sh --blocks 32 64 128 --budgets 0.1 0.25 0.5
# Installs nothing if a Python whose torch sees the GPU is there (.venv, or the machine's python3;
# set PYTHON=... to choose); otherwise it runs `make install` once and uses .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

sees_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

PY=""
for candidate in ${PYTHON:-} .venv/bin/python python3; do
  if command -v "$candidate" >/dev/null 2>&1 && sees_cuda "$candidate"; then PY=$candidate; break; fi
done
if [ -z "$PY" ] && [ ! -x .venv/bin/python ]; then
  make install && sees_cuda .venv/bin/python && PY=.venv/bin/python
fi
if [ -z "$PY" ]; then
  echo "bench/gpu.sh: no Python here has a torch that sees a CUDA GPU (tried ${PYTHON:-} .venv/bin/python python3)." >&2
  echo "  On a machine without a GPU, check the script with: .venv/bin/python bench/gpu_bench.py --smoke" >&2
  exit 2
fi
echo "bench/gpu.sh: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
# SIGINT at the limit: gpu_bench.py then prints the rows it has measured before exiting.
exec timeout -s INT 295 "$PY" bench/gpu_bench.py --deadline 230 "$@"
