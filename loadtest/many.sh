#!/usr/bin/env bash
# Many keep-alive clients on 1 KiB: wrk with 1 000 and 10 000 connections
# against yatagarasu and nginx (tuned for proxying), one worker each pinned
# to core 0, wrk and the origin on core 1. Reports requests/s, p50/p99/max
# latency and errors. The fd limit is raised to the hard limit (20 000 here)
# for every process, and yatagarasu's server.max_connections set above the
# client count.
#
#   bash loadtest/many.sh [yatagarasu binary]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/yatagarasu}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-"1000 10000"}
P_ORIGIN=18500 P_YATA=18501 P_NGINX=18502
ulimit -Hn 65536 2>/dev/null || true  # root may raise the hard limit
ulimit -n "$(ulimit -Hn)"
# shellcheck source=loadtest/origin.sh
source "$ROOT/loadtest/origin.sh"
setup_work
make_objects "$WORK" 1k
origin_conf "$WORK" "$P_ORIGIN" | sed "s/worker_connections 4096;/worker_connections 30000;/; s/^worker_processes 1;/worker_processes 1;\nworker_rlimit_nofile 60000;/" >"$WORK/origin.conf"
yata_yaml "$P_YATA" "$P_ORIGIN" | sed "s/^  workers: 1$/  workers: 1\n  max_connections: 15000/" >"$WORK/y.yaml"
NGINX_CONNECTIONS=16000 nginx_proxy_conf "$WORK" "$P_NGINX" "$P_ORIGIN" "$NGINX_TUNED" "worker_cpu_affinity 1; worker_rlimit_nofile 20000;" >"$WORK/nginx.conf"
taskset -c 1 nginx -c "$WORK/origin.conf" &
PIDS+=($!)
sleep 0.5

run() { # name port clients
  local out
  out=$(taskset -c 1 wrk -t1 -c"$3" -d"${DURATION}s" --timeout 10s --latency "http://127.0.0.1:$2/data/obj-1k" 2>&1)
  local rps p50 p99 max errs
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  max=$(echo "$out" | awk '/Latency/ && !/Distribution/ {print $4}')
  errs=$(echo "$out" | awk '/Socket errors|Non-2xx/ {printf "%s ", $0}')
  echo "| $1 | $3 | $rps | $p50 | $p99 | $max | ${errs:-none} |"
}

echo "| proxy | clients | req/s | p50 | p99 | max | errors |"
echo "|---|---|---|---|---|---|---|"
for n in $CLIENTS; do
  taskset -c 0 "$BIN" --config "$WORK/y.yaml" 2>"$WORK/logs/y.log" &
  pid=$!
  sleep 0.5
  run yatagarasu "$P_YATA" "$n"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  taskset -c 0 nginx -c "$WORK/nginx.conf" &
  pid=$!
  sleep 0.5
  run nginx "$P_NGINX" "$n"
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
