# Shared by the load scripts (sourced): the nginx file origin every proxy
# and cache is measured in front of.
#
#   make_objects <work> <sizes...>        objects obj-1k, obj-64k, obj-1m under <work>/origin/data-bucket
#   origin_conf <work> <port> [directives] nginx config serving <work>/origin at <port>
#   yata_yaml <port> <origin port> [extra]  a one-worker yatagarasu config for /data -> the origin
#   haproxy_cfg <port> <origin port> [global lines]  HAProxy proxying /data to the origin

make_objects() {
  local work=$1 s n
  shift
  mkdir -p "$work/origin/data-bucket" "$work/logs"
  for s in "$@"; do
    case $s in 1k) n=1024;; 64k) n=65536;; 1m) n=1048576;; 64m) n=67108864;; esac
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
  enabled: false
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
