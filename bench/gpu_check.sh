#!/usr/bin/env bash
# GPU check of qkdissect (NOT RUN in the session that wrote it: no GPU was lent; see bench/gpu_check.py).
#
# One script, under 5 minutes on one modern GPU (H100/H200/A100 class, ≥ 8 CPU cores): dissects a ViT-L-shaped
# model on the GPU and the CPU (singular values, cosines), writes 20 000 synthetic images as WebDataset shards,
# times a bare forward pass of a ViT-B-shaped model (float32 and bf16 autocast), mines the 20 000 images on the
# GPU with --amp bf16 (images/s end to end, peak GPU memory), and compares CPU float32 with GPU float32 and bf16
# mining on 512 of them (scores 1e-3 / 2e-2 relative, top-k sets identical where the k-th score is clear).
# Prints PASS/FAIL per check; exit status 1 if any failed, 124 if it ran past the time limit.
#
#   bash bench/gpu_check.sh                  # everything on cuda:0
#   bash bench/gpu_check.sh --images 5000    # any option of bench/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export QKDISSECT_CACHE_DIR="${QKDISSECT_CACHE_DIR:-$(mktemp -d)}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout "${GPU_CHECK_TIMEOUT:-290}" python -u bench/gpu_check.py "$@"
