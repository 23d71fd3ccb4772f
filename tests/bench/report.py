#!/usr/bin/python3
"""report.py RAW --machine M --params P: the `make bench` table.

RAW holds one line per run (key=value pairs, written by run.sh). Every figure
is the median over the repetitions of one (scenario, target); ratios are
median(target) / median(stunnel chain, c).
"""
import argparse
import statistics
import sys

TARGETS = [("a", "direct"), ("b", "smtpbridge"), ("c", "stunnel-chain"), ("d", "hitch+stunnel")]
SCEN = [
    # name, label, throughput key, throughput unit, cost unit
    ("new-ec", "new session, 1x1KB, ECDSA", "conn_s", "conn/s", "us/sess"),
    ("new-rsa", "new session, 1x1KB, RSA", "conn_s", "conn/s", "us/sess"),
    ("reuse", "100x1KB per session", "msg_s", "msg/s", "us/msg"),
    ("1mb", "1 MiB messages", "mb_s", "MB/s", "ms/MiB"),
    ("latency", "1 conn, 1KB msgs serial", "msg_s", "msg/s", "us/msg"),
    ("idle", "idle sessions, TLS both legs", "conn_s", "setup/s", "KB/sess"),
    ("idle-big", "idle, 2 workers, past 10k", "conn_s", "setup/s", "KB/sess"),
]


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def cost(sc, r):
    cpu = num(r.get("cpu_ms"))
    if sc.startswith("idle"):
        return num(r.get("pss_kb"))
    if cpu is None:
        return None
    if sc.startswith("new"):
        n = num(r.get("conns"))
        return cpu * 1000 / n if n else None
    if sc in ("reuse", "latency"):
        n = num(r.get("msgs"))
        return cpu * 1000 / n if n else None
    if sc == "1mb":
        b = num(r.get("bytes"))
        return cpu / (b / 1048576) if b else None
    return None


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, nd=1):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}" if nd else f"{v:.0f}"
    return f"{v:.{max(nd, 2)}f}"


def ratio(x, y):
    if x is None or y is None or y == 0:
        return "-"
    return f"{x / y:.2f}x"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--machine", default="")
    ap.add_argument("--params", default="")
    a = ap.parse_args()
    runs = {}
    for line in open(a.raw):
        r = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "scenario" in r:
            runs.setdefault((r["scenario"], r["target"]), []).append(r)

    M = {}  # (sc, t) -> dict of medians
    for (sc, t), rs in runs.items():
        m = {k: med([num(r.get(k)) for r in rs])
             for k in ("conn_s", "msg_s", "mb_s", "hs_p50", "hs_p99", "msg_p50", "msg_p99",
                       "greet_p99", "cpu_ms", "rss_kb")}
        m["cost"] = med([cost(sc, r) for r in rs])
        if sc.startswith("idle"):
            m["setup_us"] = med([num(r.get("cpu_ms")) * 1000 / num(r.get("held"))
                                 if num(r.get("held")) else None for r in rs])
        m["n"] = len(rs)
        m["bad"] = sum(1 for r in rs if r.get("rc") not in ("0", None) or
                       (r.get("errors") not in ("0", None)) or r.get("timeout") == "1")
        M[(sc, t)] = m

    hdr = ["scenario", "target", "throughput", "x(c)", "hs p50", "hs p99", "msg p50", "msg p99",
           "x(c)", "proxy cost", "x(c)"]
    rows = []
    notes = []
    for sc, label, tk, tu, cu in SCEN:
        if not any((sc, t) in M for t, _ in TARGETS):
            continue
        c = M.get((sc, "c"), {})
        for t, tn in TARGETS:
            m = M.get((sc, t))
            if not m:
                continue
            lat = not sc.startswith("idle")
            row = [label if t == TARGETS[0][0] or (not lat and t == "b") else "",
                   f"({t}) {tn}",
                   f"{fmt(m[tk])} {tu}", ratio(m[tk], c.get(tk)),
                   fmt(m["hs_p50"], 2) + " ms", fmt(m["hs_p99"], 2) + " ms",
                   (fmt(m["msg_p50"], 2) + " ms") if lat else "-",
                   (fmt(m["msg_p99"], 2) + " ms") if lat else "-",
                   ratio(m["msg_p99"], c.get("msg_p99")) if lat else "-",
                   (fmt(m["cost"], 1) + " " + cu) if m["cost"] is not None else "n/a",
                   ratio(m["cost"], c.get("cost")) if t != "a" else "-"]
            if m["bad"]:
                row[1] += " !"
                notes.append(f"! {sc}/{t}: {m['bad']} of {m['n']} runs had errors or timed out")
            rows.append(row)
        rows.append(None)
    w = [max(len(str(r[i])) for r in [hdr] + [r for r in rows if r]) for i in range(len(hdr))]
    out = []
    out.append(f"smtpbridge benchmark - {a.machine}")
    out.append(f"{a.params}; medians of repetitions; x(c) = ratio to the stunnel chain")
    out.append("")
    line = "  ".join(h.ljust(w[i]) if i < 2 else h.rjust(w[i]) for i, h in enumerate(hdr))
    out.append(line)
    out.append("-" * len(line))
    for r in rows[:-1] if rows and rows[-1] is None else rows:
        if r is None:
            out.append("")
            continue
        out.append("  ".join(str(x).ljust(w[i]) if i < 2 else str(x).rjust(w[i])
                             for i, x in enumerate(r)))
    out.append("")
    out.append("proxy cost = CPU (utime+stime, all processes of the proxy) per new session / per"
               " message / per MiB, or PSS per idle session")
    ib, ic, idd = M.get(("idle", "b")), M.get(("idle", "c")), M.get(("idle", "d"))
    if ib:
        out.append("idle: CPU per session set-up (b/c/d): " + " / ".join(
            fmt(x["setup_us"], 0) + " us" if x else "-" for x in (ib, ic, idd)) +
            "; RSS per session (b/c/d): " + " / ".join(
            fmt(x["rss_kb"], 1) + " KB" if x else "-" for x in (ib, ic, idd)))
    # goals (issue 6)
    g = []

    def goal(name, val, limit, unit_fmt):
        if val is None:
            g.append(f"  {name}: not measured")
            return
        g.append(f"  {name}: {unit_fmt(val)} (goal {unit_fmt(limit)}) -> "
                 f"{'met' if val <= limit else 'MISSED'}")

    def rat(sc):
        b, c = M.get((sc, "b"), {}).get("cost"), M.get((sc, "c"), {}).get("cost")
        return b / c if b is not None and c else None

    goal("CPU per new session (ECDSA) vs stunnel chain", rat("new-ec"), 0.25, lambda v: f"{v:.2f}x")
    goal("CPU per new session (RSA) vs stunnel chain", rat("new-rsa"), 0.25, lambda v: f"{v:.2f}x")
    goal("CPU per 1 KB message vs stunnel chain", rat("reuse"), 0.30, lambda v: f"{v:.2f}x")
    goal("CPU per MiB vs stunnel chain", rat("1mb"), 0.35, lambda v: f"{v:.2f}x")
    goal("memory per idle proxied session", ib["cost"] if ib else None, 24.0, lambda v: f"{v:.1f} KB")
    big = M.get(("idle-big", "b"))
    held = med([num(r.get("held")) for r in runs.get(("idle-big", "b"), [])])
    goal("memory per idle session, %s sessions, 2 workers" % (fmt(held, 0) if held else "-"),
         big["cost"] if big else None, 24.0, lambda v: f"{v:.1f} KB")
    for sc in ("latency", "reuse"):
        la, lb = M.get((sc, "a"), {}).get("msg_p99"), M.get((sc, "b"), {}).get("msg_p99")
        goal(f"p99 message latency added over direct ({sc})",
             lb - la if la is not None and lb is not None else None, 1.0,
             lambda v: f"{v:.3f} ms")
    out.append("goals (issue 6), smtpbridge (b):")
    out += g
    out += notes
    print("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
