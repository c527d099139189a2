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
# TLS (issue #28), MODE=
#   plain     plain HTTP on both sides (the default);
#   upstream  HTTPS to the origin (nginx, verified against the script's CA),
#             plain HTTP to clients;
#   both      HTTPS on both sides (wrk over TLS, kept-alive connections);
#   close     HTTPS on both sides, a new connection per request
#             (Connection: close). wrk keeps its TLS session across
#             reconnects (SSL_clear keeps it), so these are resumed
#             handshakes (TLS 1.3 PSK with a new X25519 exchange, no
#             certificate signature), as the proxy's
#             yatagarasu_tls_resumed_handshakes_total shows; full ones are
#             MODE=resume RESUME_HOW=new;
#   resume    HTTPS to clients only, `openssl s_time` for DURATION seconds
#             with -new (full handshakes; RESUME_HOW=new, the default) or
#             -reuse (resumed; RESUME_HOW=reuse); the columns are then
#             connections/s and CPU us per connection.
# TLS versions: nginx 1.22 (Debian 12) speaks only up to TLS 1.2 unless told
# (its ssl_protocols and proxy_ssl_protocols defaults lack TLSv1.3), so every
# nginx here is given "TLSv1.2 TLSv1.3" (HAProxy and yatagarasu offer both
# already): TLS 1.3 is what the clients and origins negotiate. ORIGIN_TLS=
# "TLSv1.2" keeps the origin at TLS 1.2 (an older S3-compatible endpoint)
# for every proxy alike; CLIENT_TLS likewise for the nginx peers' listeners.
# KEY=ecdsa (P-256, the default) or rsa (2048) picks the certificates the
# script makes: a CA and a leaf for 127.0.0.1. Every proxy verifies the
# origin's certificate and keeps resumption on; their configurations are
# printed with the results (SHOW_CONFIGS=1).
#
# A/B of two builds: BIN_B=path and the target yatagarasu_b in TARGETS (the
# same configuration; its CPU against the best peer is a last column).
#
# Needs wrk, nginx, haproxy, openssl (apt: wrk nginx-light haproxy openssl).
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

MODE=${MODE:-plain}
KEY=${KEY:-ecdsa}
yata_yaml "$P_YATA" "$P_ORIGIN" >"$WORK/yatagarasu.yaml"

nginx_proxy_conf "$WORK" "$P_NGINX" "$P_ORIGIN" "" "worker_cpu_affinity 1;" >"$WORK/nginx.conf"
nginx_proxy_conf "$WORK" "$P_TUNED" "$P_ORIGIN" "$NGINX_TUNED" "worker_cpu_affinity 1;" >"$WORK/nginx_tuned.conf"
haproxy_cfg "$P_HAPROXY" "$P_ORIGIN" "  cpu-map 1/1 0" >"$WORK/haproxy.cfg"

SCHEME=http
if [ "$MODE" != plain ]; then
  # A CA and a leaf for 127.0.0.1 (IP and CN), ECDSA P-256 or RSA 2048.
  T=$WORK/tls
  mkdir -p "$T"
  case $KEY in
    rsa) newkey=(-newkey rsa:2048) ;;
    *) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) ;;
  esac
  openssl req -x509 -nodes "${newkey[@]}" -keyout "$T/ca.key" -out "$T/ca.pem" -days 2 \
    -subj "/CN=yatagarasu bench CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign" 2>/dev/null
  openssl req -nodes "${newkey[@]}" -keyout "$T/leaf.key" -out "$T/leaf.csr" -subj "/CN=127.0.0.1" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >"$T/ext"
  openssl x509 -req -in "$T/leaf.csr" -CA "$T/ca.pem" -CAkey "$T/ca.key" -CAcreateserial \
    -out "$T/leaf.pem" -days 2 -extfile "$T/ext" 2>/dev/null
  cat "$T/leaf.pem" "$T/leaf.key" >"$T/haproxy.pem"
  chmod 644 "$T"/*
  TLS_SERVER="ssl_certificate $T/leaf.pem; ssl_certificate_key $T/leaf.key; ssl_session_cache shared:SSL:10m; ssl_session_tickets on;"
  ORIGIN_TLS=${ORIGIN_TLS:-TLSv1.2 TLSv1.3}
  CLIENT_TLS=${CLIENT_TLS:-TLSv1.2 TLSv1.3}
  # The origin over HTTPS (modes upstream, both, close).
  if [ "$MODE" != resume ]; then
    sed -i "s|listen 127.0.0.1:$P_ORIGIN;|listen 127.0.0.1:$P_ORIGIN ssl; $TLS_SERVER ssl_protocols $ORIGIN_TLS;|" "$WORK/origin.conf"
    sed -i "s|endpoint: \"http://127.0.0.1:$P_ORIGIN\"|endpoint: \"https://127.0.0.1:$P_ORIGIN\"\n      ca_file: \"$T/ca.pem\"|" "$WORK/yatagarasu.yaml"
    for c in nginx nginx_tuned; do
      sed -i "s|proxy_pass http://origin/|proxy_ssl_trusted_certificate $T/ca.pem; proxy_ssl_verify on; proxy_ssl_name 127.0.0.1; proxy_ssl_session_reuse on; proxy_ssl_protocols TLSv1.2 TLSv1.3;\n      proxy_pass https://origin/|" "$WORK/$c.conf"
    done
    sed -i "s|  server o 127.0.0.1:$P_ORIGIN|  server o 127.0.0.1:$P_ORIGIN ssl verify required ca-file $T/ca.pem verifyhost 127.0.0.1|" "$WORK/haproxy.cfg"
  fi
  # Clients over HTTPS (modes both, close, resume).
  if [ "$MODE" != upstream ]; then
    SCHEME=https
    sed -i "s|^  workers: 1$|  workers: 1\n  tls:\n    cert_file: \"$T/leaf.pem\"\n    key_file: \"$T/leaf.key\"|" "$WORK/yatagarasu.yaml"
    for c in nginx nginx_tuned; do
      sed -i "s|listen 127.0.0.1:\([0-9]*\) backlog=16384;|listen 127.0.0.1:\1 ssl backlog=16384; $TLS_SERVER ssl_protocols $CLIENT_TLS;|" "$WORK/$c.conf"
    done
    sed -i "s|  bind 127.0.0.1:$P_HAPROXY|  bind 127.0.0.1:$P_HAPROXY ssl crt $T/haproxy.pem|" "$WORK/haproxy.cfg"
  fi
fi
if [ "${SHOW_CONFIGS:-0}" = 1 ]; then
  for f in yatagarasu.yaml nginx.conf nginx_tuned.conf haproxy.cfg origin.conf; do
    echo "--- $f"; cat "$WORK/$f"; echo
  done
fi

taskset -c 1 nginx -c "$WORK/origin.conf" &
PIDS+=($!)
sleep 0.5

# Starts target $1 pinned to core 0; prints "pid port".
start() {
  case $1 in
    yatagarasu) taskset -c 0 "$BIN" --config "$WORK/yatagarasu.yaml" 2>"$WORK/logs/yata.log" & echo "$! $P_YATA" ;;
    yatagarasu_b) taskset -c 0 "$BIN_B" --config "$WORK/yatagarasu.yaml" 2>"$WORK/logs/yata_b.log" & echo "$! $P_YATA" ;;
    nginx) taskset -c 0 nginx -c "$WORK/nginx.conf" & echo "$! $P_NGINX" ;;
    nginx_tuned) taskset -c 0 nginx -c "$WORK/nginx_tuned.conf" & echo "$! $P_TUNED" ;;
    haproxy) taskset -c 0 haproxy -db -f "$WORK/haproxy.cfg" & echo "$! $P_HAPROXY" ;;
  esac
}

# Stops target process $1 and waits until it is gone: it is not this
# shell's child (started in a process substitution), so `wait` cannot, and
# a proxy still draining would share the next one's port (SO_REUSEPORT)
# and refuse its first connections.
stop() {
  kill "$1" 2>/dev/null || true
  while [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; do sleep 0.05; done
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
  PIDS+=("$pid") # stopped on exit too, should this run end early
  local url="$SCHEME://127.0.0.1:$port/data/obj-$2"
  for _ in $(seq 50); do curl -sfk -o /dev/null "$url" && break; sleep 0.1; done
  if [ "$MODE" = resume ]; then
    # s_time: -new makes a full handshake per connection, -reuse resumes.
    local t0 t1 out how=${RESUME_HOW:-new}
    t0=$(cpu_ticks "$pid")
    # (s_time exits non-zero when a connection of its run failed; the
    # count of those that completed is still its figure.)
    out=$(taskset -c 1 openssl s_time -connect "127.0.0.1:$port" -www "/data/obj-$2" -time "$DURATION" -"$how" 2>&1) || true
    t1=$(cpu_ticks "$pid")
    stop "$pid"
    echo "$out" | awk -v t=$((t1 - t0)) -v d="$DURATION" -v hz="$(getconf CLK_TCK)" \
      '/connections in [0-9.]+ real/ && !done { n = $1; done = 1 } END { if (n > 0) printf "%.0f %.2f\n", n / d, (t / hz) * 1e6 / n; else print "0 0" }'
    return
  fi
  local close=()
  [ "$MODE" = close ] && close=(-H "Connection: close")
  taskset -c 1 wrk -t1 -c32 -d1s "${close[@]}" "$url" >/dev/null
  local t0 out t1
  t0=$(cpu_ticks "$pid")
  out=$(taskset -c 1 wrk -t1 -c32 -d"${DURATION}s" "${close[@]}" "$url")
  t1=$(cpu_ticks "$pid")
  stop "$pid"
  if echo "$out" | grep -q "Non-2xx\|Socket errors"; then
    echo "$1 errors on obj-$2:" >&2; echo "$out" >&2
  fi
  rate "$out" $((t1 - t0)) "$DURATION"
}


echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
echo "mode $MODE${KEY:+ (keys: $KEY)}; wrk -t1 -c32, ${DURATION}s, medians of $ROUNDS rounds; proxies on core 0, wrk and origin on core 1"
echo
header="| object |"; sep="|---|"
for t in $TARGETS; do header="$header $t req/s | $t CPU us/req |"; sep="$sep---|---|"; done
extra=""; [[ " $TARGETS " == *" yatagarasu_b "* ]] && { extra=" yatagarasu_b CPU / best peer |"; sep="$sep---|"; }
echo "$header yatagarasu CPU / best peer |$extra"; echo "$sep---|"
for s in $SIZES; do
  for t in $TARGETS; do : >"$WORK/$t"; done
  for r in $(seq "$ROUNDS"); do
    order=$TARGETS
    [ $((r % 2)) = 0 ] && order=$(echo "$TARGETS" | tr ' ' '\n' | tac | xargs)
    for t in $order; do run_one "$t" "$s" >>"$WORK/$t"; done
  done
  row="| $s |"; best=""; mine=""; mine_b=""
  for t in $TARGETS; do
    rps=$(cut -d' ' -f1 "$WORK/$t" | median); cpu=$(cut -d' ' -f2 "$WORK/$t" | median)
    row="$row $rps | $cpu |"
    if [ "$t" = yatagarasu ]; then mine=$cpu
    elif [ "$t" = yatagarasu_b ]; then mine_b=$cpu
    elif [ -z "$best" ] || awk -v a="$cpu" -v b="$best" 'BEGIN{exit !(a<b)}'; then best=$cpu; fi
  done
  ratio=$(awk -v a="$mine" -v b="$best" 'BEGIN { printf "%.2f", a / b }')
  ratio_b=""; [ -n "$mine_b" ] && ratio_b=" $(awk -v a="$mine_b" -v b="$best" 'BEGIN { printf "%.2f", a / b }')x |"
  echo "$row ${ratio}x |$ratio_b"
done
