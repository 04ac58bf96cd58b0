#!/usr/bin/env bash
# The whole test suite: format check, clippy with warnings denied, every test and doc test.
# Starts a throwaway Redis on loopback (no persistence) unless STURDY_REDIS_URL is already set,
# and a throwaway Redis Cluster (3 primaries, 1 replica each) unless STURDY_REDIS_CLUSTER_URLS
# is already set, installing Debian's redis-server first when it is missing and we are root.
# Both are stopped on exit. With CI=true, a Redis that cannot be started is a failure.
set -euo pipefail
# A one-shot build gains nothing from incremental data, which doubles the target dir on disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cd "$(dirname "$0")/.."
# Each step's heading says how long the run had taken when it began.
phase() { echo "== $* (at ${SECONDS} s)"; }

redis_pid=""
cluster_pids=()
cluster_dir=""
stop_redis() {
  for pid in $redis_pid "${cluster_pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in $redis_pid "${cluster_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "$cluster_dir" ]; then rm -rf "$cluster_dir"; fi
}
trap stop_redis EXIT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 100); do
    if ! port_free "$1"; then return 0; fi
    sleep 0.05
  done
  echo "redis-server did not start on port $1" >&2
  return 1
}

if [ -z "${STURDY_REDIS_URL:-}" ] || [ -z "${STURDY_REDIS_CLUSTER_URLS:-}" ]; then
  if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing redis-server (Debian package)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
  fi
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    if [ "${CI:-}" = "true" ]; then
      echo "redis-server or redis-cli is missing and could not be installed" >&2
      exit 1
    fi
    echo "== redis-server not found: Redis tests will be skipped (set STURDY_REDIS_URL and STURDY_REDIS_CLUSTER_URLS to run them)"
  fi
fi

if [ -z "${STURDY_REDIS_URL:-}" ] && command -v redis-server >/dev/null 2>&1; then
  port=""
  for p in $(seq 16379 16479); do
    if port_free "$p"; then port=$p; break; fi
  done
  [ -n "$port" ] || { echo "no free port for redis-server" >&2; exit 1; }
  redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no --protected-mode yes \
    --logfile "" --loglevel warning >/dev/null &
  redis_pid=$!
  wait_port "$port"
  export STURDY_REDIS_URL="redis://127.0.0.1:$port/"
  echo "== redis-server on $STURDY_REDIS_URL (pid $redis_pid)"
fi

# A Redis Cluster of six nodes on loopback: three primaries and a replica for each. Each node
# also listens on its port + 10000 (the cluster bus).
if [ -z "${STURDY_REDIS_CLUSTER_URLS:-}" ] && command -v redis-server >/dev/null 2>&1 \
  && command -v redis-cli >/dev/null 2>&1; then
  ports=()
  for p in $(seq 16500 16599); do
    if port_free "$p" && port_free $((p + 10000)); then ports+=("$p"); fi
    [ "${#ports[@]}" -lt 6 ] || break
  done
  [ "${#ports[@]}" -eq 6 ] || { echo "no six free ports for the Redis Cluster" >&2; exit 1; }
  cluster_dir=$(mktemp -d)
  # One snapshot file per node: a replica's full sync renames the snapshot it received to
  # its dbfilename and loads it, so replicas syncing at once must not share one name.
  for p in "${ports[@]}"; do
    redis-server --bind 127.0.0.1 --port "$p" --cluster-enabled yes \
      --cluster-config-file "$cluster_dir/nodes-$p.conf" --cluster-node-timeout 2000 \
      --dir "$cluster_dir" --dbfilename "dump-$p.rdb" --save '' --appendonly no --protected-mode yes \
      --logfile "" --loglevel warning >/dev/null &
    cluster_pids+=($!)
  done
  nodes=()
  for p in "${ports[@]}"; do
    wait_port "$p"
    nodes+=("127.0.0.1:$p")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
  # Ready when every node sees all slots served.
  for p in "${ports[@]}"; do
    for i in $(seq 1 200); do
      if redis-cli -p "$p" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then break; fi
      [ "$i" -lt 200 ] || { echo "the Redis Cluster did not come up" >&2; exit 1; }
      sleep 0.05
    done
  done
  urls=""
  for p in "${ports[@]}"; do urls="$urls${urls:+,}redis://127.0.0.1:$p/"; done
  export STURDY_REDIS_CLUSTER_URLS="$urls"
  echo "== Redis Cluster (3 primaries, 3 replicas) on $STURDY_REDIS_CLUSTER_URLS"
fi

# Some tests in the suite start nginx, HAProxy or node themselves, on loopback, before
# scripts/interop.sh runs: install them first when they are missing (Debian, as root).
need_apt=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
if [ ${#need_apt[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing ${need_apt[*]} (Debian packages) for the tests that start them"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"

phase "cargo fmt --check"
cargo fmt --all -- --check
phase "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --all-features -- -D warnings
phase "cargo doc, all features and default ones (any rustdoc warning is an error)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --quiet
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
phase "cargo test"
# Without backtraces: a CI log that keeps only the head and the tail of a long output then still
# shows each failing test's panic message (a backtrace of 20 frames pushed it out of view). Run
# the one test again with RUST_BACKTRACE=1 for its trace.
RUST_BACKTRACE=0 cargo test --workspace --all-features
phase "fuzz targets, a few seconds each (fuzz/README.md)"
fuzz/run.sh "${STURDY_FUZZ_SECONDS:-5}"
# sturdy against the real peers its users meet: nginx limit_req, HAProxy fault proxies, an OAuth2
# server and json-server from npm, the Standard Webhooks and Stripe signers (interop/README.md).
# STURDY_INTEROP=0 skips it.
if [ "${STURDY_INTEROP:-1}" != 0 ]; then
  phase "interop (scripts/interop.sh)"
  ./scripts/interop.sh
fi
echo "== all passed in ${SECONDS} s"
