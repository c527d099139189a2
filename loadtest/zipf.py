#!/usr/bin/env python3
"""The shield benchmark's parts (issue #23), driven by loadtest/zipf.sh.

  zipf.py objects DIR N SEED          N objects obj-<i> in DIR, log-normal sizes
                                      (median 32 KiB, sigma 1.5, 256 B to 8 MiB);
                                      DIR/manifest.tsv: name, length, CRC-32
  zipf.py trace N REQUESTS ALPHA SEED a fixed-seed request trace on stdout: one
                                      object name per line, Zipf(ALPHA) popularity
                                      over a seeded shuffle of the N objects
  zipf.py lru MANIFEST TRACE BYTES    request and byte hit ratios of an exact LRU
                                      of BYTES on the trace (the reference)
  zipf.py replay PORTS PREFIX MANIFEST TRACE FROM TO CLIENTS
                                      replays trace lines [FROM, TO) through
                                      http://127.0.0.1:PORT/PREFIX/<name> with
                                      CLIENTS keep-alive connections (spread
                                      over PORTS, comma-separated), checking
                                      every body's length and CRC-32; prints
                                      "requests bytes errors"
  zipf.py burst PORT PATH LENGTH CRC CLIENTS
                                      CLIENTS connections, opened first, send
                                      one GET each at once; prints each
                                      client's first-byte and completion times
                                      (ms) and a summary line; checks bodies
  zipf.py origin LOG                  "requests bytes" from an nginx access log
                                      written with log_format zipf
                                      ('$request_uri $status $body_bytes_sent')
"""
import collections
import http.client
import os
import random
import socket
import sys
import threading
import time
import zlib

MEDIAN = 32 * 1024
SIGMA = 1.5
SMALLEST = 256
LARGEST = 8 << 20


def objects(dirname, n, seed):
    rng = random.Random(seed)
    os.makedirs(dirname, exist_ok=True)
    with open(os.path.join(dirname, "manifest.tsv"), "w") as manifest:
        for i in range(n):
            size = int(rng.lognormvariate(0, SIGMA) * MEDIAN)
            size = max(SMALLEST, min(LARGEST, size))
            body = rng.randbytes(size)
            name = f"obj-{i}"
            with open(os.path.join(dirname, name), "wb") as f:
                f.write(body)
            manifest.write(f"{name}\t{size}\t{zlib.crc32(body)}\n")


def load_manifest(path):
    out = {}
    with open(path) as f:
        for line in f:
            name, size, crc = line.split("\t")
            out[name] = (int(size), int(crc))
    return out


def trace(n, requests, alpha, seed):
    rng = random.Random(seed)
    ranks = list(range(n))
    rng.shuffle(ranks)  # rank -> object: popularity is not name order
    weights = [1.0 / (r + 1) ** alpha for r in range(n)]
    out = sys.stdout
    for i in rng.choices(range(n), weights=weights, k=requests):
        out.write(f"obj-{ranks[i]}\n")


def lru(manifest, trace_path, budget):
    sizes = load_manifest(manifest)
    held = collections.OrderedDict()
    used = hits = hit_bytes = reqs = total = 0
    for line in open(trace_path):
        name = line.strip()
        size = sizes[name][0]
        reqs += 1
        total += size
        if name in held:
            held.move_to_end(name)
            hits += 1
            hit_bytes += size
            continue
        if size > budget:
            continue
        held[name] = size
        used += size
        while used > budget:
            _, s = held.popitem(last=False)
            used -= s
    print(f"{hits / reqs:.3f} {hit_bytes / total:.3f}")


def replay(ports, prefix, manifest, trace_path, start, end, clients):
    sizes = load_manifest(manifest)
    names = [line.strip() for line in open(trace_path)][start:end]
    lock = threading.Lock()
    state = {"next": 0, "bytes": 0, "errors": 0, "requests": 0}

    def take():
        with lock:
            i = state["next"]
            state["next"] += 1
        return names[i] if i < len(names) else None

    def client(port):
        conn = None
        done = errors = nbytes = 0
        while True:
            name = take()
            if name is None:
                break
            size, crc = sizes[name]
            for attempt in range(2):
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                    conn.request("GET", f"/{prefix}/{name}")
                    r = conn.getresponse()
                    body = r.read()
                    ok = r.status == 200 and len(body) == size and zlib.crc32(body) == crc
                    if not ok:
                        errors += 1
                        sys.stderr.write(f"{name}: status {r.status}, {len(body)} of {size} bytes\n")
                    if r.getheader("connection", "").lower() == "close":
                        conn.close()
                        conn = None
                    nbytes += len(body)
                    break
                except (OSError, http.client.HTTPException) as e:
                    # A kept-alive connection the server closed: retry once.
                    if conn is not None:
                        conn.close()
                    conn = None
                    if attempt == 1:
                        errors += 1
                        sys.stderr.write(f"{name}: {e}\n")
            done += 1
        with lock:
            state["requests"] += done
            state["errors"] += errors
            state["bytes"] += nbytes

    threads = [threading.Thread(target=client, args=(ports[i % len(ports)],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(state["requests"], state["bytes"], state["errors"])


def burst(port, path, length, crc, clients):
    """One thread, epoll: a client's first byte is timed when the poller
    first reports its socket readable (all reported at once are stamped
    before any is read), so the tool's own pace does not delay the figure;
    bodies are checked with a running CRC-32, never held."""
    import selectors

    sel = selectors.DefaultSelector()
    state = {}
    for i in range(clients):
        s = socket.create_connection(("127.0.0.1", port), timeout=300)
        s.setblocking(False)
        state[s] = {"i": i, "head": b"", "in_body": False, "n": 0, "crc": 0, "first": None, "end": None, "ok": False}
    req = f"GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode()
    start = time.monotonic()
    for s in state:
        s.sendall(req)
        sel.register(s, selectors.EVENT_READ)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    left = clients
    while left:
        events = sel.select(timeout=300)
        if not events:
            break
        now = time.monotonic()
        for key, _ in events:
            st = state[key.fileobj]
            if st["first"] is None:
                st["first"] = now - start
        for key, _ in events:
            s = key.fileobj
            st = state[s]
            try:
                n = s.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if n == 0:
                st["end"] = time.monotonic() - start
                st["ok"] = st["in_body"] and st["n"] == length and st["crc"] == crc
                sel.unregister(s)
                s.close()
                left -= 1
                continue
            chunk = view[:n]
            if not st["in_body"]:
                st["head"] += bytes(chunk)
                at = st["head"].find(b"\r\n\r\n")
                if at < 0:
                    continue
                st["in_body"] = st["head"].startswith(b"HTTP/1.1 200")
                chunk = memoryview(st["head"][at + 4 :])
            st["n"] += len(chunk)
            st["crc"] = zlib.crc32(chunk, st["crc"])
    results = [(st["first"] or 0.0, st["end"] or 0.0, st["ok"]) for st in state.values()]
    firsts = sorted(r[0] * 1000 for r in results)
    ends = sorted(r[1] * 1000 for r in results)
    bad = sum(1 for r in results if not r[2])
    print(
        f"clients {clients} complete {clients - bad} "
        f"first_byte_ms median {firsts[len(firsts) // 2]:.0f} last {firsts[-1]:.0f} "
        f"done_ms median {ends[len(ends) // 2]:.0f} last {ends[-1]:.0f}"
    )


def origin(log):
    reqs = nbytes = 0
    try:
        for line in open(log):
            parts = line.split()
            if len(parts) >= 3:
                reqs += 1
                nbytes += int(parts[2])
    except FileNotFoundError:
        pass
    print(reqs, nbytes)


def main(argv):
    cmd = argv[1]
    if cmd == "objects":
        objects(argv[2], int(argv[3]), int(argv[4]))
    elif cmd == "trace":
        trace(int(argv[2]), int(argv[3]), float(argv[4]), int(argv[5]))
    elif cmd == "lru":
        lru(argv[2], argv[3], int(argv[4]))
    elif cmd == "replay":
        replay([int(p) for p in argv[2].split(",")], argv[3], argv[4], argv[5], int(argv[6]), int(argv[7]), int(argv[8]))
    elif cmd == "burst":
        burst(int(argv[2]), argv[3], int(argv[4]), int(argv[5]), int(argv[6]))
    elif cmd == "origin":
        origin(argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
