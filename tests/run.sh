#!/usr/bin/env bash
# The test command: installs what the suite needs (s3s-fs, redis-server,
# promtool, libvips-tools, moto,
# kubernetes-validate) when missing, validates the Kubernetes manifests,
# checks formatting and lints, then runs every test on the default driver
# (io_uring where the kernel allows), the process tests again on epoll, and
# finally the tutorial demo (needs ports 8080, 9090, 9001 and 9002 free).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if ! command -v s3s-fs >/dev/null 2>&1; then
  echo "== installing s3s-fs 0.14.1"
  cargo install s3s-fs@0.14.1 --features binary --locked
fi
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "== installing redis-server and redis-tools"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "== installing prometheus (promtool)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if ! command -v vipsheader >/dev/null 2>&1 || ! fc-list 2>/dev/null | grep -qi dejavu; then
  echo "== installing libvips-tools (libvips for image transforms, the vips tools that check them) and a font"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libvips-tools fonts-dejavu-core fontconfig >/dev/null
fi
if ! python3 -c 'import moto.server' >/dev/null 2>&1; then
  echo "== installing moto"
  python3 -m pip install --quiet 'moto[server]'
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
  echo "== installing kubernetes-validate"
  python3 -m pip install --quiet kubernetes-validate
fi

echo "== Kubernetes manifests (base, overlays, ServiceMonitor) against their schemas (offline)"
bash deploy/k8s/validate.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo clippy: the load-test tools (bare forwarder, send methods)"
cargo clippy --features loadtest --bins -- -D warnings

echo "== tests (driver: auto)"
cargo test --lib --bins --tests -- --test-threads=4
echo "== benches compile and run once (criterion test mode)"
cargo test --benches
echo "== process tests again on the epoll driver"
YATAGARASU_DRIVER=epoll cargo test --test core --test ha --test hostile --test seams --test cache --test cache_disk --test cache_slices --test cache_redis --test access --test auth --test authz --test images --test audit --test prewarm --test traces --test credentials --test reload --test tls --test pipe_budget --test upgrade -- --test-threads=4
echo "== the HA tutorial demo (tests/demo.sh)"
HEALTH_WAIT=${HEALTH_WAIT:-10} bash tests/demo.sh
