#!/usr/bin/env bash
# Submit the population-based smoke search (pbt_unload: trials fork at PLoRA unloads; tiny
# LLaMA on CPU, a few minutes) to a Ray cluster as a job:
#
#   jobs/smoke_pbt.sh [more plora-ray search options, e.g. --resume, --name NAME, --set k=v ...]
#
# RAY_ADDRESS    the cluster's job server (default http://127.0.0.1:8265: a local head).
# RAY_AUTH_TOKEN the cluster's token when it uses token auth and ~/.ray/auth_token is not it
#                (see jobs/README.md); RAY_AUTH_MODE=token is set for you when a token is found.
# PLORA_STORAGE  where the search directory goes; every node must reach it: a shared file
#                system path or s3:// / gs:// (default: $PWD/runs/search, right for a local head).
# Extra arguments to `ray job submit` go in RAY_JOB_ARGS (e.g. "--no-wait").
# See jobs/README.md for running against a real cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
PLORA_STORAGE="${PLORA_STORAGE:-$PWD/runs/search}"
# `ray` from .venv when not activated, the auth token, the interpreter for the entrypoint.
source jobs/submit_env.sh
# The entrypoint is the search driver (Tune + Optuna): light, but it must be scheduled somewhere;
# trials request their own driver CPU and worker CPUs/GPUs from the search space.
# shellcheck disable=SC2086
exec ray job submit --address "$RAY_ADDRESS" \
  --runtime-env jobs/runtime_env.yaml --working-dir . \
  --entrypoint-num-cpus 0.5 ${RAY_JOB_ARGS:-} \
  -- bash jobs/entrypoint.sh "$submit_python" search search_spaces/smoke_pbt.yaml --storage "$PLORA_STORAGE" "$@"
