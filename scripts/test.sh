#!/usr/bin/env bash
# The whole test suite: format check, clippy with warnings denied, every test and doc test.
# Starts a throwaway Redis on loopback (no persistence) unless STURDY_REDIS_URL is already set,
# installing Debian's redis-server first when it is missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."

redis_pid=""
stop_redis() {
  if [ -n "$redis_pid" ]; then
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  fi
}
trap stop_redis EXIT

if [ -z "${STURDY_REDIS_URL:-}" ]; then
  if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing redis-server (Debian package)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  if command -v redis-server >/dev/null 2>&1; then
    port=""
    for p in $(seq 16379 16479); do
      if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port=$p; break; fi
    done
    [ -n "$port" ] || { echo "no free port for redis-server" >&2; exit 1; }
    redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no --protected-mode yes \
      --logfile "" --loglevel warning >/dev/null &
    redis_pid=$!
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
      sleep 0.05
    done
    export STURDY_REDIS_URL="redis://127.0.0.1:$port/"
    echo "== redis-server on $STURDY_REDIS_URL (pid $redis_pid)"
  elif [ "${CI:-}" = "true" ]; then
    echo "redis-server is missing and could not be installed" >&2
    exit 1
  else
    echo "== redis-server not found: Redis tests will be skipped (set STURDY_REDIS_URL to run them)"
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== cargo doc (broken intra-doc links are errors)"
cargo doc --workspace --all-features --no-deps --quiet
echo "== cargo test"
cargo test --workspace --all-features
echo "== fuzz targets, a few seconds each (fuzz/README.md)"
fuzz/run.sh "${STURDY_FUZZ_SECONDS:-5}"
