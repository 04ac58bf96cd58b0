#!/usr/bin/env bash
# Interop tests: sturdy against real third-party peers, all on 127.0.0.1.
#
#   nginx     limit_req at 10 r/s (interop/conf/nginx.conf.in)
#   HAProxy   fault proxies: connections closed or reset before an answer, stalls, answers
#             dropped after the backend processed the request, 504 after a server timeout (interop/conf/haproxy.cfg.in)
#   node      oauth2-mock-server with a JWT-checking API, json-server 0.17 (Link pagination),
#             the origin behind HAProxy and a black hole (interop/peers.js); the Standard
#             Webhooks and Stripe signing libraries (interop/sign.js)
#
# Installs what is missing (Debian's nginx-light, haproxy, nodejs and npm when root; the npm
# packages from interop/package-lock.json with `npm ci`), starts every peer, exports their
# addresses as STURDY_INTEROP_* variables, runs the `interop_*` test files of the `sturdy`
# package, and stops every peer it started, whatever happens.
#
# Extra arguments go to `cargo test` (for example a test name filter). With
# STURDY_INTEROP_KEEP=1 the peers' addresses are printed and the script waits for Ctrl-C
# instead of running the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
started=$(date +%s.%N)

need_apt=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing: ${need_apt[*]} (install them, or run as root on Debian)" >&2
    exit 1
  fi
  echo "== installing ${need_apt[*]} (Debian packages)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"

if [ ! -d interop/node_modules ] || [ interop/package-lock.json -nt interop/node_modules/.package-lock.json ]; then
  echo "== installing the npm packages (interop/package-lock.json)"
  (cd interop && npm ci --no-audit --no-fund --loglevel=error)
fi

dir=$(mktemp -d /tmp/sturdy-interop.XXXXXX)
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

echo "== starting the node peers"
node interop/peers.js "$dir/peers.json" >"$dir/peers.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do
  [ -s "$dir/peers.json" ] && break
  if ! kill -0 "${pids[-1]}" 2>/dev/null; then cat "$dir/peers.log" >&2; exit 1; fi
  sleep 0.05
done
[ -s "$dir/peers.json" ] || { echo "the node peers did not start" >&2; cat "$dir/peers.log" >&2; exit 1; }
peer() { node -p "require('$dir/peers.json').$1"; }
oauth=$(peer oauth); api=$(peer api); stats=$(peer stats); json=$(peer json)
backend=$(peer backend); blackhole=$(peer blackhole); odd=$(peer odd)

# Ports for nginx and HAProxy: free ones below the kernel's ephemeral range, so that no
# outgoing connection can take one between the choice and the bind (a port chosen by
# listening on port 0 is in that range, and was once taken that way before nginx bound it).
# A start that fails anyway (a port taken by another listener in between) is tried again on
# other ports, and what nginx and HAProxy printed is shown.
ephemeral_low=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
[ "$ephemeral_low" -gt 12000 ] || ephemeral_low=32768
pick_ports() {
  local span=$((ephemeral_low - 11000)) p tries=0
  ports=()
  while [ "${#ports[@]}" -lt 10 ]; do
    tries=$((tries + 1))
    [ "$tries" -lt 5000 ] || { echo "no free ports for nginx and HAProxy" >&2; return 1; }
    # 10000 up to the ephemeral range, leaving out the Redis ports of scripts/test.sh.
    p=$((10000 + (RANDOM * 32768 + RANDOM) % span))
    case "$p" in 163[0-9][0-9]|164[0-9][0-9]|165[0-9][0-9]|265[0-9][0-9]) continue ;; esac
    [[ " ${ports[*]} " == *" $p "* ]] && continue
    port_open "$p" && continue
    ports+=("$p")
  done
}
proxies_up() {
  local p i
  for p in "${ports[@]}"; do
    for i in $(seq 1 200); do
      port_open "$p" && continue 2
      kill -0 "$nginx_pid" 2>/dev/null || { echo "nginx exited" >&2; return 1; }
      kill -0 "$haproxy_pid" 2>/dev/null || { echo "HAProxy exited" >&2; return 1; }
      sleep 0.05
    done
    echo "nothing listens on 127.0.0.1:$p after 10 s" >&2
    return 1
  done
}
for start_try in 1 2 3; do
  pick_ports
  echo "== starting nginx and HAProxy (try $start_try)"
  sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|${ports[0]}|g" -e "s|@UPSTREAM_PORT@|${ports[1]}|g" \
    interop/conf/nginx.conf.in >"$dir/nginx.conf"
  nginx -t -q -p "$dir" -c "$dir/nginx.conf"
  nginx -p "$dir" -c "$dir/nginx.conf" >"$dir/nginx.out" 2>&1 &
  nginx_pid=$!
  pids+=("$nginx_pid")
  sed -e "s|@DIR@|$dir|g" -e "s|@BACKEND@|$backend|g" -e "s|@BLACKHOLE@|$blackhole|g" \
    -e "s|@NORMAL@|${ports[2]}|g" -e "s|@RESET@|${ports[3]}|g" -e "s|@FLAKY_RESET@|${ports[4]}|g" \
    -e "s|@COMMIT_DROP@|${ports[5]}|g" -e "s|@STALL@|${ports[6]}|g" -e "s|@FLAKY_STALL@|${ports[7]}|g" \
    -e "s|@GATEWAY_TIMEOUT@|${ports[8]}|g" -e "s|@TCP_REJECT@|${ports[9]}|g" \
    interop/conf/haproxy.cfg.in >"$dir/haproxy.cfg"
  haproxy -c -f "$dir/haproxy.cfg" >/dev/null
  haproxy -db -f "$dir/haproxy.cfg" >"$dir/haproxy.out" 2>&1 &
  haproxy_pid=$!
  pids+=("$haproxy_pid")
  if proxies_up; then break; fi
  echo "-- nginx printed:" >&2
  cat "$dir/nginx.out" "$dir/nginx-error.log" >&2 2>/dev/null || true
  echo "-- HAProxy printed:" >&2
  cat "$dir/haproxy.out" >&2 || true
  kill "$nginx_pid" "$haproxy_pid" 2>/dev/null || true
  wait "$nginx_pid" "$haproxy_pid" 2>/dev/null || true
  [ "$start_try" -lt 3 ] || { echo "nginx or HAProxy did not start (3 tries)" >&2; exit 1; }
done

u() { echo "http://127.0.0.1:$1"; }
export STURDY_INTEROP=1
export STURDY_INTEROP_NODE_DIR="$root/interop"
export STURDY_INTEROP_NGINX_URL=$(u "${ports[0]}")
export STURDY_INTEROP_HAPROXY_NORMAL_URL=$(u "${ports[2]}")
export STURDY_INTEROP_HAPROXY_RESET_URL=$(u "${ports[3]}")
export STURDY_INTEROP_HAPROXY_FLAKY_RESET_URL=$(u "${ports[4]}")
export STURDY_INTEROP_HAPROXY_COMMIT_DROP_URL=$(u "${ports[5]}")
export STURDY_INTEROP_HAPROXY_STALL_URL=$(u "${ports[6]}")
export STURDY_INTEROP_HAPROXY_FLAKY_STALL_URL=$(u "${ports[7]}")
export STURDY_INTEROP_HAPROXY_GATEWAY_TIMEOUT_URL=$(u "${ports[8]}")
export STURDY_INTEROP_HAPROXY_TCP_REJECT_URL=$(u "${ports[9]}")
export STURDY_INTEROP_BACKEND_URL=$(u "$backend")
export STURDY_INTEROP_OAUTH_URL=$(u "$oauth")
export STURDY_INTEROP_API_URL=$(u "$api")
export STURDY_INTEROP_STATS_URL=$(u "$stats")
export STURDY_INTEROP_JSON_SERVER_URL=$(u "$json")
export STURDY_INTEROP_ODD_TOKEN_URL=$(u "$odd")

if [ "${STURDY_INTEROP_KEEP:-}" = 1 ]; then
  env | grep '^STURDY_INTEROP' | sort
  echo "== peers running; Ctrl-C stops them"
  while true; do sleep 3600 & wait $!; done
fi

echo "== cargo test (the interop binary: tests/interop_*.rs)"
status=0
# `--workspace`, as scripts/test.sh's `cargo test`: the same feature set, so the binary that run
# built is reused instead of 45 crates built again.
cargo test --workspace --all-features \
  --test interop "$@" || status=$?
ended=$(date +%s.%N)
echo "== interop.sh took $(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.1f", b - a }') s"
exit $status
