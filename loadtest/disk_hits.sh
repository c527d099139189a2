#!/usr/bin/env bash
# Disk-tier hits against memory-tier hits (issue #10): 64 objects of 64 KiB
# requested in turn (a wrk Lua script rotates the path), page cache warm.
#   memory: a memory tier that holds them all: every request a memory hit;
#   disk:   a 1 MiB memory tier (room for about 15 of them) over the disk
#           tier: most requests read the entry from disk (checked, promoted).
# yatagarasu pinned to core 0, wrk and the origin to core 1; CPU per request
# from /proc; medians of ROUNDS.
#
#   bash loadtest/disk_hits.sh [binary]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/yatagarasu}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
N=64
P_ORIGIN=18600 P_YATA=18601
# shellcheck source=loadtest/origin.sh
source "$ROOT/loadtest/origin.sh"
setup_work
make_objects "$WORK" 64k
for i in $(seq 0 $((N - 1))); do cp "$WORK/origin/data-bucket/obj-64k" "$WORK/origin/data-bucket/o$i"; done
origin_conf "$WORK" "$P_ORIGIN" >"$WORK/origin.conf"
cat >"$WORK/rotate.lua" <<LUA
local i = 0
request = function()
  i = (i + 1) % $N
  return wrk.format("GET", "/data/o" .. i)
end
LUA
yata_yaml "$P_YATA" "$P_ORIGIN" "cache:
  enabled: true
  memory:
    max_cache_size_mb: 256
" >"$WORK/memory.yaml"
yata_yaml "$P_YATA" "$P_ORIGIN" "cache:
  enabled: true
  cache_layers: [\"memory\", \"disk\"]
  memory:
    max_cache_size_mb: 1
    max_item_size_mb: 1
  disk:
    enabled: true
    cache_dir: \"$WORK/disk-cache\"
" >"$WORK/disk.yaml"
taskset -c 1 nginx -c "$WORK/origin.conf" &
PIDS+=($!)
sleep 0.5
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run_one() { # config -> "rps us_per_req"
  taskset -c 0 "$BIN" --config "$WORK/$1.yaml" 2>"$WORK/logs/$1.log" &
  local pid=$!
  for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$P_YATA/data/o0" && break; sleep 0.1; done
  # Warm: every object fetched once (and written to disk), then a short run.
  for i in $(seq 0 $((N - 1))); do curl -sf -o /dev/null "http://127.0.0.1:$P_YATA/data/o$i"; done
  sleep 1
  taskset -c 1 wrk -t1 -c32 -d1s -s "$WORK/rotate.lua" "http://127.0.0.1:$P_YATA" >/dev/null
  local t0 out t1
  t0=$(cpu_ticks "$pid")
  out=$(taskset -c 1 wrk -t1 -c32 -d"${DURATION}s" -s "$WORK/rotate.lua" "http://127.0.0.1:$P_YATA")
  t1=$(cpu_ticks "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  if echo "$out" | grep -q "Non-2xx"; then echo "$1: errors" >&2; echo "$out" >&2; fi
  rate "$out" $((t1 - t0)) "$DURATION"
}
: >"$WORK/r-memory"; : >"$WORK/r-disk"
for r in $(seq "$ROUNDS"); do
  run_one memory >>"$WORK/r-memory"
  rm -rf "$WORK/disk-cache"
  run_one disk >>"$WORK/r-disk"
done
echo "| tier | req/s | CPU us/req |"
echo "|---|---|---|"
for t in memory disk; do
  echo "| $t | $(cut -d' ' -f1 "$WORK/r-$t" | median) | $(cut -d' ' -f2 "$WORK/r-$t" | median) |"
done
