#!/usr/bin/env bash
# What each feature added since the first round costs per 1 KiB request,
# CPU per request with the pinning of ab.sh (proxy on core 0; wrk and the
# origin on core 1), one A/B run each:
#   - switched off: this binary against the first round's (all off);
#   - switched on, one at a time, against this binary with it off: IP filter,
#     client rate limits, JWT (HS256, a valid token on every request), and
#     the cache on a miss (the origin says no-store, so every request looks
#     up, misses and relays).
#
#   bash loadtest/features.sh <this binary> <round-1 binary>
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NEW=$1 OLD=$2
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
export SIZES=1k ROUNDS=${ROUNDS:-3}

# A wrapper running $NEW with extra YAML: $1 name, $2 top-level YAML, $3
# bucket-level YAML, $4 server-level YAML.
variant() {
  local script="$W/$1.sh"
  printf '%s' "$2" >"$W/$1.top"
  printf '%s' "$3" >"$W/$1.bucket"
  printf '%s' "${4:-}" >"$W/$1.server"
  cat >"$script" <<SH
#!/usr/bin/env bash
cfg=\$2
python3 - "\$cfg" "$W/$1.top" "$W/$1.bucket" "$W/$1.server" <<'PY'
import sys
cfg, top, bucket, server = sys.argv[1], open(sys.argv[2]).read(), open(sys.argv[3]).read(), open(sys.argv[4]).read()
text = open(cfg).read().replace('    path_prefix: "/data"\n', '    path_prefix: "/data"\n' + bucket)
text = text.replace('  workers: 1\n', '  workers: 1\n' + server)
open(cfg + ".v.yaml", "w").write(top + text)
PY
exec "$NEW" --config "\$cfg.v.yaml"
SH
  chmod +x "$script"
  echo "$script"
}

row() { # label, ab.sh output -> one table row
  echo "$2" | awk -v l="$1" -F'|' '/^\| 1k/ { printf "| %s | %s | %s | %s |\n", l, $5, $6, $7 }'
}

echo "| feature | CPU us/req without | CPU us/req with | ratio |"
echo "|---|---|---|---|"
row "everything off: this binary vs round 1" "$(bash "$ROOT/loadtest/ab.sh" "$OLD" "$NEW" round1 now)"
row "IP filter (allowlist 127.0.0.0/8)" \
  "$(bash "$ROOT/loadtest/ab.sh" "$NEW" "$(variant ip '' $'    ip_filter:\n      allowlist: ["127.0.0.0/8"]\n')" off on)"
row "rate limits (global + per IP, never reached)" \
  "$(bash "$ROOT/loadtest/ab.sh" "$NEW" "$(variant rate '' '' $'  rate_limit:\n    enabled: true\n    global:\n      requests_per_second: 100000000\n    per_ip:\n      requests_per_second: 100000000\n')" off on)"
SECRET="bench-jwt-secret-0123456789abcdef"
TOKEN=$(python3 - "$SECRET" <<'PY'
import base64, hashlib, hmac, json, sys, time
b = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=").decode()
h = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
p = b(json.dumps({"sub": "bench", "exp": int(time.time()) + 86400}).encode())
s = b(hmac.new(sys.argv[1].encode(), f"{h}.{p}".encode(), hashlib.sha256).digest())
print(f"{h}.{p}.{s}")
PY
)
JWT_ON=$(variant jwt $'jwt:\n  enabled: true\n  algorithm: "HS256"\n  secret: "'"$SECRET"$'"\n' $'    auth:\n      enabled: true\n')
row "JWT (HS256, token on every request)" \
  "$(WRK_HEADER="Authorization: Bearer $TOKEN" bash "$ROOT/loadtest/ab.sh" "$NEW" "$JWT_ON" off on)"
row "cache on, every request a miss (origin no-store)" \
  "$(ORIGIN_DIRECTIVES='add_header Cache-Control no-store;' bash "$ROOT/loadtest/ab.sh" "$NEW" "$(variant cache $'cache:\n  enabled: true\n' '')" off on)"
