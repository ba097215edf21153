#!/usr/bin/env bash
# Create .venv and install plora-ray with its test and dashboard (optuna-dashboard) extras.
#
# CPU machines (the default): torch's CPU wheel is installed first, so nothing pulls the multi-GB
# CUDA wheels. GPU machines: PLORA_TORCH=cuda ./setup.sh installs torch from the default index
# (CUDA build) instead. Versions are pinned by constraints.txt (the set this project is tested with).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${PLORA_TORCH:-cpu}" = "cpu" ]; then
  # 2.13.0 is the CPU wheel available on these machines; elsewhere the CPU index has it:
  #   pip install torch --index-url https://download.pytorch.org/whl/cpu
  .venv/bin/python -m pip install -q "torch==${PLORA_TORCH_VERSION:-2.13.0}"
else
  .venv/bin/python -m pip install -q torch
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,dashboard]"
echo "setup done: $(.venv/bin/python -c 'import torch, ray, deepspeed, peft, transformers, lm_eval; print("torch", torch.__version__, "ray", ray.__version__, "deepspeed", deepspeed.__version__, "peft", peft.__version__, "transformers", transformers.__version__)')"
