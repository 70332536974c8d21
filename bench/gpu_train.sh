#!/usr/bin/env bash
# One shot on a CUDA machine, at most ~270 s all told (bench/gpu_run.sh): one bf16 training step
# (autocast, AdamW) of GPT-2 small and Mixer-B/16, dense against Pixelfly (MLPs at budget 0.25,
# block 64), against the talk's figures (GPT-2 small 2.1x, Mixer-B/16 2.3x; ViT-B/16 2.0x).
# Writes gpu_train.csv and gpu_train.log under $OUT when set (else results/). Exit 0 when every
# step ran with a finite loss; 2 when no python here has a torch that sees a GPU.
#   bench/gpu_train.sh            # CUDA machine; installs nothing
#   bench/gpu_train.sh --smoke    # any machine: CPU, toy sizes
exec "$(dirname "$0")/gpu_run.sh" gpu_train "$@"
