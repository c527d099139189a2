#!/usr/bin/env bash
# Memory per idle keep-alive client connection: yatagarasu (one worker) and
# nginx (one worker, tuned for proxying), 10k connections each, every one
# having made one 1 KiB request (loadtest/idle_conns.py). The file-descriptor
# limit is raised to the hard limit for the proxies and the client.
# TLS=1: the clients connect over TLS 1.3 (an ECDSA P-256 certificate made
# here; nginx with a shared session cache and tickets), issue #28.
#
#   bash loadtest/idle.sh [yatagarasu binary] [connections]
#   TLS=1 bash loadtest/idle.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/yatagarasu}
N=${2:-10000}
P_ORIGIN=18400 P_YATA=18401 P_NGINX=18402
ulimit -n "$(ulimit -Hn)"
# shellcheck source=loadtest/origin.sh
source "$ROOT/loadtest/origin.sh"
setup_work
make_objects "$WORK" 1k
origin_conf "$WORK" "$P_ORIGIN" >"$WORK/origin.conf"
yata_yaml "$P_YATA" "$P_ORIGIN" | sed "s/^  workers: 1$/  workers: 1\n  max_connections: 15000/" >"$WORK/y.yaml"
NGINX_CONNECTIONS=25000 nginx_proxy_conf "$WORK" "$P_NGINX" "$P_ORIGIN" "$NGINX_TUNED" "worker_rlimit_nofile 30000;" >"$WORK/nginx.conf"
if [ "${TLS:-0}" = 1 ]; then
  T=$WORK/tls
  mkdir -p "$T"
  openssl req -x509 -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -keyout "$T/leaf.key" \
    -out "$T/leaf.pem" -days 2 -subj "/CN=127.0.0.1" -addext "subjectAltName=IP:127.0.0.1" 2>/dev/null
  chmod 644 "$T"/*
  sed -i "s|^  workers: 1$|  workers: 1\n  tls:\n    cert_file: \"$T/leaf.pem\"\n    key_file: \"$T/leaf.key\"|" "$WORK/y.yaml"
  sed -i "s|listen 127.0.0.1:$P_NGINX backlog=16384;|listen 127.0.0.1:$P_NGINX ssl backlog=16384; ssl_certificate $T/leaf.pem; ssl_certificate_key $T/leaf.key; ssl_session_cache shared:SSL:10m; ssl_session_tickets on; ssl_protocols TLSv1.2 TLSv1.3;|" "$WORK/nginx.conf"
  export IDLE_TLS=1
fi
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
