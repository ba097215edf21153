# Sourced by the job scripts (jobs/*.sh): what every submission needs besides its search space.
# Run from the checkout's root (the scripts cd there first).

# `ray` from the checkout's .venv when the venv is not activated (README runs .venv/bin/...).
if ! command -v ray >/dev/null 2>&1 && [ -x .venv/bin/ray ]; then
  PATH="$PWD/.venv/bin:$PATH"
fi

# Token authentication. `ray start --head` (Ray 2.60) turns it on when a token exists
# (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token, which ray.init()
# writes on its first local run), but `ray job submit` sends the token only with
# RAY_AUTH_MODE=token. So with no mode chosen, choose token when the user named a token
# (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH), or when this machine's own ~/.ray/auth_token goes to a
# head on this machine (like Ray, never send the local token to another address unasked).
# A head without auth ignores the token.
case "${RAY_ADDRESS:-http://127.0.0.1:8265}" in
  *://127.0.0.1:* | *://localhost:* | 127.0.0.1:* | localhost:*) local_head=1 ;;
  *) local_head=0 ;;
esac
if [ -z "${RAY_AUTH_MODE:-}" ] && {
  [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -s "${RAY_AUTH_TOKEN_PATH:-/nonexistent}" ] ||
    { [ "$local_head" = 1 ] && [ -s "$HOME/.ray/auth_token" ]; }
}; then
  export RAY_AUTH_MODE=token
fi

# The interpreter this checkout runs with, handed to jobs/entrypoint.sh as its first choice after
# PLORA_PYTHON: on a head on this machine it is the project's Python whatever PATH the head was
# started with. Empty when there is none here (the entrypoint then tries the node's python3).
submit_python=""
if [ -x .venv/bin/python ]; then
  submit_python="$PWD/.venv/bin/python"
elif ray_cli="$(command -v ray)"; then
  shebang="$(head -n 1 "$ray_cli")"
  case "$shebang" in
    '#!'*python*) submit_python="${shebang#\#!}" ;;
  esac
fi
