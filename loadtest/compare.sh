#!/usr/bin/env bash
# Side-by-side load test on one machine (see loadtest/README.md):
#   origin  nginx serving files as /<bucket>/<key> (ignores signatures): the limit
#   yatagarasu, nginx, haproxy, bare-forwarder: proxies to that origin,
#   one worker each, keep-alive to the origin and from the client.
# Every target is driven by the same wrk settings, in alternating order, and
# measured for requests/s, MiB/s, p50/p99/p99.9, errors, CPU seconds from
# /proc and peak RSS. Results: loadtest/results/{runs.csv,results.md,chart.png}.
#
#   bash loadtest/compare.sh               # full run (~10 min)
#   QUICK=1 bash loadtest/compare.sh       # one short round
#   SKIP_LOAD=1 bash loadtest/compare.sh   # keep runs.csv; redo idle + offered-load parts
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-2}
[ -n "${QUICK:-}" ] && DURATION=3 && ROUNDS=1
SIZES=${SIZES:-"1k 64k 1m 64m"}
WORK=$ROOT/loadtest/work
# shellcheck source=loadtest/origin.sh
source "$ROOT/loadtest/origin.sh"
OUT=$ROOT/loadtest/results
mkdir -p "$WORK" "$OUT"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need haproxy || ! need gnuplot; then
  echo "== installing wrk nginx haproxy gnuplot (apt)"
  apt-get update -qq && apt-get install -y -qq wrk nginx-light haproxy gnuplot-nox >/dev/null
fi
if ! need oha; then
  echo "== installing oha (latency at fixed offered load)"
  cargo install oha --locked --quiet || echo "oha unavailable: the offered-load part will be skipped"
fi
echo "== building release binaries"
cargo build --release --quiet --bin yatagarasu
cargo build --release --quiet --features loadtest --bin bare-forwarder
YATA=$ROOT/target/release/yatagarasu
BARE=$ROOT/target/release/bare-forwarder

P_ORIGIN=18000 P_YATA=18001 P_NGINX=18002 P_HAPROXY=18003 P_BARE=18004 P_YATA_SPLICE=18005 P_YATA2=18006

echo "== objects"
mkdir -p "$WORK/origin/data-bucket" "$WORK/logs"
for s in $SIZES; do
  f="$WORK/origin/data-bucket/obj-$s"
  case $s in 1k) n=1024;; 64k) n=65536;; 1m) n=1048576;; 64m) n=67108864;; esac
  [ -f "$f" ] && [ "$(stat -c %s "$f")" = "$n" ] || head -c "$n" /dev/urandom >"$f"
done

PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

cat >"$WORK/origin.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/origin.pid;
error_log $WORK/logs/origin-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 1000000; keepalive_timeout 120s;
  server { listen 127.0.0.1:$P_ORIGIN; root $WORK/origin; location /data/ { alias $WORK/origin/data-bucket/; } }
}
CONF
cat >"$WORK/nginx-proxy.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx-proxy.pid;
error_log $WORK/logs/nginx-error.log;
worker_rlimit_nofile 15000;
events { worker_connections 12000; }
http {
  access_log $WORK/logs/nginx-access.log combined buffer=64k flush=1s;
  keepalive_requests 1000000; keepalive_timeout 120s;
  upstream origin { server 127.0.0.1:$P_ORIGIN; keepalive 64; }
  server {
    listen 127.0.0.1:$P_NGINX;
    location /data/ {
      proxy_pass http://origin/data-bucket/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
haproxy_cfg "$P_HAPROXY" "$P_ORIGIN" >"$WORK/haproxy.cfg"
yata_conf() { # port workers zero_copy
  cat <<CONF
server:
  address: "127.0.0.1:$1"
  workers: $2
  zero_copy: "$3"
buckets:
  - name: "bench"
    path_prefix: "/data"
    s3:
      bucket: "data-bucket"
      region: "us-east-1"
      endpoint: "http://127.0.0.1:$P_ORIGIN"
      access_key: "bench"
      secret_key: "bench-secret"
metrics:
  port: $(( $1 + 1000 ))
logging:
  level: "info"
CONF
}
yata_conf $P_YATA 1 off >"$WORK/yata.yaml"
yata_conf $P_YATA_SPLICE 1 on >"$WORK/yata-splice.yaml"
yata_conf $P_YATA2 2 off >"$WORK/yata2.yaml"

start() { # name cmd...
  "${@:2}" >"$WORK/logs/$1.out" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  eval "PID_$1=$pid"
}
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 not up" >&2; exit 1; }

start origin nginx -c "$WORK/origin.conf"
wait_port $P_ORIGIN   # proxies' first health probes must find the origin up
start nginx nginx -c "$WORK/nginx-proxy.conf"
start haproxy haproxy -f "$WORK/haproxy.cfg"
start yatagarasu "$YATA" --config "$WORK/yata.yaml"
start yatagarasu2w "$YATA" --config "$WORK/yata2.yaml"
start splice "$YATA" --config "$WORK/yata-splice.yaml"
start bare "$BARE" 127.0.0.1:$P_BARE 127.0.0.1:$P_ORIGIN
for p in $P_ORIGIN $P_NGINX $P_HAPROXY $P_YATA $P_YATA2 $P_YATA_SPLICE $P_BARE; do wait_port $p; done
sleep 0.5

# All PIDs of a target (master + workers), for CPU and RSS.
pids_of() { local root=$1; echo "$root $(pgrep -P "$root" | tr '\n' ' ')"; }
cpu_ticks() { local t=0; for p in $(pids_of "$1"); do [ -r /proc/$p/stat ] && t=$(( t + $(awk '{print $14+$15}' /proc/$p/stat) )); done; echo $t; }
peak_rss_kib() { local m=0; for p in $(pids_of "$1"); do v=$(awk '/VmHWM/{print $2}' /proc/$p/status 2>/dev/null || echo 0); [ "${v:-0}" -gt $m ] && m=$v; done; echo $m; }
HZ=$(getconf CLK_TCK)

cat >"$WORK/report.lua" <<'LUA'
done = function(s, lat, req)
  local e = s.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d\n", s.requests, s.bytes, s.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    lat:percentile(50), lat:percentile(99), lat:percentile(99.9)))
end
LUA

port_of() { case $1 in origin) echo $P_ORIGIN;; yatagarasu) echo $P_YATA;; yatagarasu2w) echo $P_YATA2;; splice) echo $P_YATA_SPLICE;; nginx) echo $P_NGINX;; haproxy) echo $P_HAPROXY;; bare) echo $P_BARE;; esac; }
conns_for() { case $1 in 64m) echo 4;; 1m) echo 16;; *) echo 32;; esac; }

CSV=$OUT/runs.csv
if [ -n "${SKIP_LOAD:-}" ]; then SIZES=""; else
echo "size,target,round,requests,bytes,duration_us,errors,p50_us,p99_us,p999_us,cpu_s,peak_rss_kib" >"$CSV"
fi
TARGETS=${TARGETS:-"origin yatagarasu splice nginx haproxy bare yatagarasu2w"}
echo "== load: ${DURATION}s per run, $ROUNDS round(s), targets: $TARGETS"
for size in $SIZES; do
  for round in $(seq 1 "$ROUNDS"); do
    # Alternate the order every round so drift on a shared machine spreads evenly.
    order=$TARGETS
    [ $((round % 2)) -eq 0 ] && order=$(echo "$TARGETS" | tr ' ' '\n' | tac | tr '\n' ' ')
    for t in $order; do
      pid_var="PID_$t"; pid=${!pid_var}
      c0=$(cpu_ticks "$pid")
      res=$(wrk -t1 -c"$(conns_for "$size")" -d"${DURATION}s" --timeout 10s -s "$WORK/report.lua" \
        "http://127.0.0.1:$(port_of "$t")/data/obj-$size" | awk '/^RESULT/{print $2","$3","$4","$5","$6","$7","$8}')
      c1=$(cpu_ticks "$pid")
      cpu=$(awk -v a="$c0" -v b="$c1" -v hz="$HZ" 'BEGIN{printf "%.3f", (b-a)/hz}')
      echo "$size,$t,$round,$res,$cpu,$(peak_rss_kib "$pid")" | tee -a "$CSV"
    done
  done
done

echo "== idle connections: RSS with 10k idle keep-alive clients"
python3 "$ROOT/loadtest/idle_conns.py" 10000 "yatagarasu:$P_YATA:$PID_yatagarasu" "nginx:$P_NGINX:$PID_nginx" >"$OUT/idle.csv" || true
cat "$OUT/idle.csv" || true

if command -v oha >/dev/null 2>&1; then
  echo "== latency vs offered load (oha -q at 25/50/75% of peak, 1 KiB)"
  python3 "$ROOT/loadtest/offered_load.py" "$CSV" "yatagarasu:$P_YATA" "nginx:$P_NGINX" "haproxy:$P_HAPROXY" >"$OUT/offered.csv" || true
fi

python3 "$ROOT/loadtest/analyze.py" "$OUT"
echo "== done: $OUT/results.md"
