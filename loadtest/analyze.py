#!/usr/bin/env python3
"""Aggregates loadtest/results/runs.csv into results.md and chart.png."""
import csv
import os
import statistics
import subprocess
import sys
from collections import defaultdict

out = sys.argv[1]
rows = list(csv.DictReader(open(os.path.join(out, "runs.csv"))))
SIZES = [s for s in ["1k", "64k", "1m", "64m"] if any(r["size"] == s for r in rows)]
ORDER = ["origin", "bare", "yatagarasu", "splice", "yatagarasu2w", "nginx", "haproxy"]
MIB = {"1k": 1 / 1024, "64k": 1 / 16, "1m": 1, "64m": 64}

agg = defaultdict(dict)
for size in SIZES:
    for t in ORDER:
        rs = [r for r in rows if r["size"] == size and r["target"] == t and r["requests"]]
        if not rs:
            continue
        reqs = [int(r["requests"]) for r in rs]
        secs = [int(r["duration_us"]) / 1e6 for r in rs]
        rps = statistics.median(q / s for q, s in zip(reqs, secs))
        mibps = statistics.median(int(r["bytes"]) / (int(r["duration_us"]) / 1e6) / 2**20 for r in rs)
        cpu = [float(r["cpu_s"]) for r in rs]
        cpu_per_req_us = statistics.median(c * 1e6 / q for c, q in zip(cpu, reqs))
        agg[size][t] = dict(
            rps=rps,
            mibps=mibps,
            p50=statistics.median(int(r["p50_us"]) for r in rs) / 1000,
            p99=statistics.median(int(r["p99_us"]) for r in rs) / 1000,
            p999=statistics.median(int(r["p999_us"]) for r in rs) / 1000,
            errors=sum(int(r["errors"]) for r in rs),
            cpu_us=cpu_per_req_us,
            cpu_100k=cpu_per_req_us * 1e5 / 1e6,
            cpu_ms_mib=cpu_per_req_us / 1000 / MIB[size],
            rss=max(int(r["peak_rss_kib"]) for r in rs) / 1024,
        )


def ratio(a, b):
    return f"{a / b:.2f}x" if b else "-"


lines = ["# Load test results", ""]
lines.append("Machine: " + subprocess.run(["sh", "-c", "nproc; uname -sr; grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                                          capture_output=True, text=True).stdout.replace("\n", " | ").strip(" |"))
lines.append("")
lines.append("One worker per proxy; wrk -t1 (32 connections; 16 for 1 MiB; 4 for 64 MiB) on the same 2 cores as the "
             "proxy and the origin, so requests/s follow each proxy's CPU cost per request. Origin: nginx serving "
             "files (sendfile), measured directly as the limit. `bare` is loadtest/bare_forwarder.rs (same runtime "
             "and pumps, no signing/routing/breakers/metrics/logs). `yatagarasu` copies bodies (`zero_copy: off`), `splice` is the same proxy with `zero_copy: on`; `yatagarasu2w` is yatagarasu with 2 workers. "
             "Medians over the rounds; CPU from /proc utime+stime of every process of the target.")
lines.append("")
for size in SIZES:
    lines.append(f"## {size}")
    lines.append("")
    lines.append("| target | req/s | MiB/s | p50 ms | p99 ms | p99.9 ms | errors | CPU us/req | CPU s/100k req | CPU ms/MiB | peak RSS MiB |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for t in ORDER:
        a = agg[size].get(t)
        if not a:
            continue
        lines.append(f"| {t} | {a['rps']:.0f} | {a['mibps']:.1f} | {a['p50']:.2f} | {a['p99']:.2f} | {a['p999']:.2f} | "
                     f"{a['errors']} | {a['cpu_us']:.1f} | {a['cpu_100k']:.2f} | {a['cpu_ms_mib']:.2f} | {a['rss']:.1f} |")
    y, n, h, b, sp = (agg[size].get(k) for k in ["yatagarasu", "nginx", "haproxy", "bare", "splice"])
    if y and n and h:
        lines.append("")
        lines.append(f"yatagarasu vs nginx: req/s {ratio(y['rps'], n['rps'])}, CPU/req {ratio(y['cpu_us'], n['cpu_us'])}, "
                     f"p99 {ratio(y['p99'], n['p99'])}; vs haproxy: req/s {ratio(y['rps'], h['rps'])}, "
                     f"CPU/req {ratio(y['cpu_us'], h['cpu_us'])}"
                     + (f"; vs bare forwarder: CPU/req {ratio(y['cpu_us'], b['cpu_us'])}" if b else ""))
    if y and sp:
        lines.append("")
        lines.append(f"splice vs copy: MiB/s {ratio(sp['mibps'], y['mibps'])}, CPU/req {ratio(sp['cpu_us'], y['cpu_us'])}, p99 {ratio(sp['p99'], y['p99'])}")
    lines.append("")

idle = os.path.join(out, "idle.csv")
if os.path.exists(idle):
    lines += ["## 10k idle keep-alive client connections", "", "| target | connections | RSS before KiB | RSS idle KiB | bytes/conn |", "|---|---|---|---|---|"]
    for r in csv.DictReader(open(idle)):
        lines.append(f"| {r['target']} | {r['connections']} | {r['rss_before_kib']} | {r['rss_idle_kib']} | {r['per_conn_bytes']} |")
    lines.append("")
offered = os.path.join(out, "offered.csv")
if os.path.exists(offered):
    lines += ["## Latency at fixed offered load (1 KiB, oha -q)", "", "| target | % of its peak | rate req/s | p50 ms | p99 ms | p99.9 ms |", "|---|---|---|---|---|---|"]
    for r in csv.DictReader(open(offered)):
        lines.append(f"| {r['target']} | {r['pct']} | {r['rate']} | {r['p50_ms']} | {r['p99_ms']} | {r['p999_ms']} |")
    lines.append("")

# Targets from the performance issue, evaluated on this run.
def get(size, t, k):
    return agg.get(size, {}).get(t, {}).get(k)


checks = []


def check(name, value, goal, ok, note):
    if value is None:
        return
    checks.append(f"| {name} | {value} | {goal} | {'met' if ok else 'missed'} | {note} |")


y1, n1, h1, b1 = (agg.get("1k", {}).get(t) for t in ["yatagarasu", "nginx", "haproxy", "bare"])
if y1 and n1 and h1:
    r = y1["cpu_us"] / n1["cpu_us"]
    check("1 KiB CPU/request vs nginx", f"{r:.2f}x", "<= 0.70x", r <= 0.7,
          "kernel TCP work (two sockets per request) dominates both; see Limits")
    r = y1["rps"] / n1["rps"]
    check("1 KiB req/s vs nginx", f"{r:.2f}x", ">= 1.10x", r >= 1.1, "")
    r = y1["rps"] / h1["rps"]
    check("1 KiB req/s vs HAProxy", f"{r:.2f}x", ">= 1.10x", r >= 1.1, "")
for size in ["1m", "64m"]:
    best = None
    for t in ["yatagarasu", "splice"]:
        a = agg.get(size, {}).get(t)
        if a and (best is None or a["cpu_ms_mib"] < best[1]["cpu_ms_mib"]):
            best = (t, a)
    n = agg.get(size, {}).get("nginx")
    if best and n:
        r = best[1]["cpu_ms_mib"] / n["cpu_ms_mib"]
        check(f"{size} CPU/MiB vs nginx ({best[0]})", f"{r:.2f}x", "<= 0.60x", r <= 0.6, "")
        r = best[1]["mibps"] / n["mibps"]
        check(f"{size} MiB/s vs nginx ({best[0]})", f"{r:.2f}x", ">= 1.20x", r >= 1.2, "")
if y1 and b1:
    for size in SIZES:
        y, b = get(size, "yatagarasu", "cpu_us"), get(size, "bare", "cpu_us")
        if y and b:
            r = y / b
            check(f"{size} full proxy CPU vs bare forwarder", f"{r:.2f}x", "<= 1.15x", r <= 1.15,
                  "signing, routing, breakers, metrics and the access log")
if os.path.exists(os.path.join(out, "offered.csv")):
    rows_o = list(csv.DictReader(open(os.path.join(out, "offered.csv"))))
    yo = [r for r in rows_o if r["target"] == "yatagarasu" and r["pct"] == "50" and r["p99_ms"]]
    no = [r for r in rows_o if r["target"] == "nginx" and r["pct"] == "50" and r["p99_ms"]]
    if yo and no:
        a, b = float(yo[0]["p99_ms"]), float(no[0]["p99_ms"])
        check("p99 at 50% of peak vs nginx", f"{a:.3f} vs {b:.3f} ms", "<= nginx", a <= b, "")
if os.path.exists(idle):
    for r in csv.DictReader(open(idle)):
        if r["target"] == "yatagarasu":
            mib = int(r["rss_idle_kib"]) / 1024
            per = int(r["per_conn_bytes"]) / 1024
            check("RSS with 10k idle keep-alive clients", f"{mib:.0f} MiB", "<= 64 MiB", mib <= 64,
                  f"about {per:.1f} KiB per connection: task and stream state; buffers go back to a per-core pool 100 ms into idleness")
y2, y1w = get("1k", "yatagarasu2w", "rps"), get("1k", "yatagarasu", "rps")
if y2 and y1w:
    checks.append(f"| 2 workers vs 1 (1 KiB) | {y2 / y1w:.2f}x req/s | reported | - | wrk and the origin need the same two cores |")
if checks:
    lines += ["## Targets", "", "| target | measured | goal | result | note |", "|---|---|---|---|---|"] + checks + [""]
limits = os.path.join(os.path.dirname(os.path.abspath(__file__)), "LIMITS.md")
if os.path.exists(limits):
    lines += [open(limits).read().strip(), ""]

with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

# Chart: requests/s and p99 per size per target.
targets = [t for t in ORDER if any(t in agg[s] for s in SIZES)]
dat = os.path.join(out, "chart.dat")
with open(dat, "w") as f:
    f.write("size " + " ".join(f"{t} {t}" for t in targets) + "\n")
    for s in SIZES:
        f.write(s + " " + " ".join(f"{agg[s].get(t, {}).get('rps', 0):.1f} {agg[s].get(t, {}).get('p99', 0):.3f}" for t in targets) + "\n")
plot = f"""
set terminal pngcairo size 1400,600 font ',10' noenhanced
set output '{os.path.join(out, 'chart.png')}'
set multiplot layout 1,2 title 'yatagarasu vs nginx vs haproxy (1 worker each, same machine)'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set key outside bottom center horizontal
set logscale y
set grid ytics
set title 'requests/s (log scale)'
plot for [i=0:{len(targets) - 1}] '{dat}' using 2*i+2:xtic(1) title columnheader(2*i+2)
set title 'p99 latency, ms (log scale)'
plot for [i=0:{len(targets) - 1}] '{dat}' using 2*i+3:xtic(1) title columnheader(2*i+3)
unset multiplot
"""
subprocess.run(["gnuplot"], input=plot, text=True, check=False)
print(open(os.path.join(out, "results.md")).read())
