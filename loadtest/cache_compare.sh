#!/usr/bin/env bash
# Cache hits side by side (issue #10): yatagarasu's memory tier (hits sent
# by reference, and copied with server.zero_copy: off), nginx
# proxy_cache and Varnish, each in front of the same nginx file origin, one
# worker each, warmed, driven by the same wrk. Each cache is pinned to core 0,
# wrk and the origin to core 1 (PIN=0 runs unpinned). CPU per request is the
# cache's own utime+stime (all its processes) from /proc; the client's (wrk's)
# CPU per request and core 1's idle share show when the load tool's core,
# not the cache, sets the pace. TARGETS picks caches (default: all four).
#
#   bash loadtest/cache_compare.sh            # 1 KiB, 64 KiB, 1 MiB; 3 rounds of 5 s
#   SIZES="64k" ROUNDS=1 bash loadtest/cache_compare.sh
#
# Needs wrk, nginx and varnish (apt: wrk nginx-light varnish) and a release
# build (cargo build --release). Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
SIZES=${SIZES:-"1k 64k 1m"}
PIN=${PIN:-1}
YATA=${YATA:-$ROOT/target/release/yatagarasu}
WORK=$(mktemp -d)
chmod 755 "$WORK"
P_ORIGIN=18200 P_YATA=18201 P_NGINX=18202 P_VARNISH=18203 P_COPY=18204
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/varnish.pid" ] && kill "$(cat "$WORK/varnish.pid")" 2>/dev/null || true
  [ -f "$WORK/nginx-cache.pid" ] && kill "$(cat "$WORK/nginx-cache.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
on_core() { if [ "$PIN" = 1 ]; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }
# In the background, so that $! is the server itself (killed by PID on exit).
spawn_on() { if [ "$PIN" = 1 ]; then exec taskset -c "$1" "${@:2}"; else exec "${@:2}"; fi; }

# shellcheck source=loadtest/origin.sh
source "$(dirname "$0")/origin.sh"
make_objects "$WORK" $SIZES
mkdir -p "$WORK/nginx-cache"
origin_conf "$WORK" "$P_ORIGIN" 'add_header Cache-Control "max-age=86400";' >"$WORK/origin.conf"
# nginx proxy_cache, its best configuration here (see the issue): cache on
# tmpfs, sendfile off, output_buffers 2 256k.
CACHE_DIR=/dev/shm/yatagarasu-nginx-cache-$$
mkdir -p "$CACHE_DIR"
cat >"$WORK/nginx-cache.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx-cache.pid;
error_log $WORK/logs/nginx-cache-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile off;
  output_buffers 2 256k;
  tcp_nodelay on;
  keepalive_requests 1000000; keepalive_timeout 120s;
  proxy_cache_path $CACHE_DIR levels=1:2 keys_zone=c:16m max_size=1g inactive=1h use_temp_path=off;
  upstream origin { server 127.0.0.1:$P_ORIGIN; keepalive 64; }
  server {
    listen 127.0.0.1:$P_NGINX;
    location /data/ {
      proxy_pass http://origin/data-bucket/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache c;
      proxy_cache_valid 200 1h;
      proxy_cache_lock on;
    }
  }
}
CONF
# Varnish: malloc storage, one thread pool.
cat >"$WORK/default.vcl" <<VCL
vcl 4.1;
backend origin { .host = "127.0.0.1"; .port = "$P_ORIGIN"; }
sub vcl_recv { set req.url = regsub(req.url, "^/data/", "/data-bucket/"); return (hash); }
sub vcl_backend_response { set beresp.ttl = 1h; }
VCL
CACHE_YAML="cache:
  enabled: true
  memory:
    max_cache_size_mb: 256
    max_item_size_mb: 8
"
yata_yaml "$P_YATA" "$P_ORIGIN" "$CACHE_YAML" >"$WORK/yata.yaml"
# The same with hits copied into the socket (server.zero_copy: off), to
# show what sending by reference changes.
yata_yaml "$P_COPY" "$P_ORIGIN" "  zero_copy: off
$CACHE_YAML" >"$WORK/yata-copy.yaml"

spawn_on 1 nginx -c "$WORK/origin.conf" -p "$WORK" &
PIDS+=($!)
spawn_on 0 "$YATA" --config "$WORK/yata.yaml" 2>"$WORK/logs/yata.log" &
PIDS+=($!)
spawn_on 0 "$YATA" --config "$WORK/yata-copy.yaml" 2>"$WORK/logs/yata-copy.log" &
PIDS+=($!)
spawn_on 0 nginx -c "$WORK/nginx-cache.conf" -p "$WORK" &
PIDS+=($!)
spawn_on 0 varnishd -a "127.0.0.1:$P_VARNISH" -f "$WORK/default.vcl" -s malloc,256m \
  -p thread_pools=1 -n "$WORK/varnish" -P "$WORK/varnish.pid" -F >"$WORK/logs/varnish.log" 2>&1 &
PIDS+=($!)
sleep 2

# All processes of a cache, for CPU accounting.
pids_of() {
  case $1 in
    yatagarasu) pgrep -f "$WORK/yata.yaml" ;;
    copy) pgrep -f "$WORK/yata-copy.yaml" ;;
    nginx) m=$(cat "$WORK/nginx-cache.pid"); echo "$m" $(pgrep -P "$m") ;;
    varnish) pgrep -f "$WORK/varnish" ;;
  esac
}
port_of() { case $1 in yatagarasu) echo $P_YATA;; copy) echo $P_COPY;; nginx) echo $P_NGINX;; varnish) echo $P_VARNISH;; esac; }
ticks() { local t=0; for p in $(pids_of "$1"); do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo $t; }

run() { # target size -> "rps us_per_req"
  local url="http://127.0.0.1:$(port_of "$1")/data/obj-$2"
  curl -sf -m 5 -o /dev/null "$url" && curl -sf -m 5 -o /dev/null "$url" # warm
  on_core 1 timeout 20 wrk -t1 -c32 -d1s "$url" >/dev/null
  local t0; t0=$(ticks "$1")
  local c0; c0=$(core1)
  local out; out=$(on_core 1 timeout $((DURATION + 20)) /usr/bin/time -f "wrk-cpu %U %S" wrk -t1 -c32 -d"${DURATION}s" "$url" 2>&1)
  local t1; t1=$(ticks "$1")
  local c1; c1=$(core1)
  if echo "$out" | grep -q "Non-2xx"; then echo "$1 answered errors for $2" >&2; echo "$out" >&2; exit 1; fi
  # The client's own CPU per request (what each cache's way of sending
  # costs the receiver) and core 1's idle share, for the pinned layout.
  local reqs; reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$(rate "$out" $((t1 - t0)) "$DURATION") $(echo "$out" | awk -v r="$reqs" '/^wrk-cpu/ {printf "%.2f", ($2 + $3) * 1e6 / r}') $(echo "$c0 $c1" | awk '{printf "%.0f", 100 * ($4 - $2) / ($3 - $1)}')"
}
# core 1's "total idle" jiffies, from /proc/stat.
core1() { awk '/^cpu1 / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $5 + $6}' /proc/stat; }

TARGETS=${TARGETS:-"yatagarasu copy nginx varnish"}
label() { case $1 in yatagarasu) echo yatagarasu;; copy) echo "zero_copy off";; nginx) echo nginx;; varnish) echo Varnish;; esac; }
header="| object" rule="|---"
for what in "req/s" "CPU us/req" "client CPU us/req" "core 1 idle %"; do
  for t in $TARGETS; do header="$header | $(label "$t") $what"; rule="$rule|---"; done
done
echo "$header |"
echo "$rule|"
for s in $SIZES; do
  for t in $TARGETS; do : >"$WORK/r-$t"; done
  for _ in $(seq "$ROUNDS"); do
    for t in $TARGETS; do run "$t" "$s" >>"$WORK/r-$t"; done
  done
  row="| $s"
  for col in 1 2 3 4; do
    for t in $TARGETS; do row="$row | $(cut -d' ' -f$col "$WORK/r-$t" | median)"; done
  done
  echo "$row |"
done
rm -rf "$CACHE_DIR"
