#!/usr/bin/env bash
# Where a request's CPU goes: yatagarasu pinned to core 0, wrk and the nginx
# file origin on core 1 (as peers.sh), one object size. Prints per request:
# syscalls, io_uring submissions and completions (kernel tracepoints), and
# the hottest symbols of a perf profile of the proxy (kernel and user).
#
#   bash loadtest/profile.sh [size: 1k|64k|1m] [binary]
#   CACHE=1 bash loadtest/profile.sh 1m      # cache hits (memory tier, warmed)
#   PEER=nginx bash loadtest/profile.sh 64k  # the same for nginx tuned for proxying
#
# Needs perf, wrk, nginx, nstat (iproute2) and bc.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${1:-64k}
BIN=${2:-$ROOT/target/release/yatagarasu}
SECS=${SECS:-5}
P_ORIGIN=18300 P_YATA=18301
# shellcheck source=loadtest/origin.sh
source "$ROOT/loadtest/origin.sh"
setup_work
make_objects "$WORK" "$SIZE"
origin_conf "$WORK" "$P_ORIGIN" >"$WORK/origin.conf"
EXTRA=""
if [ "${CACHE:-0}" = 1 ]; then
  EXTRA="cache:
  enabled: true
  memory:
    max_cache_size_mb: 256
    max_item_size_mb: 8
"
  origin_conf "$WORK" "$P_ORIGIN" 'add_header Cache-Control "max-age=86400";' >"$WORK/origin.conf"
fi
yata_yaml "$P_YATA" "$P_ORIGIN" "$EXTRA" >"$WORK/y.yaml"
taskset -c 1 nginx -c "$WORK/origin.conf" &
PIDS+=($!)
if [ "${PEER:-}" = nginx ]; then
  nginx_proxy_conf "$WORK" "$P_YATA" "$P_ORIGIN" "$NGINX_TUNED" >"$WORK/peer.conf"
  taskset -c 0 nginx -c "$WORK/peer.conf" &
else
  taskset -c 0 "$BIN" --config "$WORK/y.yaml" 2>"$WORK/logs/y.log" &
fi
PID=$!
PIDS+=($PID)
for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$P_YATA/data/obj-$SIZE" && break; sleep 0.1; done
if [ "${PEER:-}" = nginx ]; then
  PID=$(pgrep -P "$PID" | head -1) # the worker, not the master
fi
URL="http://127.0.0.1:$P_YATA/data/obj-$SIZE"
taskset -c 1 wrk -t1 -c32 -d1s "$URL" >/dev/null

# Counts per request: syscalls and io_uring operations of the proxy.
taskset -c 1 wrk -t1 -c32 -d"$((SECS + 2))s" "$URL" >"$WORK/wrk1.txt" &
WRK=$!
sleep 1
nstat -n
perf stat -x, -e raw_syscalls:sys_enter,io_uring:io_uring_submit_req,io_uring:io_uring_complete,context-switches \
  -p "$PID" -- sleep "$SECS" 2>"$WORK/stat.csv"
nstat >"$WORK/nstat.txt"
wait $WRK
RPS=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk1.txt")
echo "object $SIZE: $RPS req/s (wrk -t1 -c32, proxy on core 0)"
awk -F, -v rps="$RPS" -v secs="$SECS" '$1 ~ /^[0-9]+$/ { printf "  %-32s %8.2f per request\n", $3, $1 / (rps * secs) }' "$WORK/stat.csv"
# TCP segments on the whole machine (client <-> proxy <-> origin), per
# request: the kernel's packet work, the same for every proxy that sends
# the same segments.
awk -v n="$(echo "$RPS * $SECS" | bc)" '$1 == "TcpOutSegs" || $1 == "TcpExtTCPOrigDataSent" || $1 == "TcpExtTCPPureAcks" {
  printf "  %-32s %8.2f per request (whole machine)\n", $1, $2 / n }' "$WORK/nstat.txt"

# Where the CPU goes.
taskset -c 1 wrk -t1 -c32 -d"$((SECS + 2))s" "$URL" >/dev/null &
WRK=$!
sleep 1
perf record -q -F 1999 -g -o "$WORK/perf.data" -p "$PID" -- sleep "$SECS" 2>/dev/null
wait $WRK
echo
echo "top symbols (self time, % of the proxy's samples):"
perf report -i "$WORK/perf.data" --no-children --sort sym --stdio 2>/dev/null \
  | grep -E '^ +[0-9]+\.[0-9]+%' | head -25 || true
echo
echo "who calls memmove (user-space copies), by caller:"
perf report -i "$WORK/perf.data" --no-children -S __memmove_avx512_unaligned_erms -g caller,0.5,callee --stdio 2>/dev/null \
  | grep -oE '(yatagarasu|monoio|bytes)::[A-Za-z0-9_:<>]+' | sort | uniq -c | sort -rn | head -8 || true
echo
echo "user vs kernel:"
perf report -i "$WORK/perf.data" --no-children --sort dso --stdio 2>/dev/null \
  | grep -E '^ +[0-9]+\.[0-9]+%' | head -6 || true
