#!/usr/bin/env python3
"""Memory per slow-head and per fresh idle client connection.

Usage: slow_heads.py <proxy pid> <connections> slow|idle
  slow: each connection sends part of a request head and stops (holds the
        head's read buffer until request_head_timeout_seconds);
  idle: each connection connects and sends nothing.
Run the proxy with one worker, listening on 127.0.0.1:18080 and a
request_head_timeout_seconds longer than the measurement.
"""
import socket, sys, time, os
pid = int(sys.argv[1]); n = int(sys.argv[2]); mode = sys.argv[3]
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
time.sleep(0.5)
base = rss()
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", 18080))
    if mode == "slow":
        s.send(b"GET /b/k HTTP/1.1\r\nHost: x\r\nX-Slow: aaaa")
    socks.append(s)
time.sleep(2)
after = rss()
print(f"{mode}: {n} connections: RSS {base} KiB -> {after} KiB, {(after-base)/n:.2f} KiB each")
