#!/usr/bin/env bash
# Memory per idle keep-alive client connection: yatagarasu (one worker) and
# nginx (one worker, tuned for proxying), 10k connections each, every one
# having made one 1 KiB request (loadtest/idle_conns.py). The file-descriptor
# limit is raised to the hard limit for the proxies and the client.
#
#   bash loadtest/idle.sh [yatagarasu binary] [connections]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/yatagarasu}
N=${2:-10000}
WORK=$(mktemp -d)
chmod 755 "$WORK"
P_ORIGIN=18400 P_YATA=18401 P_NGINX=18402
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
# shellcheck source=loadtest/origin.sh
source "$ROOT/loadtest/origin.sh"
make_objects "$WORK" 1k
origin_conf "$WORK" "$P_ORIGIN" >"$WORK/origin.conf"
yata_yaml "$P_YATA" "$P_ORIGIN" | sed "s/^  workers: 1$/  workers: 1\n  max_connections: 15000/" >"$WORK/y.yaml"
cat >"$WORK/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 30000;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/logs/nginx-error.log;
events { worker_connections 25000; }
http {
  access_log off;
  keepalive_requests 1000000; keepalive_timeout 300s;
  proxy_buffer_size 64k; proxy_buffers 8 64k; proxy_busy_buffers_size 128k;
  upstream origin { server 127.0.0.1:$P_ORIGIN; keepalive 128; }
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
nginx -c "$WORK/origin.conf" &
PIDS+=($!)
"$BIN" --config "$WORK/y.yaml" 2>"$WORK/logs/y.log" &
YPID=$!
PIDS+=($YPID)
nginx -c "$WORK/nginx.conf" &
NPID=$!
PIDS+=($NPID)
sleep 1
python3 "$ROOT/loadtest/idle_conns.py" "$N" "yatagarasu:$P_YATA:$YPID" "nginx:$P_NGINX:$NPID"
