#!/usr/bin/env bash
# Assembles the root filesystem of a FROM scratch image, for building where
# no registry can be reached (Dockerfile.scratch): the given binaries in
# /usr/local/bin, the shared libraries they link (as ldd lists them), the
# system's CA bundle (TLS to S3), the NSS modules and nsswitch.conf (host
# names), and a yatagarasu user and group (10001).
#
#   deploy/docker/rootfs.sh <out dir> <binary>...
set -euo pipefail
out=$1
shift
mkdir -p "$out/usr/local/bin" "$out/etc/ssl/certs" "$out/etc/yatagarasu" "$out/tmp" "$out/data"
for bin in "$@"; do
  cp "$bin" "$out/usr/local/bin/"
  ldd "$bin" | awk '/=> \// { print $3 } /^[[:space:]]*\// { print $1 }' | while read -r lib; do
    install -D -m 0755 "$lib" "$out$lib"
  done
done
# Name resolution (the replicas' and Redis's host names): glibc loads the
# NSS modules at run time, so ldd does not list them.
for lib in /lib/x86_64-linux-gnu/libnss_dns.so.2 /lib/x86_64-linux-gnu/libnss_files.so.2 \
  /lib/x86_64-linux-gnu/libresolv.so.2; do
  [ -f "$lib" ] && install -D -m 0755 "$lib" "$out$lib"
done
printf 'hosts: files dns\n' >"$out/etc/nsswitch.conf"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/"
fi
printf 'root:x:0:0:root:/:/sbin/nologin\nyatagarasu:x:10001:10001::/:/sbin/nologin\n' >"$out/etc/passwd"
printf 'root:x:0:\nyatagarasu:x:10001:\n' >"$out/etc/group"
chmod 1777 "$out/tmp"
chmod 0777 "$out/data"
