#!/usr/bin/env bash
# A/B of two yatagarasu binaries in one run: same nginx file origin, same
# config, same wrk settings, alternating order, each proxy pinned to core 0
# and wrk plus the origin to core 1. Reports requests/s and CPU us per
# request (utime+stime from /proc) per object size; medians of ROUNDS.
#
#   bash loadtest/ab.sh <binary A> <binary B> [label A] [label B]
#
# Used to show that a refactor kept (or bettered) the figures of the binary
# before it. Needs wrk and nginx (apt: wrk nginx-light). WRK_HEADER adds a
# request header; EXTRA_YAML adds top-level proxy config (e.g. a cache
# section), EXTRA_YAML_B overrides it for B; ORIGIN_DIRECTIVES adds nginx directives to the
# origin's server block.
set -euo pipefail
A=$1 B=$2 LA=${3:-A} LB=${4:-B}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
SIZES=${SIZES:-"1k 64k"}
P_ORIGIN=18100 P_PROXY=18101

# shellcheck source=loadtest/origin.sh
source "$(dirname "$0")/origin.sh"
setup_work
make_objects "$WORK" $SIZES
origin_conf "$WORK" "$P_ORIGIN" "${ORIGIN_DIRECTIVES:-}" >"$WORK/origin.conf"
yata_yaml "$P_PROXY" "$P_ORIGIN" "${EXTRA_YAML:-}" >"$WORK/proxy.yaml"
# EXTRA_YAML_B: B's own top-level config (the same binary A/B'd against a
# setting, e.g. tracing on against off).
yata_yaml "$P_PROXY" "$P_ORIGIN" "${EXTRA_YAML_B-${EXTRA_YAML:-}}" >"$WORK/proxy-b.yaml"
taskset -c 1 nginx -c "$WORK/origin.conf" -p "$WORK" &
PIDS+=($!)
sleep 0.5

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run_one() { # binary size [config] -> "rps us_per_req"
  taskset -c 0 "$1" --config "${3:-$WORK/proxy.yaml}" 2>"$WORK/logs/proxy.log" &
  local pid=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$P_PROXY/health" >/dev/null 2>&1 && break; sleep 0.1; done
  taskset -c 1 wrk -t1 -c32 -d1s ${WRK_HEADER:+-H "$WRK_HEADER"} "http://127.0.0.1:$P_PROXY/data/obj-$2" >/dev/null
  local t0; t0=$(cpu_ticks "$pid")
  local out; out=$(taskset -c 1 wrk -t1 -c32 -d"${DURATION}s" ${WRK_HEADER:+-H "$WRK_HEADER"} "http://127.0.0.1:$P_PROXY/data/obj-$2")
  [ -n "${AB_DEBUG:-}" ] && echo "$out" >&2
  if echo "$out" | grep -q "Non-2xx"; then
    echo "$1 answered errors on obj-$2:" >&2; echo "$out" >&2; exit 1
  fi
  local t1; t1=$(cpu_ticks "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rate "$out" $((t1 - t0)) "$DURATION"
}


echo "| object | $LA req/s | $LB req/s | $LA CPU us/req | $LB CPU us/req | CPU $LB/$LA |"
echo "|---|---|---|---|---|---|"
for s in $SIZES; do
  : >"$WORK/a" ; : >"$WORK/b"
  for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
      run_one "$A" "$s" >>"$WORK/a"; run_one "$B" "$s" "$WORK/proxy-b.yaml" >>"$WORK/b"
    else
      run_one "$B" "$s" "$WORK/proxy-b.yaml" >>"$WORK/b"; run_one "$A" "$s" >>"$WORK/a"
    fi
  done
  ra=$(cut -d' ' -f1 "$WORK/a" | median); rb=$(cut -d' ' -f1 "$WORK/b" | median)
  ca=$(cut -d' ' -f2 "$WORK/a" | median); cb=$(cut -d' ' -f2 "$WORK/b" | median)
  ratio=$(awk -v a="$ca" -v b="$cb" 'BEGIN { printf "%.2f", b / a }')
  echo "| $s | $ra | $rb | $ca | $cb | ${ratio}x |"
done
