#!/usr/bin/env python3
"""Latency at fixed offered load: oha -q at 25/50/75% of each target's peak.

usage: offered_load.py runs.csv name:port ...
Peak = median 1 KiB requests/s of that target in runs.csv. Prints CSV.
"""
import csv
import json
import statistics
import subprocess
import sys

runs = list(csv.DictReader(open(sys.argv[1])))
print("target,pct,rate,p50_ms,p99_ms,p999_ms,success")
for spec in sys.argv[2:]:
    name, port = spec.split(":")
    rs = [r for r in runs if r["target"] == name and r["size"] == "1k" and r["requests"]]
    if not rs:
        continue
    peak = statistics.median(int(r["requests"]) / (int(r["duration_us"]) / 1e6) for r in rs)
    for pct in (25, 50, 75):
        rate = int(peak * pct / 100)
        out = subprocess.run(
            ["oha", "-z", "8s", "-q", str(rate), "-c", "32", "--no-tui", "--output-format", "json",
             f"http://127.0.0.1:{port}/data/obj-1k"],
            capture_output=True, text=True)
        try:
            d = json.loads(out.stdout)
            p = d["latencyPercentiles"]
            print(f"{name},{pct},{rate},{p['p50'] * 1000:.3f},{p['p99'] * 1000:.3f},{p['p99.9'] * 1000:.3f},"
                  f"{d['summary']['successRate']:.4f}", flush=True)
        except (ValueError, KeyError, TypeError):
            print(f"{name},{pct},{rate},,,,", flush=True)
