#!/usr/bin/env bash
# The Redis tier's cost (issue #25): a Redis-tier hit through yatagarasu
# against the same GET made by redis-benchmark in the same run, and CPU per
# request for a Redis-tier hit against a memory-tier hit and an S3 miss.
#
#   bash loadtest/redis.sh                 # 1 KiB, 64 KiB, 1 MiB
#   SIZES="64k" DURATION=3 bash loadtest/redis.sh
#   CHUNK_KB=64 bash loadtest/redis.sh     # objects above 64 KiB stored (and streamed) as chunks
#   POOL=8 bash loadtest/redis.sh          # cache.redis.max_pool_size (default here 32, one per client)
#   PROFILE=/tmp/p bash loadtest/redis.sh  # perf profile of the Redis-tier run: /tmp/p.1k, ...
#
# Layout: yatagarasu (one worker) pinned to core 0; wrk, redis-server,
# redis-benchmark and the nginx file origin on core 1 (PIN=0: unpinned).
# Redis-tier hits: the proxy's memory tier is 1 MiB and wrk cycles over
# COPIES distinct objects of the size (a wrk Lua script), far more than
# memory holds, so nearly every request is a memory miss answered from
# Redis; the share that was is printed (from yatagarasu_cache_redis_hits_total).
# redis-benchmark: GET of a value of the same size, 32 clients, no
# pipelining, over as many distinct values (-r) as wrk cycles over.
# Latency mean, p50 and p99 of both (wrk --latency; redis-benchmark
# --csv). CPU per request is the proxy's utime+stime from /proc; the
# Redis-tier proxy's resident memory (VmRSS) is read as its run ends.
# Core 1's busy time per request (/proc/stat) and Redis's part of it are
# printed for both runs: that core is the saturated one, so the client's
# cost there (wrk or redis-benchmark) is part of what the latency shows.
#
# Needs wrk, nginx, redis-server, redis-tools and a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
YATA=${YATA:-$ROOT/target/release/yatagarasu}
SIZES=${SIZES:-"1k 64k 1m"}
DURATION=${DURATION:-5}
CHUNK_KB=${CHUNK_KB:-1024}
POOL=${POOL:-32}
PIN=${PIN:-1}
P_ORIGIN=18400 P_YATA=18401 P_METRICS=18402 P_REDIS=18403
on_core() { if [ "$PIN" = 1 ]; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }
# In the background, so that $! is the server itself (stopped by PID).
spawn_on() { if [ "$PIN" = 1 ]; then exec taskset -c "$1" "${@:2}"; else exec "${@:2}"; fi; }

# shellcheck source=loadtest/origin.sh
source "$ROOT/loadtest/origin.sh"
setup_work
mkdir -p "$WORK/logs" "$WORK/origin/data-bucket"
origin_conf "$WORK" "$P_ORIGIN" 'add_header Cache-Control "max-age=86400";' >"$WORK/origin.conf"
copies() { case $1 in 1k) echo 4000;; 64k) echo 300;; 1m) echo 40;; esac; }
bytes() { case $1 in 1k) echo 1024;; 64k) echo 65536;; 1m) echo 1048576;; esac; }
for s in $SIZES; do
  head -c "$(bytes "$s")" /dev/urandom >"$WORK/origin/data-bucket/obj-$s"
  for i in $(seq 0 $(($(copies "$s") - 1))); do
    ln "$WORK/origin/data-bucket/obj-$s" "$WORK/origin/data-bucket/obj-$s-$i"
  done
done

spawn_on 1 nginx -c "$WORK/origin.conf" -p "$WORK" &
PIDS+=($!)
spawn_on 1 redis-server --port "$P_REDIS" --bind 127.0.0.1 --save "" --appendonly no \
  --maxmemory 1gb --dir "$WORK" >"$WORK/logs/redis.log" 2>&1 &
REDIS=$!
PIDS+=("$REDIS")
for _ in $(seq 100); do redis-cli -p "$P_REDIS" ping >/dev/null 2>&1 && break; sleep 0.1; done

# start_proxy <layers yaml> <memory MiB>; sets PROXY
start_proxy() {
  yata_yaml "$P_YATA" "$P_ORIGIN" "cache:
  enabled: true
$1
  memory:
    max_cache_size_mb: $2
    max_item_size_mb: 1
  redis:
    enabled: true
    redis_url: \"redis://127.0.0.1:$P_REDIS\"
    redis_ttl_seconds: 3600
    max_pool_size: $POOL
    chunk_size_kb: $CHUNK_KB
" "$P_METRICS" >"$WORK/yata.yaml"
  spawn_on 0 "$YATA" --config "$WORK/yata.yaml" 2>>"$WORK/logs/yata.log" &
  PROXY=$!
  PIDS+=("$PROXY")
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$P_METRICS/metrics" && return; sleep 0.1; done
  echo "the proxy did not start" >&2; cat "$WORK/logs/yata.log" >&2; exit 1
}
stop_proxy() { kill "$PROXY"; wait "$PROXY" 2>/dev/null || true; }
ticks() { awk '{print $14 + $15}' "/proc/${1:-$PROXY}/stat"; }
# Busy ticks of core 1 (user, nice, system, irq, softirq), where Redis and
# the client run: with 32 clients that core is the saturated one, so its
# time per request, Redis's share and the client's, is what sets latency.
core1_ticks() { awk '$1 == "cpu1" {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
# per_req <ticks> <requests>: microseconds per request.
per_req() { awk -v t="$1" -v r="$2" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", (t / hz) * 1e6 / r}'; }
rss_mib() { awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$PROXY/status"; }
metric() { curl -sf "http://127.0.0.1:$P_METRICS/metrics" | awk -v m="$1" '$1 == m {s += $2} END {print s + 0}'; }
requests_of() { echo "$1" | awk '/requests in/ {print $1}'; }
# "mean_ms p50_ms p99_ms" from wrk --latency output.
wrk_latency() {
  echo "$1" | awk 'function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    $1 == "Latency" && !mean {mean = ms($2)} $1 == "50%" {p50 = ms($2)} $1 == "99%" {p99 = ms($2)} END {printf "%.3f %.3f %.3f", mean, p50, p99}'
}

# wrk against the proxy; a Lua script cycles over n copies when n > 0.
# Prints "requests cpu_us_per_request mean p50 p99 core1_us redis_us", the
# last two per request: core 1's busy time and Redis's share of it.
# A third argument names the perf profile taken of the run (PROFILE).
measure() {
  local path=$1 n=$2 script=()
  if [ "$n" -gt 0 ]; then
    cat >"$WORK/cycle.lua" <<LUA
local i = 0
request = function()
  i = (i + 1) % $n
  return wrk.format("GET", "$path-" .. i)
end
LUA
    script=(-s "$WORK/cycle.lua")
  fi
  on_core 1 wrk -t1 -c32 -d1s "${script[@]}" "http://127.0.0.1:$P_YATA$path" >/dev/null
  local t0 t1 c0 c1 r0 r1 out reqs
  t0=$(ticks) c0=$(core1_ticks) r0=$(ticks "$REDIS")
  if [ -n "${PROFILE:-}" ] && [ -n "${3:-}" ]; then
    perf record -q -F 2999 -g -p "$PROXY" -o "$PROFILE.$3" -- sleep "$((DURATION - 1))" 2>/dev/null &
  fi
  out=$(on_core 1 wrk -t1 -c32 -d"${DURATION}s" --latency "${script[@]}" "http://127.0.0.1:$P_YATA$path")
  t1=$(ticks) c1=$(core1_ticks) r1=$(ticks "$REDIS")
  if echo "$out" | grep -q "Non-2xx"; then echo "errors on $path:" >&2; echo "$out" >&2; exit 1; fi
  reqs=$(requests_of "$out")
  echo "$reqs $(per_req $((t1 - t0)) "$reqs") $(wrk_latency "$out") $(per_req $((c1 - c0)) "$reqs") $(per_req $((r1 - r0)) "$reqs")"
}

echo "machine: $(nproc) cores; proxy on core 0, wrk, Redis and the origin on core 1; wrk -t1 -c32 ${DURATION}s; chunks of ${CHUNK_KB} KiB"
echo
echo "| object | Redis-tier hit mean / p50 / p99 ms | memory-tier hit, same copies (share from memory) | added by the Redis tier (x Redis's) | redis-benchmark GET mean / p50 / p99 ms | share answered from Redis | CPU us/req: Redis-tier hit | memory-tier hit | S3 miss (cache off) | RSS after Redis-tier hits, MiB | core 1 us/req (Redis's part): Redis-tier hit / redis-benchmark |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for s in $SIZES; do
  n=$(copies "$s")
  # Redis-tier hits: every copy stored in Redis first.
  redis-cli -p "$P_REDIS" flushall >/dev/null
  start_proxy '  cache_layers: ["memory", "redis"]' 1
  for i in $(seq 0 $((n - 1))); do curl -sf -o /dev/null "http://127.0.0.1:$P_YATA/data/obj-$s-$i"; done
  for _ in $(seq 100); do
    [ "$(redis-cli -p "$P_REDIS" dbsize)" -ge "$n" ] && break
    sleep 0.1
  done
  h0=$(metric yatagarasu_cache_redis_hits_total)
  r0=$(metric 'yatagarasu_requests_total{bucket="bench",method="GET",status="200"}')
  read -r reqs redis_cpu mean p50 p99 core1 redis_own < <(measure "/data/obj-$s" "$n" "$s")
  h1=$(metric yatagarasu_cache_redis_hits_total)
  r1=$(metric 'yatagarasu_requests_total{bucket="bench",method="GET",status="200"}')
  share=$(awk -v h=$((h1 - h0)) -v r=$((r1 - r0)) 'BEGIN {printf "%.2f", h / r}')
  rss=$(rss_mib)
  stop_proxy
  # Memory-tier hits: one object, warm (CPU); then the same copies as the
  # Redis-tier run, all held in memory (filled from Redis by measure's
  # warm-up run), for the latency a Redis-tier hit adds to a request.
  start_proxy '  cache_layers: ["memory", "redis"]' 256
  curl -sf -o /dev/null "http://127.0.0.1:$P_YATA/data/obj-$s"
  read -r _ mem_cpu _ < <(measure "/data/obj-$s" 0)
  m0=$(($(metric 'yatagarasu_cache_requests_total{bucket="bench",result="hit"}') - $(metric yatagarasu_cache_redis_hits_total)))
  r0=$(metric 'yatagarasu_requests_total{bucket="bench",method="GET",status="200"}')
  read -r _ _ mmean mp50 mp99 _ < <(measure "/data/obj-$s" "$n")
  m1=$(($(metric 'yatagarasu_cache_requests_total{bucket="bench",result="hit"}') - $(metric yatagarasu_cache_redis_hits_total)))
  r1=$(metric 'yatagarasu_requests_total{bucket="bench",method="GET",status="200"}')
  mshare=$(awk -v h=$((m1 - m0)) -v r=$((r1 - r0)) 'BEGIN {printf "%.2f", h / r}')
  stop_proxy
  # S3 misses: the cache off (every request goes to the origin).
  sed -i 's/^  enabled: true$/  enabled: false/' "$WORK/yata.yaml"
  spawn_on 0 "$YATA" --config "$WORK/yata.yaml" 2>>"$WORK/logs/yata.log" &
  PROXY=$!
  PIDS+=("$PROXY")
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$P_YATA/data/obj-$s" && break; sleep 0.1; done
  read -r _ miss_cpu _ < <(measure "/data/obj-$s" 0)
  stop_proxy
  # Redis's own GET of the same size.
  # Over as many distinct values as the proxy's run read (-r): one value
  # read again and again stays in the CPU's caches, and Redis's own copy of
  # it into the reply is then several times cheaper (1 MiB: 155 against
  # 451 us per GET, INFO commandstats).
  on_core 1 redis-benchmark -p "$P_REDIS" -c 32 -r "$n" -n $((n * 20)) -d "$(bytes "$s")" -t set --csv >/dev/null 2>&1
  gets=50000; [ "$s" = 1m ] && gets=5000
  c0=$(core1_ticks) q0=$(ticks "$REDIS")
  rb=$(on_core 1 redis-benchmark -p "$P_REDIS" -c 32 -r "$n" -n "$gets" -d "$(bytes "$s")" -t get --csv 2>/dev/null | awk -F, '/^"GET"/ {gsub(/"/, ""); print $3, $5, $7}')
  c1=$(core1_ticks) q1=$(ticks "$REDIS")
  read -r rb_mean rb_p50 rb_p99 <<<"$rb"
  added=$(awk -v a="$mean $p50 $p99" -v b="$mmean $mp50 $mp99" -v r="$rb_mean $rb_p50 $rb_p99" 'BEGIN {
    split(a, x, " "); split(b, y, " "); split(r, z, " ")
    for (i = 1; i <= 3; i++) o = o sprintf("%s%.3f (%.2fx)", i > 1 ? " / " : "", x[i] - y[i], (x[i] - y[i]) / z[i]); print o }')
  echo "| $s | $mean / $p50 / $p99 | $mmean / $mp50 / $mp99 ($mshare) | $added | $rb_mean / $rb_p50 / $rb_p99 | $share | $redis_cpu | $mem_cpu | $miss_cpu | $rss | $core1 ($redis_own) / $(per_req $((c1 - c0)) "$gets") ($(per_req $((q1 - q0)) "$gets")) |"
done
