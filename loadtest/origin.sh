# Shared by the load scripts (sourced): the nginx file origin every proxy
# and cache is measured in front of.
#
#   setup_work                            WORK (a temporary directory, or KEEP_WORK), PIDS;
#                                           on exit the PIDS are killed and WORK removed
#   make_objects <work> <sizes...>        objects obj-<size> (1k 4k 16k 32k 64k 256k 1m 64m) under <work>/origin/data-bucket
#   origin_conf <work> <port> [directives] nginx config serving <work>/origin at <port>
#   yata_yaml <port> <origin port> [extra] [metrics port]
#                                         a one-worker yatagarasu config for /data -> the origin;
#                                           extra: top-level sections before buckets (ending in a
#                                           newline); metrics served on the port when one is given
#   haproxy_cfg <port> <origin port> [global lines]  HAProxy proxying /data to the origin
#   nginx_proxy_conf <work> <port> <origin port> [http directives] [main directives]
#                                           nginx (one worker) proxying /data to the origin,
#                                           keep-alive 128 upstream; NGINX_TUNED holds the
#                                           buffer settings that fit 64 KiB responses
#   rate <wrk output> <cpu ticks> <seconds>  "req/s CPU-us-per-request" of one wrk run
#   median                                 the median of numbers on stdin, one per line

setup_work() {
  WORK=${KEEP_WORK:-$(mktemp -d)}
  chmod 755 "$WORK" # nginx workers run as another user
  PIDS=()
  trap cleanup_work EXIT
}

cleanup_work() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}

make_objects() {
  local work=$1 s n
  shift
  mkdir -p "$work/origin/data-bucket" "$work/logs"
  for s in "$@"; do
    case $s in 1k) n=1024;; 4k) n=4096;; 16k) n=16384;; 32k) n=32768;; 64k) n=65536;; 256k) n=262144;; 1m) n=1048576;; 64m) n=67108864;; esac
    head -c "$n" /dev/urandom >"$work/origin/data-bucket/obj-$s"
  done
}

origin_conf() {
  cat <<CONF
worker_processes 1;
daemon off;
pid $1/origin.pid;
error_log $1/logs/origin-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 1000000; keepalive_timeout 120s;
  server { listen 127.0.0.1:$2; root $1/origin; ${3:-} }
}
CONF
}

yata_yaml() {
  local metrics="  enabled: false"
  [ -n "${4:-}" ] && metrics="  enabled: true
  address: \"127.0.0.1:$4\""
  cat <<CONF
server:
  address: "127.0.0.1:$1"
  workers: 1
${3:-}buckets:
  - name: "bench"
    path_prefix: "/data"
    s3:
      bucket: "data-bucket"
      endpoint: "http://127.0.0.1:$2"
      access_key: "bench"
      secret_key: "bench-secret"
      health_check:
        enabled: false
metrics:
$metrics
logging:
  level: "warn"
CONF
}

haproxy_cfg() {
  cat <<CONF
global
  nbthread 1
  maxconn 8000
${3:-}
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:$1
  http-request replace-path ^/data/(.*) /data-bucket/\1
  default_backend origin
backend origin
  http-reuse always
  server o 127.0.0.1:$2
CONF
}

# nginx tuned for proxying: 64 KiB responses fit the buffers instead of
# spilling to temporary files.
NGINX_TUNED="proxy_buffer_size 64k; proxy_buffers 8 64k; proxy_busy_buffers_size 128k;"

nginx_proxy_conf() {
  cat <<CONF
worker_processes 1;
${5:-}
daemon off;
pid $1/nginx-$2.pid;
error_log $1/logs/nginx-$2-error.log;
events { worker_connections ${NGINX_CONNECTIONS:-4096}; }
http {
  access_log off;
  keepalive_requests 1000000; keepalive_timeout 300s;
  ${4:-}
  upstream origin { server 127.0.0.1:$3; keepalive 128; }
  server {
    listen 127.0.0.1:$2 backlog=16384;
    location /data/ {
      proxy_pass http://origin/data-bucket/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
}

rate() {
  local reqs
  reqs=$(echo "$1" | awk '/requests in/ {print $1}')
  awk -v r="$reqs" -v d="$3" -v t="$2" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "%.0f %.2f\n", r / d, (t / hz) * 1e6 / r }'
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
