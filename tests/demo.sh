#!/usr/bin/env bash
# The High Availability tutorial, run locally without Docker:
#   two s3s-fs replicas (primary on 127.0.0.1:9001, backup on 127.0.0.1:9002)
#   holding different test.txt, yatagarasu on :8080 (metrics :9090) with
#   config/ha-tutorial.yaml, then the tutorial's steps 4 to 7, printed.
# Stops everything it started (by PID) on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export MINIO_ACCESS_KEY=minioadmin MINIO_SECRET_KEY=minioadmin
HEALTH_WAIT="${HEALTH_WAIT:-10}"

command -v s3s-fs >/dev/null 2>&1 || cargo install s3s-fs@0.14.1 --features binary --locked
cargo build --quiet
BIN=target/debug/yatagarasu

for port in 8080 9090 9001 9002; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use; stop whatever listens there and retry" >&2
    exit 1
  fi
done

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start_replica() { # name port
  mkdir -p "$WORK/$1"
  s3s-fs --host 127.0.0.1 --port "$2" --access-key minioadmin --secret-key minioadmin "$WORK/$1" \
    >"$WORK/$1.log" 2>&1 &
  echo $!
}
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listening on $1" >&2; return 1
}
s3() { # method url [file]
  local extra=()
  [ $# -ge 3 ] && extra=(-T "$3")
  curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user minioadmin:minioadmin \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -X "$1" "${extra[@]}" "$2" >/dev/null
}

echo "== Step 1-3: replicas and proxy"
PRIMARY=$(start_replica primary 9001); PIDS+=("$PRIMARY")
BACKUP=$(start_replica backup 9002); PIDS+=("$BACKUP")
wait_port 9001; wait_port 9002
printf 'Primary data!\n' >"$WORK/p.txt"; printf 'Backup data!\n' >"$WORK/b.txt"
s3 PUT http://127.0.0.1:9001/data-bucket; s3 PUT http://127.0.0.1:9001/data-bucket/test.txt "$WORK/p.txt"
s3 PUT http://127.0.0.1:9002/data-bucket; s3 PUT http://127.0.0.1:9002/data-bucket/test.txt "$WORK/b.txt"
echo "HA buckets initialized!"
"$BIN" --check --config config/ha-tutorial.yaml
"$BIN" --config config/ha-tutorial.yaml >"$WORK/yatagarasu.log" 2>&1 &
PIDS+=("$!")
wait_port 8080

echo; echo "== Step 4: normal operation"
echo "\$ curl http://localhost:8080/data/test.txt"
OUT=$(curl -s http://localhost:8080/data/test.txt); echo "$OUT"
[ "$OUT" = "Primary data!" ]

echo; echo "== Step 5: primary failure (kill -9)"
kill -9 "$PRIMARY"; wait "$PRIMARY" 2>/dev/null || true
sleep 1
echo "\$ curl http://localhost:8080/data/test.txt"
OUT=$(curl -s http://localhost:8080/data/test.txt); echo "$OUT"
[ "$OUT" = "Backup data!" ]
sleep 0.2
echo "\$ grep failover log"
grep -m1 "Replica 'primary' failed, trying 'backup'" "$WORK/yatagarasu.log" \
  || grep -m1 "Health check failed" "$WORK/yatagarasu.log"

echo; echo "== Step 6: recovery (restart primary, wait one health interval: ${HEALTH_WAIT}s)"
PRIMARY=$(start_replica primary 9001); PIDS+=("$PRIMARY")
wait_port 9001
sleep "$HEALTH_WAIT"
echo "\$ curl http://localhost:8080/data/test.txt"
OUT=$(curl -s http://localhost:8080/data/test.txt); echo "$OUT"
[ "$OUT" = "Primary data!" ]

echo; echo "== Step 7: replica metrics"
echo "\$ curl -s http://localhost:9090/metrics | grep replica"
curl -s http://localhost:9090/metrics | grep -E '^yatagarasu_(replica_health|replica_requests_total|replica_failures_total|replica_failovers_total|circuit_breaker_state)'

echo; echo "Demo complete: failover and recovery worked as the tutorial describes."
