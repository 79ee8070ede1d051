#!/usr/bin/env bash
# The first-GPU check (bench/gpu_check.py): environment, compiled throughput and MFU at d12/d20, the
# checkpoint stall, kill -9 + resume through `phoenix run`, two processes on one GPU, the emergency save
# of d20, the relaunch to first step with a warm and a cold compile cache; one JSON file.
# Offline; needs only torch, numpy, safetensors, pyarrow, tokenizers (+ click for `phoenix run`).
#   scripts/gpu_check.sh [--out gpu_check.json] [--budget-s 480]      scripts/gpu_check.sh --cpu
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# No Hub and no W&B: the check makes its own shards and must never wait on a network.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
unset HF_REPO_ID HF_TOKEN WANDB_RUN
exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
