#!/usr/bin/env python3
"""Turns scripts/bench's herald-bench JSON reports into BENCHMARKS.md (medians, ratios, targets).

Usage: bench-report.py RESULTS_DIR COMMANDS_FILE SIZE RUNS ELAPSED_SECS > BENCHMARKS.md
Every figure printed comes from a report file; a missing figure prints as "n/a".
"""
import glob
import json
import os
import platform
import statistics
import subprocess
import sys

results_dir, commands_file, size, runs, elapsed = sys.argv[1:6]
runs_by = {}
for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    hub, case, _round = os.path.basename(path)[: -len(".json")].rsplit(".", 2)
    try:
        with open(path) as f:
            runs_by.setdefault((hub, case), []).append(json.load(f))
    except (OSError, ValueError):
        runs_by.setdefault((hub, case), [])


def get(report, dotted):
    value = report
    for key in dotted.split("."):
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


def values(hub, case, dotted):
    return [v for v in (get(r, dotted) for r in runs_by.get((hub, case), [])) if v is not None]


def median(hub, case, dotted):
    vs = values(hub, case, dotted)
    return statistics.median(vs) if vs else None


def fmt(v, digits=0):
    if v is None:
        return "n/a"
    if isinstance(v, float) and digits == 0 and abs(v) < 10:
        digits = 2
    return f"{v:,.{digits}f}"


def cell(hub, case, dotted, scale=1.0, digits=0):
    vs = values(hub, case, dotted)
    if not vs:
        return "n/a"
    med = statistics.median(vs) * scale
    if len(vs) == 1:
        return fmt(med, digits)
    return f"{fmt(med, digits)} ({fmt(min(vs) * scale, digits)}–{fmt(max(vs) * scale, digits)})"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def problems(hub, case):
    out = []
    for r in runs_by.get((hub, case), []):
        out.extend(r.get("problems", []))
    return out


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip() or \
            subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stderr.strip()
    except Exception:  # noqa: BLE001 - a missing tool only leaves a blank
        return "?"


HUBS = [("herald", "Herald"), ("nchan", "Nchan"), ("node", "Node ws")]
out = []
w = out.append

cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
mem = sh("free -g | awk '/Mem:/ {print $2}'")
w("# Benchmarks\n")
w("Measured by `scripts/bench` with `herald-bench` (crates/bench). Herald, Nchan and the Node `ws` hub "
  "run one after another on the same machine, each started fresh for every run, alternating round by round. "
  f"Each cell is the **median of {runs} runs**, with (min–max) after it. Nothing here is estimated: a cell "
  "with no measurement says n/a.\n")
w("## Machine\n")
w(f"- {sh('nproc')} cores ({cpu}), {mem} GiB RAM, {platform.system()} {platform.release()}")
w(f"- {sh('rustc --version')}; Herald release build (`lto = \"thin\"`), `auth.insecure = true`, "
  "default config otherwise (2 HTTP workers, heartbeat 20 s / 45 s, embedded store (journal + SQLite) with fsync)")
nchan_version = sh("dpkg-query -W -f='${Version}' libnginx-mod-nchan")
ws_version = sh("node -p \"require('./bench/node-ws-hub/node_modules/ws/package.json').version\"")
w(f"- Nchan: {sh('nginx -v 2>&1')}, libnginx-mod-nchan {nchan_version}, "
  "`worker_processes 1` (bench/nchan/nginx.conf); RSS and CPU are its one worker's")
w(f"- Node {sh('node --version')}, ws {ws_version} (bench/node-ws-hub/hub.js)")
w(f"- Load average when the run began: {os.environ.get('LOAD_BEFORE', '?')}. The load generator shares the "
  "2 cores with the hub under test, and other work may have been running on this machine: read the ratios "
  "(same run, alternating) rather than the absolute figures.")
w(f"- Sizes: `SIZE={size}`, {runs} rounds, {int(elapsed) // 60} min {int(elapsed) % 60} s in total.\n")

w("## Results\n")
w("### idle: connections held, default heartbeat\n")
w("| | " + " | ".join(n for _, n in HUBS) + " |")
w("|---|" + "---|" * len(HUBS))
for label, dotted, scale, digits in [
    ("sessions connected", "connect.connected", 1, 0),
    ("connects/s", "connect.per_sec", 1, 0),
    ("RSS per connection (bytes)", "server.rss_per_connection_bytes", 1, 0),
    ("RSS with all connected (KiB)", "server.rss_connected_kib", 1, 0),
    ("CPU while idle (% of a core)", "server.cpu_pct_of_core", 1, 2),
]:
    w(f"| {label} | " + " | ".join(cell(h, "idle", dotted, scale, digits) for h, _ in HUBS) + " |")
w("")

w("### broadcast: fan-out to every session, maximum rate\n")
w("| | " + " | ".join(n for _, n in HUBS) + " |")
w("|---|" + "---|" * len(HUBS))
for label, dotted, scale, digits in [
    ("sessions", "connect.connected", 1, 0),
    ("broadcasts/s", "publish.per_sec", 1, 0),
    ("delivered msgs/s", "delivery.per_sec", 1, 0),
    ("server CPU per delivered msg (µs)", "server.cpu_us_per_delivered", 1, 2),
    ("server CPU (% of a core)", "server.cpu_pct_of_core", 1, 0),
    ("latency p50 (ms)", "latency_us.p50", 0.001, 2),
    ("latency p99 (ms)", "latency_us.p99", 0.001, 2),
    ("missing / duplicate", None, 1, 0),
]:
    if dotted is None:
        w(f"| {label} | " + " | ".join(
            f"{sum(values(h, 'broadcast', 'delivery.missing'))} / {sum(values(h, 'broadcast', 'delivery.duplicates'))}"
            for h, _ in HUBS) + " |")
        continue
    w(f"| {label} | " + " | ".join(cell(h, "broadcast", dotted, scale, digits) for h, _ in HUBS) + " |")
w("")

# Runs before engine.kind = memory existed measured the embedded store on tmpfs instead.
with open(commands_file) as f:
    MEMORY_NAME = ("Herald, in-memory store" if "HERALD_ENGINE__KIND=memory" in f.read()
                   else "Herald, store on tmpfs, no fsync")
UNI_HUBS = HUBS + [("herald-memory", MEMORY_NAME)]
for case, title in [("unicast", "unicast: one random user per publish, maximum rate"),
                    ("unicast-fixed", "unicast at a fixed rate: latency")]:
    w(f"### {title}\n")
    w("| | " + " | ".join(n for _, n in UNI_HUBS) + " |")
    w("|---|" + "---|" * len(UNI_HUBS))
    for label, dotted, scale, digits in [
        ("publishes/s (sent)", "publish.per_sec", 1, 0),
        ("delivered msgs/s", "delivery.per_sec", 1, 0),
        ("latency p50 (ms)", "latency_us.p50", 0.001, 2),
        ("latency p90 (ms)", "latency_us.p90", 0.001, 2),
        ("latency p99 (ms)", "latency_us.p99", 0.001, 2),
        ("latency p99.9 (ms)", "latency_us.p999", 0.001, 2),
        ("latency max (ms)", "latency_us.max", 0.001, 2),
        ("server CPU (% of a core)", "server.cpu_pct_of_core", 1, 0),
    ]:
        w(f"| {label} | " + " | ".join(cell(h, case, dotted, scale, digits) for h, _ in UNI_HUBS) + " |")
    w("| statuses (all runs) | " + " | ".join(
        ", ".join(f"{k}: {v}" for k, v in sorted(
            {k: sum(r.get('publish', {}).get('statuses', {}).get(k, 0) for r in runs_by.get((h, case), []))
             for r0 in runs_by.get((h, case), []) for k in r0.get('publish', {}).get('statuses', {})}.items()))
        or "n/a" for h, _ in UNI_HUBS) + " |")
    w("")

w("### churn: sessions opened and closed at a rate\n")
w("| | " + " | ".join(n for _, n in HUBS) + " |")
w("|---|" + "---|" * len(HUBS))
for label, dotted, scale, digits in [
    ("connects/s achieved", "churn.connects_per_sec", 1, 0),
    ("connected", "churn.connected", 1, 0),
    ("failed", "churn.failed", 1, 0),
    ("closed by the hub early", "churn.dropped", 1, 0),
    ("close handshakes answered", "churn.closed_clean", 1, 0),
    ("connect p99 (ms)", "churn.connect_latency_us.p99", 0.001, 2),
    ("RSS before (KiB)", "server.rss_baseline_kib", 1, 0),
    ("RSS peak (KiB)", "server.rss_peak_kib", 1, 0),
    ("RSS after, settled (KiB)", "server.rss_end_kib", 1, 0),
]:
    w(f"| {label} | " + " | ".join(cell(h, "churn", dotted, scale, digits) for h, _ in HUBS) + " |")
w("")

w("### stalled: some sessions stop reading during a fixed-rate broadcast (Herald, heartbeat 1 s / 3 s)\n")
w("| | without stalled sessions | with stalled sessions |")
w("|---|---|---|")
for label, dotted, scale, digits in [
    ("sessions (stalled)", None, 1, 0),
    ("delivered msgs/s", "delivery.per_sec", 1, 0),
    ("readers' latency p50 (ms)", "latency_us.p50", 0.001, 2),
    ("readers' latency p99 (ms)", "latency_us.p99", 0.001, 2),
    ("readers' missing / duplicate", None, 1, 0),
    ("stalled sessions evicted", "stalled.evicted", 1, 0),
    ("server RSS peak (KiB)", "server.rss_peak_kib", 1, 0),
]:
    if label.startswith("sessions"):
        w(f"| {label} | {fmt(median('herald-hb', 'broadcast-fixed', 'connect.connected'))} (0) | "
          f"{fmt(median('herald-hb', 'stalled', 'connect.connected'))} ({fmt(median('herald-hb', 'stalled', 'stalled.stalled'))}) |")
        continue
    if dotted is None:
        w(f"| {label} | " + " | ".join(
            f"{sum(values('herald-hb', c, 'delivery.missing'))} / {sum(values('herald-hb', c, 'delivery.duplicates'))}"
            for c in ("broadcast-fixed", "stalled")) + " |")
        continue
    w(f"| {label} | {cell('herald-hb', 'broadcast-fixed', dotted, scale, digits)} | "
      f"{cell('herald-hb', 'stalled', dotted, scale, digits)} |")
w("")

# Targets from issue 5.
def m(h, c, d):
    return median(h, c, d)


rows = []
def target(name, herald, peer, goal, met):
    rows.append((name, herald, peer, goal, met))


rss = m("herald", "idle", "server.rss_per_connection_bytes")
target("idle: RSS per connection ≤ 4 KiB", f"{fmt(rss)} B", f"Nchan {fmt(m('nchan', 'idle', 'server.rss_per_connection_bytes'))} B",
       "≤ 4,096 B", None if rss is None else rss <= 4096)
cpu_idle = m("herald", "idle", "server.cpu_pct_of_core")
target("idle: CPU ≤ 2% of a core", f"{fmt(cpu_idle, 2)} %", f"Nchan {fmt(m('nchan', 'idle', 'server.cpu_pct_of_core'), 2)} %",
       "≤ 2 %", None if cpu_idle is None else cpu_idle <= 2)
for key, label, case, dotted, better in [
    ("connects", "idle: connects/s ≥ Nchan's", "idle", "connect.per_sec", "higher"),
    ("bdel", "broadcast: delivered/s ≥ Nchan's", "broadcast", "delivery.per_sec", "higher"),
    ("uni", "unicast: publishes/s ≥ Nchan's", "unicast", "publish.per_sec", "higher"),
    ("p99", "unicast fixed rate: p99 ≤ Nchan's", "unicast-fixed", "latency_us.p99", "lower"),
]:
    h, n = m("herald", case, dotted), m("nchan", case, dotted)
    r = ratio(h, n)
    met = None if r is None else (r >= 1 if better == "higher" else r <= 1)
    if key == "p99":
        h, n = (None if h is None else h / 1000), (None if n is None else n / 1000)
        target(label, f"{fmt(h, 2)} ms", f"Nchan {fmt(n, 2)} ms", f"Herald ÷ Nchan = {fmt(r, 2)}", met)
        continue
    target(label, fmt(h), f"Nchan {fmt(n)}", f"Herald ÷ Nchan = {fmt(r, 2)}", met)
hc, nc = m("herald", "broadcast", "server.cpu_us_per_delivered"), m("nchan", "broadcast", "server.cpu_us_per_delivered")
r = ratio(hc, nc)
target("broadcast: CPU per delivered ≤ 0.67 × Nchan's", f"{fmt(hc, 2)} µs", f"Nchan {fmt(nc, 2)} µs",
       f"ratio {fmt(r, 2)}", None if r is None else r <= 0.67)
base, end = m("herald", "churn", "server.rss_baseline_kib"), m("herald", "churn", "server.rss_end_kib")
r = ratio(end, base)
churn_clean = not problems("herald", "churn")
# scripts/bench saves Herald's registry gauges after each churn run: all must read 0.
registry = [line.split() for path in sorted(glob.glob(os.path.join(results_dir, "herald.churn.*.registry")))
            for line in open(path).read().splitlines() if line.strip()]
registry_empty = bool(registry) and all(float(v) == 0 for _, v in registry)
churn_clean = churn_clean and registry_empty
target("churn: RSS back within 10 %, registry empty, no error",
       f"{fmt(base)} → {fmt(end)} KiB, registry {'empty' if registry_empty else 'NOT empty'} after every run, "
       f"{'no' if not problems('herald', 'churn') else 'some'} errors",
       "", f"after ÷ before = {fmt(r, 2)}", None if r is None else (r <= 1.10 and churn_clean))
p0, p1 = m("herald-hb", "broadcast-fixed", "latency_us.p99"), m("herald-hb", "stalled", "latency_us.p99")
r = ratio(p1, p0)
ev, st = m("herald-hb", "stalled", "stalled.evicted"), m("herald-hb", "stalled", "stalled.stalled")
target("stalled: readers' p99 within 20 %, stalled evicted", f"p99 {fmt(p0 and p0 / 1000, 2)} → {fmt(p1 and p1 / 1000, 2)} ms; "
       f"evicted {fmt(ev)} of {fmt(st)}", "", f"ratio {fmt(r, 2)}",
       None if r is None or ev is None else (r <= 1.2 and ev == st))

w("## Targets (issue 5)\n")
w("| target | Herald | peer | measure | met |")
w("|---|---|---|---|---|")
for name, herald, peer, goal, met in rows:
    w(f"| {name} | {herald} | {peer} | {goal} | {'n/a' if met is None else ('yes' if met else '**no**')} |")
w("")
w("Ratios against the Node hub (Herald ÷ Node): " + "; ".join(
    f"{label} {fmt(ratio(m('herald', c, d), m('node', c, d)), 2)}" for label, c, d in [
        ("connects/s", "idle", "connect.per_sec"),
        ("RSS/conn", "idle", "server.rss_per_connection_bytes"),
        ("broadcast delivered/s", "broadcast", "delivery.per_sec"),
        ("unicast publishes/s", "unicast", "publish.per_sec"),
        ("unicast fixed p99", "unicast-fixed", "latency_us.p99"),
    ]) + ".\n")

all_problems = {f"{h}/{c}": problems(h, c) for (h, c) in runs_by}
bad = {k: v for k, v in all_problems.items() if v}
w("## Correctness seen during the runs\n")
if not bad:
    w("Every run: no missing and no duplicate deliveries, every session connected, every publish accepted.\n")
else:
    for k, v in sorted(bad.items()):
        w(f"- {k}: " + "; ".join(sorted(set(v))[:4]))
    w("")

w("## Exact commands\n")
w(f"`SIZE={size} RUNS={runs} scripts/bench` ran, per hub and case, with a fresh hub each time and "
  "`--source-base <N> --server-pid <pid> --json` added (the source address block moves on every run, "
  "so one run's TIME_WAIT ports never meet the next). The raw JSON of every run is kept beside this "
  "file's generator: `scripts/bench` copies it to `target/bench-results-latest/`; the run below is "
  "committed in `bench/results/`.\n")
w("```")
with open(commands_file) as f:
    w(f.read().rstrip())
w("```\n")

# The scale-out section comes from its own command (scripts/bench-cluster); kept as it was measured.
for part in ("scale-out.md", "analysis.md"):
    path = os.path.join(os.path.dirname(__file__), "..", "bench", part)
    if os.path.exists(path):
        with open(path) as f:
            w(f.read())

print("\n".join(out))
