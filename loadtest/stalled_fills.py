#!/usr/bin/env python3
"""Resident memory with N clients that read a response head and stop (issue #21).

usage: stalled_fills.py [yatagarasu binary] [clients] [object MiB]

Starts a threaded origin on loopback serving distinct cacheable objects
(ETag, Content-Length), then the proxy three times, one worker each:
  - cache off;
  - memory tier 16 MiB, items up to 8 MiB (the issue's measurement);
  - memory tier 256 MiB, items up to 8 MiB.
Each run opens N clients with a 4 KiB receive buffer, each asking for its
own object, reading nothing. Once the origin has handed every body to the
proxy (its sends completed), it prints the proxy's VmRSS and VmHWM, the
cache's bound and fill budget, and what is left per stalled client:
(RSS - RSS with no client - bound - fill budget) / N, floored at 0.
Every process it starts is stopped by PID.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/yatagarasu"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 24
SIZE = (int(sys.argv[3]) if len(sys.argv) > 3 else 6) << 20
MIB = 1 << 20


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Origin:
    """GET /<bucket>/<key> -> SIZE bytes derived from the key, with an ETag."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.sent = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, buf = buf.split(b"\r\n\r\n", 1)
                target = head.split(b" ")[1]
                seed = sum(target) % 251
                body = bytes([seed]) * SIZE
                c.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nETag: \"%d\"\r\n\r\n"
                    % (SIZE, seed)
                    + body
                )
                with self.lock:
                    self.sent += 1
        except OSError:
            return


def status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run(origin, cache):
    port, mport = free_port(), free_port()
    cfg = (
        f'server:\n  address: "127.0.0.1:{port}"\n  workers: 1\n'
        f"metrics:\n  enabled: true\n  port: {mport}\n"
        f"{cache}"
        'buckets:\n  - name: "b"\n    path_prefix: "/b"\n    s3:\n      bucket: "bkt"\n'
        f'      endpoint: "http://127.0.0.1:{origin.port}"\n'
        '      access_key: "k"\n      secret_key: "s"\n      health_check:\n        enabled: false\n'
    )
    d = tempfile.mkdtemp()
    path = os.path.join(d, "c.yaml")
    with open(path, "w") as f:
        f.write(cfg)
    log = open(os.path.join(d, "log"), "w")
    p = subprocess.Popen([BIN, "--config", path], stderr=log, stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        base = status(p.pid, "VmRSS")
        before = origin.sent
        clients = []
        tag = time.time_ns()
        for i in range(N):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(f"GET /b/o{tag}-{i} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            clients.append(s)
        # Settled: the origin's sends stop moving for 2 s (sends end when
        # the proxy has read the body, or block when it stopped reading).
        last, still = -1, 0
        while still < 20:
            time.sleep(0.1)
            now = origin.sent
            still = still + 1 if now == last else 0
            last = now
        rss, hwm = status(p.pid, "VmRSS"), status(p.pid, "VmHWM")
        done = origin.sent - before
        for s in clients:
            s.close()
        return base, rss, hwm, done
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main():
    origin = Origin()
    print(f"{N} stalled clients, one distinct {SIZE // MIB} MiB object each; binary {BIN}")
    print("| cache | bound MiB | fill budget MiB | RSS before KiB | RSS after KiB | peak KiB | bodies fully read | per stalled client KiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, bound, item in [("off", 0, 0), ("memory", 16, 8), ("memory", 256, 8)]:
        cache = ""
        budget = 0
        if bound:
            cache = (
                f"cache:\n  enabled: true\n  memory:\n    max_cache_size_mb: {bound}\n"
                f"    max_item_size_mb: {item}\n"
            )
            budget = max(bound // 4, 4 * item)
        base, rss, hwm, done = run(origin, cache)
        left = max(0, rss - base - (bound + budget) * 1024) / N
        print(f"| {name} | {bound} | {budget} | {base} | {rss} | {hwm} | {done} | {left:.0f} |")


if __name__ == "__main__":
    main()
