#!/usr/bin/env bash
# Builds the Debian package with dpkg-deb (Debian's own tool) from a staged
# tree: the binary, /etc/yatagarasu/config.yaml as a conffile, the systemd
# unit, and maintainer scripts that add the `yatagarasu` system user.
#
#   bash deploy/debian/build.sh [binary] [output.deb]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${1:-$ROOT/target/release/yatagarasu}
OUT=${2:-$ROOT/target/yatagarasu.deb}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)
ARCH=$(dpkg --print-architecture)
STAGE=$(mktemp -d)
chmod 0755 "$STAGE"
trap 'rm -rf "$STAGE"' EXIT
install -D -m 0755 "$BIN" "$STAGE/usr/bin/yatagarasu"
install -D -m 0644 "$ROOT/deploy/debian/config.yaml" "$STAGE/etc/yatagarasu/config.yaml"
install -D -m 0644 "$ROOT/deploy/systemd/yatagarasu.service" "$STAGE/lib/systemd/system/yatagarasu.service"
mkdir -p "$STAGE/DEBIAN"
cat >"$STAGE/DEBIAN/control" <<CONTROL
Package: yatagarasu
Version: $VERSION
Architecture: $ARCH
Maintainer: yatagarasu developers <yatagarasu@localhost>
Depends: adduser
Section: net
Priority: optional
Description: read-only S3 origin proxy with replica failover
 Routes path prefixes to S3 buckets, signs with SigV4, streams objects back,
 fails over between replicas and caches in memory and on disk.
CONTROL
echo "/etc/yatagarasu/config.yaml" >"$STAGE/DEBIAN/conffiles"
cat >"$STAGE/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if ! getent passwd yatagarasu >/dev/null; then
    adduser --system --group --no-create-home --home /var/cache/yatagarasu yatagarasu
  fi
  install -d -m 0700 -o yatagarasu -g yatagarasu /var/cache/yatagarasu
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
    systemctl enable yatagarasu.service >/dev/null || true
  fi
fi
SCRIPT
cat >"$STAGE/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
  systemctl stop yatagarasu.service >/dev/null || true
  systemctl disable yatagarasu.service >/dev/null || true
fi
SCRIPT
cat >"$STAGE/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
  rm -rf /var/cache/yatagarasu
  if getent passwd yatagarasu >/dev/null; then
    deluser --system yatagarasu >/dev/null || true
  fi
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null || true
fi
SCRIPT
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"
mkdir -p "$(dirname "$OUT")"
# DEB_COMPRESSION=gzip (or none) for quick test builds; xz by default.
dpkg-deb --root-owner-group -Z"${DEB_COMPRESSION:-xz}" --build "$STAGE" "$OUT" >/dev/null
echo "$OUT"
