#!/usr/bin/env python3
"""Renders scripts/bench-cluster's raw results as the "Scale-out over Redis" section (markdown).

Usage: bench-cluster-report.py RESULTS_DIR NODES PER_NODE RUNS ELAPSED_SECS
"""
import glob
import json
import os
import platform
import statistics
import subprocess
import sys

results, nodes, per_node, runs, elapsed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
out = []
w = out.append


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "?"


def fmt(x, digits=0):
    if x is None:
        return "n/a"
    if isinstance(x, float) and digits:
        return f"{x:,.{digits}f}"
    return f"{round(x):,}"


def load(case):
    """Each run of a case: its report, samples (per node: max sessions, max RSS), node totals."""
    found = []
    for path in sorted(glob.glob(os.path.join(results, f"{case}.*.json"))):
        stem = path[: -len(".json")]
        try:
            with open(path) as f:
                report = json.load(f)
        except (OSError, ValueError):
            report = None
        peaks = {}
        if os.path.exists(stem + ".samples"):
            with open(stem + ".samples") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) != 4:
                        continue
                    _, who, rss, sessions = parts
                    p = peaks.setdefault(who, {"rss": 0, "sessions": 0})
                    p["rss"] = max(p["rss"], int(rss or 0))
                    if sessions.replace(".", "").isdigit():
                        p["sessions"] = max(p["sessions"], int(float(sessions)))
        totals = {}
        if os.path.exists(stem + ".nodes"):
            with open(stem + ".nodes") as f:
                for line in f:
                    who, first, second = line.split()
                    totals[who] = (first, float(second or 0)) if who == "redis" else (first, int(second or 0))
        secs = None
        if os.path.exists(stem + ".secs"):
            with open(stem + ".secs") as f:
                secs = int(f.read().strip() or 0)
        found.append({"report": report, "peaks": peaks, "totals": totals, "secs": secs})
    return found


def get(report, dotted):
    cur = report
    for key in dotted.split("."):
        if not isinstance(cur, dict) or cur.get(key) is None:
            return None
        cur = cur[key]
    return cur


def cell(found, fn, digits=0):
    values = [v for v in (fn(r) for r in found) if v is not None]
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med, digits)
    return f"{fmt(med, digits)} ({fmt(min(values), digits)}–{fmt(max(values), digits)})"


node_names = [f"node{i}" for i in range(1, nodes + 1)]
cases = {case: load(case) for case in ("broadcast", "unicast")}

w("## Scale-out over Redis\n")
w(f"Measured by `scripts/bench-cluster` ({nodes} nodes × {per_node:,} sessions, {runs} run(s) per case, "
  f"{elapsed // 60} min {elapsed % 60} s in total). {nodes} Herald release processes "
  "(`engine.kind = \"redis\"`, `auth.insecure = true`, default config otherwise, each its own store path and port) "
  f"share one `redis-server` (`appendonly yes`, `appendfsync {os.environ.get('REDIS_FSYNC', 'always')}`), everything on this machine's loopback, "
  "together with `herald-bench` (which starts its own worker processes above 19,000 sessions). "
  "Sessions are spread round-robin over the nodes and over source addresses (25,000 per address); "
  "publisher connections round-robin over the nodes, so most publishes reach their subscribers through another node and Redis. "
  "Redis and the nodes are started fresh for every run. "
  f"With several runs a cell is the median of the {runs} runs with (min–max) after it.\n")
cpu_model = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")
ram_gib = sh("free -g | awk '/Mem:/ {print $2}'")
redis_version = sh("redis-server --version | cut -d' ' -f3")
open_files = sh("ulimit -n")
w(f"- Machine: {os.cpu_count()} cores ({cpu_model}), {ram_gib} GiB RAM, Linux {platform.release()}, "
  f"open-file limit {open_files} per process; Redis {redis_version}")
w(f"- Load average when the run began: {os.environ.get('LOAD_BEFORE', '?')} (the machine is shared with other work; "
  "the nodes, Redis and the load generator all run on the same 2 cores)\n")

rows = [
    ("sessions connected (herald-bench)", lambda r: get(r["report"], "connect.connected")),
    ("sessions attempted", lambda r: get(r["report"], "connect.attempted")),
    ("connects/s", lambda r: get(r["report"], "connect.per_sec")),
]
for name in node_names:
    rows.append((f"{name}: sessions held (peak of /metrics)", lambda r, n=name: r["peaks"].get(n, {}).get("sessions")))
rows += [
    ("publishes/s (sent)", lambda r: get(r["report"], "publish.per_sec")),
    ("publishes accepted (2xx)", lambda r: get(r["report"], "publish.accepted")),
    ("delivered msgs/s", lambda r: get(r["report"], "delivery.per_sec")),
    ("delivered msgs", lambda r: get(r["report"], "delivery.delivered")),
    ("missing / duplicate", None),
    ("latency p50 (ms)", lambda r: (get(r["report"], "latency_us.p50") or 0) / 1000 if get(r["report"], "latency_us.p50") is not None else None),
    ("latency p99 (ms)", lambda r: (get(r["report"], "latency_us.p99") or 0) / 1000 if get(r["report"], "latency_us.p99") is not None else None),
    ("all nodes' CPU (% of a core)", lambda r: get(r["report"], "server.cpu_pct_of_core")),
    ("all nodes' RSS, connected (KiB)", lambda r: get(r["report"], "server.rss_connected_kib")),
    ("RSS per connection, all nodes (bytes)", lambda r: get(r["report"], "server.rss_per_connection_bytes")),
]
for name in node_names:
    rows.append((f"{name}: peak RSS (KiB, VmHWM)", lambda r, n=name: r["totals"].get(n, (None, None))[1] or None))
rows += [
    ("redis-server: peak RSS sampled (KiB)", lambda r: r["peaks"].get("redis", {}).get("rss") or None),
    ("redis-server: CPU over its life (s)", lambda r: r["totals"].get("redis", (None, None))[1]),
    ("herald-bench run, wall time (s)", lambda r: r["secs"]),
]

w("| | broadcast (maximum rate) | unicast (maximum rate, durable in Redis) |")
w("|---|---|---|")
for label, fn in rows:
    if fn is None:
        cells = []
        for case in cases.values():
            m = [get(r["report"], "delivery.missing") for r in case]
            d = [get(r["report"], "delivery.duplicates") for r in case]
            cells.append(f"{sum(x or 0 for x in m)} / {sum(x or 0 for x in d)}" if case and any(r["report"] for r in case) else "n/a")
        w(f"| {label} | " + " | ".join(cells) + " |")
        continue
    digits = 2 if "(ms)" in label or "CPU over" in label else 1 if label.startswith("publishes/s") else 0
    w(f"| {label} | " + " | ".join(cell(case, fn, digits) for case in cases.values()) + " |")
w("")

problems = []
for case, found in cases.items():
    for i, r in enumerate(found, 1):
        if r["report"] is None:
            problems.append(f"{case} run {i}: herald-bench produced no report (failed or hit the time bound)")
        else:
            problems += [f"{case} run {i}: {p}" for p in r["report"].get("problems", [])]
            statuses = get(r["report"], "publish.statuses")
            if statuses and any(not k.startswith("2") for k in statuses):
                problems.append(f"{case} run {i}: publish statuses {statuses}")
w("Correctness: " + ("every session connected, every publish accepted, nothing missing, nothing duplicated.\n" if not problems else ""))
for p in problems:
    w(f"- {p}")
if problems:
    w("")

w("Exact commands (`<N>`: a fresh source-address block per run; `--server-pid` once per node):\n")
w("```")
with open(os.path.join(results, "commands.txt")) as f:
    w(f.read().rstrip())
w("```\n")
print("\n".join(out))
