#!/usr/bin/env bash
# The GPU check on a machine with one NVIDIA GPU and nothing but this checkout and pip wheels:
#
#   bash benchmarks/gpu_check.sh [--out benchmarks/results/gpu_check.json]
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu_check.json    # CPU, toy size
#
# Installs what it needs when .venv is missing (setup.sh with PLORA_TORCH=cuda: the CUDA torch
# wheel from the default index, not the CPU pin), then runs benchmarks/gpu_check.py: throughput at
# LLaMA-7B shape, a 20-step PLoRA run of llama7b_plora.yaml on a 7B-wide random model (2 unloads,
# from_base, export) and a GSM8K/MMLU evaluation timing; one JSON of figures. Under 8 minutes on
# an A100/H100-class GPU, install excluded (a few minutes on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  if [[ " $* " == *" --dry-run "* ]]; then PLORA_TORCH=cpu ./setup.sh; else PLORA_TORCH=cuda ./setup.sh; fi
fi
exec .venv/bin/python -m benchmarks.gpu_check "$@"
