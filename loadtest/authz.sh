#!/usr/bin/env bash
# CPU per request of policy authorization (issue #26), one binary, one run:
# JWT authentication alone (the baseline) against the same plus
#   rego-warm  type: rego, config/policies/authz.rego, decisions remembered
#   rego-cold  the same with opa_cache_ttl_seconds: 0 (evaluated per request)
#   opa-warm   type: opa over HTTP (a stand-in answering {"result": true}
#              on loopback), decisions remembered
# Same nginx file origin, wrk settings and pinning as loadtest/ab.sh
# (proxy on core 0, wrk and the origin on core 1); medians of ROUNDS.
#
#   bash loadtest/authz.sh [binary]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/yatagarasu}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
SIZES=${SIZES:-"1k"}
P_ORIGIN=18200 P_PROXY=18201 P_OPA=18202
SECRET="bench-jwt-secret-0123456789abcdef"

# shellcheck source=loadtest/origin.sh
source "$ROOT/loadtest/origin.sh"
setup_work
make_objects "$WORK" $SIZES
origin_conf "$WORK" "$P_ORIGIN" >"$WORK/origin.conf"
taskset -c 1 nginx -c "$WORK/origin.conf" -p "$WORK" &
PIDS+=($!)
# The OPA stand-in: every decision allows (only reached on a cold cache).
taskset -c 1 python3 - "$P_OPA" <<'PY' &
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"result": true}'
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
PIDS+=($!)
sleep 0.5

TOKEN=$(python3 - "$SECRET" <<'PY'
import base64, hashlib, hmac, json, sys, time
b = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=")
h = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
p = b(json.dumps({"sub": "bench", "role": "admin", "exp": int(time.time()) + 86400}).encode())
s = b(hmac.new(sys.argv[1].encode(), h + b"." + p, hashlib.sha256).digest())
print((h + b"." + p + b"." + s).decode())
PY
)
WRK_HEADER="Authorization: Bearer $TOKEN"

config() { # variant -> config on stdout
  local authz=""
  case $1 in
    rego-warm) authz="    authorization:\n      type: rego\n      policy_file: \"$ROOT/config/policies/authz.rego\"\n" ;;
    rego-cold) authz="    authorization:\n      type: rego\n      policy_file: \"$ROOT/config/policies/authz.rego\"\n      cache_ttl_seconds: 0\n" ;;
    opa-warm) authz="    authorization:\n      type: opa\n      opa_url: \"http://127.0.0.1:$P_OPA\"\n" ;;
  esac
  yata_yaml "$P_PROXY" "$P_ORIGIN" "jwt:\n  enabled: true\n  algorithm: HS256\n  secret: \"$SECRET\"\n" |
    sed "s|^    path_prefix: \"/data\"$|    path_prefix: \"/data\"\n    auth:\n      enabled: true\n$authz|" | sed 's/\\n/\n/g'
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run_one() { # variant size -> "rps us_per_req"
  config "$1" >"$WORK/$1.yaml"
  taskset -c 0 "$BIN" --config "$WORK/$1.yaml" 2>"$WORK/logs/$1.log" &
  local pid=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$P_PROXY/health" >/dev/null 2>&1 && break; sleep 0.1; done
  taskset -c 1 wrk -t1 -c32 -d1s -H "$WRK_HEADER" "http://127.0.0.1:$P_PROXY/data/obj-$2" >/dev/null
  local t0; t0=$(cpu_ticks "$pid")
  local out; out=$(taskset -c 1 wrk -t1 -c32 -d"${DURATION}s" -H "$WRK_HEADER" "http://127.0.0.1:$P_PROXY/data/obj-$2")
  if echo "$out" | grep -q "Non-2xx"; then
    echo "$1 answered errors on obj-$2:" >&2; echo "$out" >&2; cat "$WORK/logs/$1.log" >&2; exit 1
  fi
  local t1; t1=$(cpu_ticks "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rate "$out" $((t1 - t0)) "$DURATION"
}

VARIANTS=${VARIANTS:-"jwt-only rego-warm rego-cold opa-warm"}
echo "| object | variant | req/s | CPU us/req | CPU vs jwt-only |"
echo "|---|---|---|---|---|"
for s in $SIZES; do
  for v in $VARIANTS; do : >"$WORK/$v"; done
  for r in $(seq "$ROUNDS"); do
    for v in $VARIANTS; do run_one "$v" "$s" >>"$WORK/$v"; done
  done
  base=$(cut -d' ' -f2 "$WORK/jwt-only" | median)
  for v in $VARIANTS; do
    rps=$(cut -d' ' -f1 "$WORK/$v" | median); cpu=$(cut -d' ' -f2 "$WORK/$v" | median)
    echo "| $s | $v | $rps | $cpu | $(awk -v a="$base" -v b="$cpu" 'BEGIN { printf "%.2f", b / a }')x |"
  done
done
