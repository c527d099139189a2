#!/usr/bin/env python3
"""RSS of each proxy with N idle keep-alive client connections.

usage: idle_conns.py N name:port:pid ...
Opens N connections to each target, makes one 1 KiB request on each (so every
connection is a live keep-alive connection), leaves them idle, and prints the
target's resident memory (all its processes) before and after, in KiB.
With IDLE_TLS=1 in the environment the connections are TLS (no
verification: the certificate is the script's own).
"""
import os
import resource
import ssl
import socket
import subprocess
import sys
import time


def rss_kib(pid):
    pids = [pid] + subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def main():
    n = int(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n * 2 + 1000), hard))
    print("target,connections,rss_before_kib,rss_idle_kib,per_conn_bytes")
    for spec in sys.argv[2:]:
        name, port, pid = spec.split(":")
        before = rss_kib(int(pid))
        socks = []
        req = b"GET /data/obj-1k HTTP/1.1\r\nHost: x\r\n\r\n"
        ctx = None
        if os.environ.get("IDLE_TLS") == "1":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", int(port)))
            if ctx is not None:
                s = ctx.wrap_socket(s)
            s.sendall(req)
            got = b""
            while b"\r\n\r\n" not in got:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            socks.append(s)
        time.sleep(3.5)  # well past the proxy's 100 ms park delay
        after = rss_kib(int(pid))
        per = (after - before) * 1024 // max(n, 1)
        print(f"{name},{n},{before},{after},{per}", flush=True)
        for s in socks:
            s.close()
        time.sleep(1.0)


if __name__ == "__main__":
    main()
