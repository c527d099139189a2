#!/usr/bin/env bash
# How well each cache shields the origin (issue #23): a fixed-seed CDN-like
# trace (log-normal sizes, median 32 KiB, up to 8 MiB; Zipf popularity)
# replayed identically through yatagarasu, nginx proxy_cache and Varnish,
# each cold at the start, in front of one nginx file origin whose own access
# log counts what reached it. Every body's length and CRC-32 is checked.
#
#   bash loadtest/zipf.sh                 # scaled down: 4,000 objects, 40,000 requests
#   OBJECTS=20000 REQUESTS=200000 MEM_MB=256 DISK_MEM_MB=64 DISK_MB=1024 \
#     bash loadtest/zipf.sh               # the issue's figures (a few GB of objects)
#   MODE=burst bash loadtest/zipf.sh      # N clients at once on one cold object
#
# replay mode, per Zipf alpha (ALPHAS, default "0.9 0.7"):
#   - memory only: yatagarasu's memory tier of MEM_MB, Varnish malloc of
#     MEM_MB, nginx proxy_cache with max_size MEM_MB on tmpfs (given room: its
#     cache manager enforces max_size only every 10 s, so the size it actually
#     held is reported, average and peak); and an exact LRU of MEM_MB
#     computed on the trace as the reference;
#   - memory plus disk: yatagarasu's memory tier of DISK_MEM_MB and a disk
#     tier of DISK_MB in $WORK (ext4 here), nginx with max_size DISK_MB in
#     $WORK, Varnish file storage of DISK_MB; then the same trace again
#     through the now warm yatagarasu, to compare its origin requests with
#     the cold start's; and the disk writes yatagarasu dropped.
#   - fleet (RUNS="fleet", or with the others): three yatagarasu instances
#     of MEM_MB memory each, the clients spread over them, without and
#     then with a shared Redis tier (a redis-server the script starts):
#     the origin requests of each.
#   Request and byte hit ratios are reported for the cold half (the first
#   half of the trace) and the warm half (the second), from the origin's log.
#   Footprint: peak resident memory of the cache's processes (VmHWM) and, for
#   disk caches, the bytes held on disk (sampled every 0.5 s: average, peak).
#
# burst mode: BURST_CLIENTS (default 200) connections opened first, then one
# GET each at once, on one cold object of BURST_MB (default 32) MiB served by
# an origin paced at 16 MiB/s per connection (nginx limit_rate). Rows:
# yatagarasu with the default item limit (8 MiB: too large to store, a
# pass-through fill), yatagarasu with slice_size_mb 4, nginx with
# proxy_cache_lock, Varnish. Each row: origin requests and bytes, clients
# complete and byte-exact, first-byte and completion times (median, last).
#
# TARGETS (default "yatagarasu nginx varnish") and RUNS (default "memory
# disk") pick rows. Needs nginx (nginx-light), varnish, python3 and a
# release build. Every
# process it starts is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
YATA=${YATA:-$ROOT/target/release/yatagarasu}
MODE=${MODE:-replay}
OBJECTS=${OBJECTS:-4000}
REQUESTS=${REQUESTS:-40000}
ALPHAS=${ALPHAS:-"0.9 0.7"}
CLIENTS=${CLIENTS:-32}
MEM_MB=${MEM_MB:-50}
DISK_MEM_MB=${DISK_MEM_MB:-12}
DISK_MB=${DISK_MB:-200}
SEED=${SEED:-23}
BURST_CLIENTS=${BURST_CLIENTS:-200}
BURST_MB=${BURST_MB:-32}
TARGETS=${TARGETS:-"yatagarasu nginx varnish"}
RUNS=${RUNS:-"memory disk"}
PY="python3 $ROOT/loadtest/zipf.py"
P_ORIGIN=18300 P_SLOW=18301 P_CACHE=18302 P_METRICS=18303

# shellcheck source=loadtest/origin.sh
source "$(dirname "$0")/origin.sh"
setup_work
mkdir -p "$WORK/logs" "$WORK/origin"
SHM=/dev/shm/yatagarasu-zipf-$$
cleanup_all() {
  stop_cache
  cleanup_work
  rm -rf "$SHM"
}
trap cleanup_all EXIT

# The origin: every request logged with the bytes it sent.
cat >"$WORK/origin.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/origin.pid;
error_log $WORK/logs/origin-error.log;
events { worker_connections 4096; }
http {
  log_format zipf '\$request_uri \$status \$body_bytes_sent';
  access_log $WORK/logs/origin.log zipf;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 1000000; keepalive_timeout 120s;
  server { listen 127.0.0.1:$P_ORIGIN; root $WORK/origin; }
  server { listen 127.0.0.1:$P_SLOW; root $WORK/origin; limit_rate 16m; }
}
CONF

CACHE_PIDS=()
stop_cache() {
  for p in "${CACHE_PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/varnish.pid" ] && kill "$(cat "$WORK/varnish.pid")" 2>/dev/null || true
  [ -f "$WORK/nginx-cache.pid" ] && kill "$(cat "$WORK/nginx-cache.pid")" 2>/dev/null || true
  for p in "${CACHE_PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  CACHE_PIDS=()
  rm -f "$WORK/varnish.pid" "$WORK/nginx-cache.pid"
}

# The process ids of the running cache (all of its processes).
cache_pids() {
  case $1 in
    yatagarasu*) echo "${CACHE_PIDS[@]}" ;;
    nginx*) local m; m=$(cat "$WORK/nginx-cache.pid" 2>/dev/null || true); [ -n "$m" ] && echo "$m" $(pgrep -P "$m") ;;
    varnish*) local m; m=$(cat "$WORK/varnish.pid" 2>/dev/null || true); [ -n "$m" ] && echo "$m" $(pgrep -P "$m") ;;
  esac
}
hwm_mb() { # peak resident memory of the cache's processes, MiB
  local t=0 p
  for p in $(cache_pids "$1"); do t=$((t + $(awk '/^VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0))); done
  echo $((t / 1024))
}

wait_port() {
  local i
  for i in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  exit 1
}

# start_cache <kind> <memory MiB> <disk MiB or 0> [yatagarasu cache lines]
start_cache() {
  local kind=$1 mem=$2 disk=$3 extra=${4:-}
  rm -rf "$WORK/cache" "$SHM" "$WORK/varnish"
  mkdir -p "$WORK/cache" "$SHM"
  case $kind in
    yatagarasu*)
      local disk_yaml=""
      if [ "$disk" != 0 ]; then
        disk_yaml="  cache_layers: [\"memory\", \"disk\"]
  disk:
    enabled: true
    cache_dir: \"$WORK/cache\"
    max_disk_cache_size_mb: $disk
"
      fi
      cat >"$WORK/yata.yaml" <<CONF
server:
  address: "127.0.0.1:$P_CACHE"
  workers: 1
cache:
  enabled: true
  memory:
    max_cache_size_mb: $mem
    max_item_size_mb: 8
    default_ttl_seconds: 86400
$disk_yaml$extra
buckets:
  - name: "bench"
    path_prefix: "/data"
    s3:
      bucket: "data-bucket"
      endpoint: "http://127.0.0.1:${ORIGIN_PORT:-$P_ORIGIN}"
      access_key: "bench"
      secret_key: "bench-secret"
      timeout: 300
      health_check:
        enabled: false
metrics:
  enabled: true
  port: $P_METRICS
logging:
  level: "warn"
CONF
      "$YATA" --config "$WORK/yata.yaml" 2>>"$WORK/logs/yata.log" &
      CACHE_PIDS+=($!)
      ;;
    nginx*)
      local dir=$SHM max=$mem
      if [ "$disk" != 0 ]; then dir=$WORK/cache max=$disk; fi
      cat >"$WORK/nginx-cache.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx-cache.pid;
error_log $WORK/logs/nginx-cache-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on; tcp_nodelay on;
  keepalive_requests 1000000; keepalive_timeout 120s;
  proxy_cache_path $dir levels=1:2 keys_zone=c:64m max_size=${max}m inactive=1d use_temp_path=off;
  upstream origin { server 127.0.0.1:${ORIGIN_PORT:-$P_ORIGIN}; keepalive 64; }
  server {
    listen 127.0.0.1:$P_CACHE backlog=4096;
    location /data/ {
      proxy_pass http://origin/data-bucket/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache c;
      proxy_cache_valid 200 1d;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 300s;
      proxy_cache_lock_age 300s;
      proxy_read_timeout 300s;
      proxy_buffer_size 64k; proxy_buffers 8 64k; proxy_busy_buffers_size 128k;
    }
  }
}
CONF
      nginx -c "$WORK/nginx-cache.conf" -p "$WORK" &
      CACHE_PIDS+=($!)
      ;;
    varnish*)
      local storage="malloc,${mem}m"
      [ "$disk" != 0 ] && storage="file,$WORK/cache/varnish.bin,${disk}m"
      cat >"$WORK/default.vcl" <<VCL
vcl 4.1;
backend origin {
  .host = "127.0.0.1"; .port = "${ORIGIN_PORT:-$P_ORIGIN}";
  .first_byte_timeout = 300s; .between_bytes_timeout = 300s;
}
sub vcl_recv { set req.url = regsub(req.url, "^/data/", "/data-bucket/"); return (hash); }
sub vcl_backend_response { set beresp.ttl = 1d; }
VCL
      # nuke_limit and lru_interval: without them Varnish cuts large
      # bodies short when it must evict many objects to store one.
      varnishd -a "127.0.0.1:$P_CACHE" -f "$WORK/default.vcl" -s "$storage" \
        -p nuke_limit=1000 -p lru_interval=0 -p thread_pools=1 \
        -n "$WORK/varnish" -P "$WORK/varnish.pid" -F >"$WORK/logs/varnish.log" 2>&1 &
      CACHE_PIDS+=($!)
      ;;
  esac
  wait_port "$P_CACHE"
}

# Bytes on disk under the cache's directory, sampled every 0.5 s (and at
# the end) into
# $WORK/footprint while the file $WORK/sampling exists.
sample_disk() {
  local dir=$1
  : >"$WORK/footprint"
  touch "$WORK/sampling"
  (while [ -f "$WORK/sampling" ]; do du -s -B1 "$dir" 2>/dev/null | awk '{print $1}' >>"$WORK/footprint"; sleep 0.5; done) &
  SAMPLER=$!
}
stop_sampling() {
  rm -f "$WORK/sampling"
  wait "$SAMPLER" 2>/dev/null || true
  du -s -B1 "$1" 2>/dev/null | awk '{print $1}' >>"$WORK/footprint"
  awk '{s += $1; if ($1 > m) m = $1} END {if (NR) printf "%.0f/%.0f", s / NR / 1048576, m / 1048576; else printf "-"}' "$WORK/footprint"
}

origin_count() { $PY origin "$WORK/logs/origin.log"; }
metric() { curl -sf "http://127.0.0.1:$P_METRICS/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

# replay_run <label> <kind> <mem> <disk> <trace> -> one markdown row
replay_run() {
  local label=$1 kind=$2 mem=$3 disk=$4 tr=$5
  local half=$((REQUESTS / 2))
  start_cache "$kind" "$mem" "$disk"
  local dir=$WORK/cache
  [ "$disk" = 0 ] && [ "${kind%%-*}" = nginx ] && dir=$SHM
  sample_disk "$dir"
  : >"$WORK/logs/origin.log"
  local a b o1 o2
  a=$($PY replay "$P_CACHE" data "$WORK/origin/data-bucket/manifest.tsv" "$tr" 0 "$half" "$CLIENTS")
  o1=$(origin_count)
  : >"$WORK/logs/origin.log"
  b=$($PY replay "$P_CACHE" data "$WORK/origin/data-bucket/manifest.tsv" "$tr" "$half" "$REQUESTS" "$CLIENTS")
  o2=$(origin_count)
  local held; held=$(stop_sampling "$dir")
  local row
  row=$(echo "$a $b $o1 $o2" | awk '{
    rh1 = 1 - $7 / $1; bh1 = 1 - $8 / $2; rh2 = 1 - $9 / $4; bh2 = 1 - $10 / $5;
    printf "%.3f | %.3f | %.3f | %.3f | %d | %.0f | %d", rh1, bh1, rh2, bh2, $7 + $9, ($8 + $10) / 1048576, $3 + $6 }')
  local extra="-"
  if [ "${kind%%-*}" = yatagarasu ] && [ "$disk" != 0 ]; then
    local dropped; dropped=$(metric yatagarasu_cache_disk_writes_dropped_total)
    local held_disk; held_disk=$(metric 'yatagarasu_cache_bytes{layer="disk"}' | awk '{printf "%.0f", $1 / 1048576}')
    # The same trace again, warm: its second half's origin requests are
    # the steady rate the cold start is compared with.
    : >"$WORK/logs/origin.log"
    $PY replay "$P_CACHE" data "$WORK/origin/data-bucket/manifest.tsv" "$tr" 0 "$half" "$CLIENTS" >/dev/null
    : >"$WORK/logs/origin.log"
    $PY replay "$P_CACHE" data "$WORK/origin/data-bucket/manifest.tsv" "$tr" "$half" "$REQUESTS" "$CLIENTS" >/dev/null
    local warm; warm=$(origin_count | awk '{print $1}')
    extra="dropped writes ${dropped:-?}; disk tier held ${held_disk:-?} MiB at the end of the cold run; warm replay's second half: $warm origin requests (cold: $(echo "$o2" | awk '{print $1}'))"
  fi
  echo "| $label | $row | $(hwm_mb "$kind") | $held | $extra |"
  stop_cache
}

# fleet_run <shared: yes|no> <trace> -> one markdown row: three instances
# (ports P_FLEET..+2), with or without a Redis tier they share.
P_FLEET=18310 P_REDIS=18320
fleet_run() {
  local shared=$1 tr=$2 ports="" i redis_pid=""
  if [ "$shared" = yes ]; then
    redis-server --port "$P_REDIS" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
      >"$WORK/logs/redis.log" 2>&1 &
    redis_pid=$!
    PIDS+=("$redis_pid")
    wait_port "$P_REDIS"
  fi
  for i in 0 1 2; do
    local port=$((P_FLEET + i)) layers='["memory"]' redis=""
    if [ "$shared" = yes ]; then
      layers='["memory", "redis"]'
      redis="  redis:
    enabled: true
    redis_url: \"redis://127.0.0.1:$P_REDIS\"
    redis_ttl_seconds: 86400
"
    fi
    yata_yaml "$port" "$P_ORIGIN" "cache:
  enabled: true
  cache_layers: $layers
  memory:
    max_cache_size_mb: $MEM_MB
    max_item_size_mb: 8
    default_ttl_seconds: 86400
$redis" >"$WORK/fleet-$i.yaml"
    "$YATA" --config "$WORK/fleet-$i.yaml" 2>>"$WORK/logs/fleet.log" &
    CACHE_PIDS+=($!)
    wait_port "$port"
    ports="$ports${ports:+,}$port"
  done
  : >"$WORK/logs/origin.log"
  local r o
  r=$($PY replay "$ports" data "$WORK/origin/data-bucket/manifest.tsv" "$tr" 0 "$REQUESTS" "$CLIENTS")
  o=$(origin_count)
  local label="3 x yatagarasu, memory $MEM_MB MiB each"
  [ "$shared" = yes ] && label="$label, one Redis shared"
  echo "$r $o" | awk -v l="$label" '{printf "| %s | whole trace: %.3f | %.3f | | | %d | %.0f | %d | | | |\n", l, 1 - $4 / $1, 1 - $5 / $2, $4, $5 / 1048576, $3}'
  stop_cache
  if [ -n "$redis_pid" ]; then kill "$redis_pid"; wait "$redis_pid" 2>/dev/null || true; fi
}

spawn_on() { exec "${@:2}"; }
nginx -c "$WORK/origin.conf" -p "$WORK" &
PIDS+=($!)
wait_port "$P_ORIGIN"

if [ "$MODE" = burst ]; then
  head -c $((BURST_MB << 20)) /dev/urandom >"$WORK/burst"
  LEN=$((BURST_MB << 20))
  CRC=$(python3 -c 'import sys, zlib; print(zlib.crc32(open(sys.argv[1], "rb").read()))' "$WORK/burst")
  mkdir -p "$WORK/origin/data-bucket"
  echo "Burst: $BURST_CLIENTS clients at once on one cold $BURST_MB MiB object, origin paced at 16 MiB/s per connection."
  echo
  echo "| cache | origin requests | origin MiB | complete, byte-exact | first byte median / last (ms) | done median / last (ms) |"
  echo "|---|---|---|---|---|---|"
  ORIGIN_PORT=$P_SLOW
  for target in $TARGETS; do
    kinds=$target
    [ "$target" = yatagarasu ] && kinds="yatagarasu yatagarasu-slices"
    for kind in $kinds; do
      name="burst-$kind"
      cp "$WORK/burst" "$WORK/origin/data-bucket/$name"
      extra=""
      [ "$kind" = yatagarasu-slices ] && extra="  slice_size_mb: 4"
      start_cache "$kind" 256 0 "$extra"
      : >"$WORK/logs/origin.log"
      out=$($PY burst "$P_CACHE" "/data/$name" "$LEN" "$CRC" "$BURST_CLIENTS")
      o=$(grep -c "$name" "$WORK/logs/origin.log" || true)
      ob=$(awk -v n="$name" 'index($1, n) {s += $3} END {printf "%.0f", s / 1048576}' "$WORK/logs/origin.log")
      echo "$out" | awk -v k="$kind" -v o="$o" -v ob="$ob" '{printf "| %s | %s | %s | %s of %s | %s / %s | %s / %s |\n", k, o, ob, $4, $2, $7, $9, $12, $14}'
      stop_cache
    done
  done
  exit 0
fi

echo "== objects: $OBJECTS (seed $SEED), trace: $REQUESTS requests, $CLIENTS clients" >&2
$PY objects "$WORK/origin/data-bucket" "$OBJECTS" "$SEED"
echo "objects: $OBJECTS, $(du -sm "$WORK/origin/data-bucket" | cut -f1) MiB; requests: $REQUESTS; clients: $CLIENTS"
for alpha in $ALPHAS; do
  tr=$WORK/trace-$alpha
  $PY trace "$OBJECTS" "$REQUESTS" "$alpha" "$SEED" >"$tr"
  echo
  echo "### Zipf alpha $alpha"
  echo
  echo "| cache | cold half: request hits | byte hits | warm half: request hits | byte hits | origin requests | origin MiB | errors | peak RSS MiB | on disk avg/peak MiB | |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  if [[ " $RUNS " == *" memory "* ]]; then
    echo "| exact LRU of $MEM_MB MiB (whole trace) | $($PY lru "$WORK/origin/data-bucket/manifest.tsv" "$tr" $((MEM_MB << 20)) | awk '{print $1 " | " $2}') | | | | | | | | |"
    for t in $TARGETS; do
      replay_run "$t, memory $MEM_MB MiB" "$t" "$MEM_MB" 0 "$tr"
    done
  fi
  if [[ " $RUNS " == *" fleet "* ]]; then
    for shared in no yes; do
      fleet_run "$shared" "$tr"
    done
  fi
  if [[ " $RUNS " == *" disk "* ]]; then
    echo "| exact LRU of $DISK_MB MiB (whole trace) | $($PY lru "$WORK/origin/data-bucket/manifest.tsv" "$tr" $((DISK_MB << 20)) | awk '{print $1 " | " $2}') | | | | | | | | |"
    for t in $TARGETS; do
      replay_run "$t, memory $DISK_MEM_MB + disk $DISK_MB MiB" "$t-disk" "$DISK_MEM_MB" "$DISK_MB" "$tr"
    done
  fi
done
