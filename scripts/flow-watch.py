#!/usr/bin/env python3
"""Watches one fault's run of scripts/cluster-check.sh: every quarter second it reads the
generators' acked counters (their /metrics) and every service's RSS, until it is sent SIGTERM.
Then it writes one JSON object to OUT:

  acked            acks counted over all generators at the end
  longest_stall_s  the longest time in which no generator got a single ack, between the first
                   ack and the last one (how long the flow stopped)
  longest_source_stall_s  the longest time one generator went without an ack between two of its
                   acks (how long one source's flow stopped, e.g. while it failed over)
  last_ack_at      when the last ack came (Unix seconds)
  peak_rss_mib     each service's highest RSS

  flow-watch.py OUT --generator ADDR... --pid NAME=PID...
"""
import argparse
import json
import signal
import time
import urllib.request

METRIC = "flowmesh_generator_records_acked_total"


def acked(addr):
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=0.5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(METRIC):
                    return float(line.split()[-1])
    except (OSError, ValueError):
        return None
    return 0.0


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--generator", nargs="*", default=[])
    parser.add_argument("--pid", nargs="*", default=[])
    args = parser.parse_args()
    pids = dict(p.split("=", 1) for p in args.pid)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    last = {addr: 0.0 for addr in args.generator}  # a generator that ended keeps its count
    last_rise = {addr: None for addr in args.generator}
    longest_one = 0.0
    peak = {name: 0.0 for name in pids}
    total, first_ack, last_ack, longest = 0.0, None, None, 0.0
    while not stopping:
        now = time.time()
        for addr in args.generator:
            value = acked(addr)
            if value is not None and value > last[addr]:
                if last_rise[addr] is not None:
                    longest_one = max(longest_one, now - last_rise[addr])
                last[addr], last_rise[addr] = value, now
        for name, pid in pids.items():
            value = rss_mib(pid)
            if value is not None:
                peak[name] = max(peak[name], value)
        seen = sum(last.values())
        if seen > total:
            if first_ack is None:
                first_ack = now
            elif last_ack is not None:
                longest = max(longest, now - last_ack)
            total, last_ack = seen, now
        time.sleep(0.25)

    with open(args.out, "w") as out:
        json.dump({"acked": int(total), "longest_stall_s": round(longest, 1),
                   "longest_source_stall_s": round(longest_one, 1),
                   "last_ack_at": last_ack, "peak_rss_mib": {k: round(v, 1) for k, v in peak.items()}},
                  out)


if __name__ == "__main__":
    main()
