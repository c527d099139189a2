#!/usr/bin/env bash
# Issue #13's measurement: yatagarasu against nginx (default buffers and
# tuned for proxying) and HAProxy, one worker each, every proxy pinned to
# core 0 and wrk plus the nginx file origin pinned to core 1 (unpinned, the
# kernel's loopback work is charged to whichever process runs, and CPU per
# request moves by 30% between runs). wrk -t1 -c32; medians of ROUNDS
# rounds, the proxies alternating order each round. CPU per request is
# utime+stime of the proxy process (all its threads) from /proc over the
# measured run; requests/s is reported too, but with the proxy on its own
# core the load tool's core is the limit, so it cannot separate proxies.
#
#   bash loadtest/peers.sh [yatagarasu binary]   (default target/release/yatagarasu)
#
# Needs wrk, nginx, haproxy (apt: wrk nginx-light haproxy).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/yatagarasu}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
SIZES=${SIZES:-"1k 64k 1m"}
TARGETS=${TARGETS:-"yatagarasu nginx nginx_tuned haproxy"}
P_ORIGIN=18200 P_YATA=18201 P_NGINX=18202 P_TUNED=18203 P_HAPROXY=18204

# shellcheck source=loadtest/origin.sh
source "$ROOT/loadtest/origin.sh"
setup_work
make_objects "$WORK" $SIZES
origin_conf "$WORK" "$P_ORIGIN" >"$WORK/origin.conf"

yata_yaml "$P_YATA" "$P_ORIGIN" >"$WORK/yatagarasu.yaml"

nginx_proxy_conf "$WORK" "$P_NGINX" "$P_ORIGIN" "" "worker_cpu_affinity 1;" >"$WORK/nginx.conf"
nginx_proxy_conf "$WORK" "$P_TUNED" "$P_ORIGIN" "$NGINX_TUNED" "worker_cpu_affinity 1;" >"$WORK/nginx_tuned.conf"
haproxy_cfg "$P_HAPROXY" "$P_ORIGIN" "  cpu-map 1/1 0" >"$WORK/haproxy.cfg"

taskset -c 1 nginx -c "$WORK/origin.conf" &
PIDS+=($!)
sleep 0.5

# Starts target $1 pinned to core 0; prints "pid port".
start() {
  case $1 in
    yatagarasu) taskset -c 0 "$BIN" --config "$WORK/yatagarasu.yaml" 2>"$WORK/logs/yata.log" & echo "$! $P_YATA" ;;
    nginx) taskset -c 0 nginx -c "$WORK/nginx.conf" & echo "$! $P_NGINX" ;;
    nginx_tuned) taskset -c 0 nginx -c "$WORK/nginx_tuned.conf" & echo "$! $P_TUNED" ;;
    haproxy) taskset -c 0 haproxy -db -f "$WORK/haproxy.cfg" & echo "$! $P_HAPROXY" ;;
  esac
}

# CPU ticks of a process and its children (nginx master + worker).
cpu_ticks() {
  local total=0 p
  for p in $1 $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo $total
}

run_one() { # target size -> "rps us_per_req"
  local pid port
  read -r pid port < <(start "$1")
  for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$port/data/obj-$2" && break; sleep 0.1; done
  taskset -c 1 wrk -t1 -c32 -d1s "http://127.0.0.1:$port/data/obj-$2" >/dev/null
  local t0 out t1
  t0=$(cpu_ticks "$pid")
  out=$(taskset -c 1 wrk -t1 -c32 -d"${DURATION}s" "http://127.0.0.1:$port/data/obj-$2")
  t1=$(cpu_ticks "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  if echo "$out" | grep -q "Non-2xx\|Socket errors"; then
    echo "$1 errors on obj-$2:" >&2; echo "$out" >&2
  fi
  rate "$out" $((t1 - t0)) "$DURATION"
}


echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
echo "wrk -t1 -c32, ${DURATION}s, medians of $ROUNDS rounds; proxies on core 0, wrk and origin on core 1"
echo
header="| object |"; sep="|---|"
for t in $TARGETS; do header="$header $t req/s | $t CPU us/req |"; sep="$sep---|---|"; done
echo "$header yatagarasu CPU / best peer |"; echo "$sep---|"
for s in $SIZES; do
  for t in $TARGETS; do : >"$WORK/$t"; done
  for r in $(seq "$ROUNDS"); do
    order=$TARGETS
    [ $((r % 2)) = 0 ] && order=$(echo "$TARGETS" | tr ' ' '\n' | tac | xargs)
    for t in $order; do run_one "$t" "$s" >>"$WORK/$t"; done
  done
  row="| $s |"; best=""; mine=""
  for t in $TARGETS; do
    rps=$(cut -d' ' -f1 "$WORK/$t" | median); cpu=$(cut -d' ' -f2 "$WORK/$t" | median)
    row="$row $rps | $cpu |"
    if [ "$t" = yatagarasu ]; then mine=$cpu
    elif [ -z "$best" ] || awk -v a="$cpu" -v b="$best" 'BEGIN{exit !(a<b)}'; then best=$cpu; fi
  done
  ratio=$(awk -v a="$mine" -v b="$best" 'BEGIN { printf "%.2f", a / b }')
  echo "$row ${ratio}x |"
done
