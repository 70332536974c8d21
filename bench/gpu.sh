#!/usr/bin/env bash
# One shot on a CUDA machine, at most ~270 s of wall time all told (bench/gpu_run.sh: one
# deadline, imports included, a kill after it): bench/gpu_bench.py precompiles the Triton kernels
# in parallel, times PixelflyLinear against nn.Linear (bf16, forward+backward, CUDA graphs and
# eager; goal rows first: blocks 64 and 128, budget 0.25, GPT-2 and Mixer-B/16 MLP shapes),
# checks every kernel path against float64, then adds rows while time remains.
# Writes gpu_bench.csv and gpu_bench.log under $OUT when set (else results/); prints a summary
# under 8 KB. Exit 0 when every check that ran passed, even if the deadline trimmed rows (the
# summary lists them); 1 when a check failed; 2 when no python here has a torch that sees a GPU.
#   bench/gpu.sh            # CUDA machine; installs nothing
#   bench/gpu.sh --smoke    # any machine: CPU, Triton interpreter, toy sizes
exec "$(dirname "$0")/gpu_run.sh" gpu_bench "$@"
