#!/usr/bin/env bash
# The entrypoint of every search job, run by Ray in the job's working directory (this checkout,
# shipped by jobs/runtime_env.yaml):
#
#   bash jobs/entrypoint.sh SUBMIT_PYTHON [plora-ray arguments ...]
#
# Runs `python -m plora_ray.cli ARGS` with the first interpreter that finds ray, torch and
# plora_ray: $PLORA_PYTHON (set it in jobs/runtime_env.yaml env_vars when the cluster's Python
# is elsewhere), SUBMIT_PYTHON (the Python the job was submitted from: right for a head on the
# same machine, even one started as .venv/bin/ray start without the venv on PATH), then the
# node's python3 and python. With none, one line says so and the job fails (exit 2).
set -uo pipefail
submit_python="${1:-}"
shift || true
tried=""
for py in "${PLORA_PYTHON:-}" "$submit_python" python3 python; do
  [ -n "$py" ] || continue
  if command -v "$py" >/dev/null 2>&1 &&
    "$py" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("ray", "torch", "plora_ray")))' 2>/dev/null; then
    exec "$py" -m plora_ray.cli "$@"
  fi
  tried="$tried ${py}"
done
echo "plora-ray job: no Python on ${HOSTNAME:-this node} finds ray, torch and plora_ray (tried:$tried);" \
  "start Ray from the project's environment (.venv/bin/ray start ...) or set PLORA_PYTHON" \
  "in jobs/runtime_env.yaml env_vars to that interpreter" >&2
exit 2
