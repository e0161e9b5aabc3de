#!/usr/bin/env python3
"""Reads the spans a chaos scenario's OTLP receiver wrote (`bench receiver --spans FILE`, one
JSON object a line) and checks that the fault retried records and that their traces show it
(docs/contracts.md §4 "Traces"): a broker-bound record whose generator span has two or more
filter `route` children, acked in the end (`ok`), a publish span for every attempt (a route's
child, or linking to it for a packed message; one that was never published fails at once saying
why), every failed publish saying why, one confirmed, and an `ok` process span of each writer in
the record's trace.

    tests/traces/retried.py SPANS EXCHANGE WRITER...

Prints how many records were retried and how many of their traces are complete (a span
dropped at an exporter's full queue leaves a gap, counted), then one complete trace as a span
tree with timings. Exits 1 at a contradiction (a retried record not acked, a publish with no
outcome), or when no retried record's trace is complete: the fault then proved nothing.
"""
import collections
import json
import sys


def load(path):
    spans = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            line = line.strip()
            if line:
                spans.append(json.loads(line))
    return spans


def render(spans, trace_id):
    """The trace as text, as testkit::otlp::render prints it: children under their parent,
    store spans linked to one of its spans under that span, marked (linked)."""
    own = [s for s in spans if s["trace_id"] == trace_id]
    ids = {s["span_id"] for s in own}
    first = min(s["start_ns"] for s in own)
    out = []

    def walk(span, depth, mark):
        out.append("%s%s %s%s  +%.1f ms, %.1f ms, %s" % (
            "  " * depth, span["service"], span["name"], mark,
            (span["start_ns"] - first) / 1e6, (span["end_ns"] - span["start_ns"]) / 1e6,
            span["status"]))
        children = [(s, "") for s in own if s["parent_span_id"] == span["span_id"]]
        link = [span["trace_id"], span["span_id"]]
        children += [(s, " (linked)") for s in spans if link in s["links"]]
        for child, child_mark in sorted(children, key=lambda c: c[0]["start_ns"]):
            walk(child, depth + 1, child_mark)

    for root in sorted((s for s in own if s["parent_span_id"] not in ids),
                       key=lambda s: s["start_ns"]):
        walk(root, 0, "")
    return "\n".join(out)


def attempts(route, children, linking, publish):
    """The publish spans of one route attempt: its children, or (a packed message) the publish
    spans that link to it."""
    own = [p for p in children[route["span_id"]] if p["name"] == publish]
    return own + [p for p in linking.get((route["trace_id"], route["span_id"]), [])
                  if p["name"] == publish]


def check(record, routes, spans_of_trace, children, linking, publish, writers):
    """(contradiction, gap) for one retried record's trace: a contradiction is wrong whatever
    was dropped on the way (the record not acked, a publish neither confirmed nor failed with
    a reason); a gap is a part missing, which a span dropped at a full queue also explains."""
    if record["status"] != "ok":
        return "not acked in the end (%s)" % record["status"], None
    publishes = [p for r in routes for p in attempts(r, children, linking, publish)]
    odd = [p for p in publishes if p["status"] != "ok" and not p["status"].startswith("error: ")]
    if odd:
        return "a publish neither confirmed nor failed with a reason: %s" % odd, None
    silent = [r for r in routes if not attempts(r, children, linking, publish)]
    if silent:
        return None, "%d attempts without a publish span" % len(silent)
    if not any(p["status"] == "ok" for p in publishes):
        return None, "no confirmed publish among %d" % len(publishes)
    processed = {s["service"] for s in spans_of_trace
                 if s["name"].startswith("process ") and s["status"] == "ok"}
    missing = sorted(set(writers) - processed)
    if missing:
        return None, "no process span of %s" % ", ".join(missing)
    return None, None


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    path, exchange, writers = sys.argv[1], sys.argv[2], sys.argv[3:]
    spans = load(path)
    publish = "publish " + exchange
    children = collections.defaultdict(list)
    by_trace = collections.defaultdict(list)
    linking = collections.defaultdict(list)
    for span in spans:
        children[span["parent_span_id"]].append(span)
        by_trace[span["trace_id"]].append(span)
        for trace_id, span_id in span["links"]:
            linking[(trace_id, span_id)].append(span)
    complete, gaps = [], 0
    retried = 0
    for record in spans:
        if record["service"] != "generator" or record["name"] != "record":
            continue
        routes = sorted((r for r in children[record["span_id"]] if r["name"] == "route"),
                        key=lambda r: r["start_ns"])
        if len(routes) < 2 or routes[0]["attributes"].get("flowmesh.destination") != "broker":
            continue
        retried += 1
        wrong, gap = check(record, routes, by_trace[record["trace_id"]], children, linking,
                           publish, writers)
        if wrong:
            print("traces: FAILED: record %s: %s" % (
                record["attributes"].get("flowmesh.record.id"), wrong))
            print(render(spans, record["trace_id"]))
            return 1
        if gap:
            gaps += 1
        else:
            complete.append(record)
    print("traces: %d spans; %d broker-bound records retried, %d of their traces complete, "
          "%d with a part missing" % (len(spans), retried, len(complete), gaps))
    if not complete:
        print("traces: FAILED: no broker-bound record retried across the fault with a complete "
              "trace (retried: %d)" % retried)
        return 1
    print(render(spans, complete[0]["trace_id"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
