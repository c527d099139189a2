#!/usr/bin/env bash
# Issue #28's allocation count: heap blocks per request on a kept-alive TLS
# client connection, for a 1 KiB object served from the memory cache.
# valgrind's dhat counts every allocation of the release binary (one worker,
# the epoll driver: valgrind does not run io_uring). One TLS 1.3 client
# (Python's ssl, ECDSA P-256) asks for the object N1 and then N2 times, each
# run its own process; the difference of the two totals over N2 - N1 is the
# count per request (start-up, the handshake and the first miss cancel out).
#
#   bash loadtest/tls_allocs.sh [yatagarasu binary]   (N1=200 N2=1200)
#   TLS_MAX=1.2 makes the client speak TLS 1.2 (the default: TLS 1.3).
#
# Needs valgrind, nginx, openssl, python3.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/yatagarasu}
N1=${N1:-200}
N2=${N2:-1200}
P_ORIGIN=18300 P_YATA=18301

# shellcheck source=loadtest/origin.sh
source "$ROOT/loadtest/origin.sh"
setup_work
make_objects "$WORK" 1k
origin_conf "$WORK" "$P_ORIGIN" >"$WORK/origin.conf"
nginx -c "$WORK/origin.conf" -p "$WORK" &
PIDS+=($!)

T=$WORK/tls
mkdir -p "$T"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$T/leaf.key" -out "$T/leaf.pem" -days 2 -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1 2>/dev/null
CACHE="cache:
  enabled: true
  memory:
    max_item_size_mb: 1
    max_cache_size_mb: 64
"
yata_yaml "$P_YATA" "$P_ORIGIN" "$CACHE" >"$WORK/y.yaml"
sed -i "s|^  workers: 1$|  workers: 1\n  tls:\n    cert_file: \"$T/leaf.pem\"\n    key_file: \"$T/leaf.key\"|" "$WORK/y.yaml"

count() {
  local n=$1 out=$WORK/dhat-$1.json
  YATAGARASU_DRIVER=epoll valgrind --tool=dhat --dhat-out-file="$out" \
    "$BIN" --config "$WORK/y.yaml" 2>"$WORK/logs/valgrind-$n.log" &
  local vg=$!
  for _ in $(seq 600); do
    curl -skf -o /dev/null "https://127.0.0.1:$P_YATA/data/obj-1k" && break
    sleep 0.2
  done
  python3 - "$P_YATA" "$n" "${TLS_MAX:-1.3}" <<'PY'
import http.client, ssl, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
if sys.argv[3] == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
for _ in range(n):
    c.request("GET", "/data/obj-1k")
    r = c.getresponse()
    assert r.status == 200 and len(r.read()) == 1024
c.close()
PY
  kill -INT "$vg"
  wait "$vg" || true
  python3 - "$out" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
blocks = sum(pp["tbk"] for pp in d["pps"])
nbytes = sum(pp["tb"] for pp in d["pps"])
print(blocks, nbytes)
PY
}

read -r b1 y1 < <(count "$N1")
read -r b2 y2 < <(count "$N2")
python3 - "$N1" "$N2" "$b1" "$b2" "$y1" "$y2" <<'PY'
import sys
n1, n2, b1, b2, y1, y2 = map(int, sys.argv[1:])
print(f"{n1} requests: {b1} blocks, {y1} bytes; {n2} requests: {b2} blocks, {y2} bytes")
print(f"per request: {(b2 - b1) / (n2 - n1):.2f} allocations, {(y2 - y1) / (n2 - n1):.0f} bytes")
PY
