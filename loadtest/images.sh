#!/usr/bin/env bash
# Images (issue #29), through the proxy:
#  1. CPU time per transformed image, four cases, against vipsthumbnail
#     (libvips-tools) in the same run: each proxy request is a cold variant
#     of a distinct object (its original fetched from the nginx origin, so
#     the fetch is in the figure); vipsthumbnail runs once over N copies.
#     Both on core 0 with one libvips thread (max_concurrent: 1 for the
#     proxy, VIPS_CONCURRENCY=1 for vipsthumbnail); CPU is the proxy's
#     utime+stime from /proc, vipsthumbnail's from getrusage.
#  2. Throughput on a warm variant against ordinary cache hits of the same
#     size (wrk -t1 -c32, core 1; the proxy on core 0, one worker).
#
#   bash loadtest/images.sh            # N=40 images per case
#   N=20 DURATION=3 bash loadtest/images.sh
#   CASES=0 bash loadtest/images.sh   # the warm-hit comparison only
#
# The library comparison (libvips against image + fast_image_resize) is
# benches/imagelibs. Needs nginx, wrk, libvips-tools and a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
YATA=${YATA:-$ROOT/target/release/yatagarasu}
N=${N:-40}
DURATION=${DURATION:-5}
PIN=${PIN:-1}
P_ORIGIN=18500 P_YATA=18501
on_core() { if [ "$PIN" = 1 ]; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }
# In the background, so that $! is the server itself (stopped by PID).
spawn_on() { if [ "$PIN" = 1 ]; then exec taskset -c "$1" "${@:2}"; else exec "${@:2}"; fi; }

# shellcheck source=loadtest/origin.sh
source "$ROOT/loadtest/origin.sh"
setup_work
DATA="$WORK/origin/data-bucket"
mkdir -p "$DATA" "$WORK/logs" "$WORK/in"

# make_input <w> <h> <bands> <out[options]>: smooth noise (as benches/imagelibs).
make_input() {
  local parts=() b
  for b in $(seq 1 "$3"); do
    vips gaussnoise "$WORK/in/n$b.v" "$1" "$2" --mean 128 --sigma 90
    vips gaussblur "$WORK/in/n$b.v" "$WORK/in/s$b.v" $((1 + b))
    parts+=("$WORK/in/s$b.v")
  done
  vips bandjoin "${parts[*]}" "$WORK/in/j.v"
  vips cast "$WORK/in/j.v" "$WORK/in/c.v" uchar
  vips copy "$WORK/in/c.v" "$WORK/in/$4"
}
make_input 1920 1080 3 "hd.jpg[Q=90]"
make_input 4000 3000 3 "big.jpg[Q=90]"
make_input 1920 1080 4 "alpha.png"
for i in $(seq 1 "$N"); do
  for f in hd.jpg big.jpg alpha.png; do ln "$WORK/in/$f" "$DATA/${f%.*}-$i.${f#*.}"; done
done

origin_conf "$WORK" "$P_ORIGIN" 'add_header Cache-Control "max-age=86400";' >"$WORK/origin.conf"
spawn_on 1 nginx -c "$WORK/origin.conf" -p "$WORK" &
PIDS+=($!)
yata_yaml "$P_YATA" "$P_ORIGIN" "image_optimization:
  enabled: true
  max_concurrent: 1
  max_queue: 64
cache:
  enabled: true
  memory:
    max_cache_size_mb: 512
    max_item_size_mb: 16
" >"$WORK/yata.yaml"
if ss -ltn | grep -q ":$P_YATA "; then echo "port $P_YATA is taken (a proxy left over?)" >&2; exit 1; fi
spawn_on 0 "$YATA" --config "$WORK/yata.yaml" >"$WORK/logs/yata.log" 2>&1 &
PROXY=$!
PIDS+=("$PROXY")
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$P_YATA/health" >/dev/null 2>&1 && break; sleep 0.1; done
ticks() { awk '{print $14 + $15}' "/proc/$PROXY/stat"; }
HZ=$(getconf CLK_TCK)

# children_cpu <command...>: CPU seconds (user + system) the command used.
children_cpu() {
  python3 - "$@" <<'PY'
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(r.ru_utime + r.ru_stime)
PY
}

echo "CPU ms per image, $N images per case, one libvips thread, core 0"
echo "| case | vipsthumbnail | yatagarasu (request, fetch, transform) | ratio |"
echo "|---|---|---|---|"
# case <label> <stem> <ext> <query> <thumbnail size> <thumbnail output>
run_case() {
  local label=$1 stem=$2 ext=$3 query=$4 size=$5 out=$6 i t0 t1 files=()
  for i in $(seq 1 "$N"); do files+=("$WORK/in/t-$stem-$i.$ext"); cp "$WORK/in/$stem.$ext" "$WORK/in/t-$stem-$i.$ext"; done
  local floor
  floor=$(children_cpu env VIPS_CONCURRENCY=1 taskset -c 0 vipsthumbnail "${files[@]}" -s "$size" -o "$out")
  t0=$(ticks)
  for i in $(seq 1 "$N"); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$P_YATA/data/$stem-$i.$ext?$query")
    [ "$code" = 200 ] || { echo "HTTP $code for $stem-$i" >&2; exit 1; }
  done
  t1=$(ticks)
  python3 -c "
floor=$floor/$N*1000; ours=($t1-$t0)/$HZ/$N*1000
print(f'| $label | {floor:.2f} | {ours:.2f} | {ours/floor:.2f}x |')"
}
if [ "${CASES:-1}" = 1 ]; then
  run_case "1920x1080 JPEG -> 400 JPEG q80" hd jpg "w=400&q=80" 400x "%s-t.jpg[Q=80,strip]"
  run_case "1920x1080 JPEG -> 400 WebP q80" hd jpg "w=400&q=80&fmt=webp" 400x "%s-t.webp[Q=80,strip]"
  run_case "4000x3000 JPEG -> 1200 JPEG q80" big jpg "w=1200&q=80" 1200x "%s-t.jpg[Q=80,strip]"
  run_case "1920x1080 PNG+alpha -> 400 WebP" alpha png "w=400&q=80&fmt=webp" 400x "%s-t.webp[Q=80,strip]"
fi

# Warm variant against an ordinary hit of the same size.
curl -s -o "$WORK/variant.bin" "http://127.0.0.1:$P_YATA/data/hd-1.jpg?w=800&fmt=webp"
cp "$WORK/variant.bin" "$DATA/plain.bin"
SIZE=$(stat -c %s "$WORK/variant.bin")
for _ in 1 2; do
  curl -s -o /dev/null "http://127.0.0.1:$P_YATA/data/hd-1.jpg?w=800&fmt=webp"
  curl -s -o /dev/null "http://127.0.0.1:$P_YATA/data/plain.bin"
done
echo
echo "Warm hits, $SIZE bytes, wrk -t1 -c32 -d${DURATION}s (medians of 3): req/s and proxy CPU us per request"
echo "| what | req/s | CPU us/req |"
echo "|---|---|---|"
# Interleaved (variant, ordinary, variant, ...) so drift hits both alike.
declare -A runs
for _ in 1 2 3; do
  for what in variant ordinary; do
    case $what in variant) path="/data/hd-1.jpg?w=800&fmt=webp";; ordinary) path="/data/plain.bin";; esac
    t0=$(ticks)
    out=$(on_core 1 wrk -t1 -c32 -d"${DURATION}s" "http://127.0.0.1:$P_YATA$path")
    t1=$(ticks)
    runs[$what]+="$(rate "$out" $((t1 - t0)) "$DURATION")"$'\n'
  done
done
for what in variant ordinary; do
  printf '%s' "${runs[$what]}" | sort -n | sed -n 2p | awk -v w="$what" '{printf "| %s | %s | %s |\n", w, $1, $2}'
done
grep -q "X-Cache: HIT" <(curl -s -D - -o /dev/null "http://127.0.0.1:$P_YATA/data/hd-1.jpg?w=800&fmt=webp") && echo "(the variant answered as a HIT)"
