"""Why the demo fleet's Kafka orphans cannot be stitched from what the official instrumentation
records, measured on a fleet run (store + truth from `ctxaudit demo`):

    .venv/bin/ctxaudit demo --db /tmp/fleet.duckdb --truth /tmp/fleet-truth.jsonl --seconds 30 --rate 10
    .venv/bin/python -m bench.kafka_order /tmp/fleet.duckdb /tmp/fleet-truth.jsonl

For the hop whose producer never injects (frontend -> notifications on `order-events`) it
prints: what each side records, the consumer lag against the gap between messages, how many
stored producer spans fit each orphan, and whether offsets follow produce order per partition
(they do: order within a partition would decide, if the producer span said which partition).
"""

from __future__ import annotations

import argparse
import json

import duckdb
import numpy as np

_SPANS = """
SELECT lower(lpad(hex(span_id), 16, '0')) AS sid, kind, start_ns::BIGINT, end_ns::BIGINT, messaging_partition,
       messaging_offset, messaging_message_id
FROM spans WHERE messaging_destination = $topic
"""
_RECORDED = """
SELECT service_name, kind, count(*), count(messaging_partition), count(messaging_offset),
       count(messaging_message_id), count(DISTINCT messaging_partition)
FROM spans WHERE messaging_system = 'kafka' GROUP BY ALL ORDER BY 1, 2
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("db")
    ap.add_argument("truth")
    ap.add_argument("--topic", default="order-events")
    ap.add_argument("--hop", default="frontend->notifications")
    args = ap.parse_args()
    con = duckdb.connect(args.db, read_only=True)
    print("service, kind: spans, with partition, with offset, with message id, partitions seen")
    for row in con.execute(_RECORDED).fetchall():
        print("  ", *row)
    rows = con.execute(_SPANS, {"topic": args.topic}).fetchall()
    spans = {r[0]: r for r in rows}
    truth = [json.loads(line) for line in open(args.truth)]
    orphans = [
        (spans[t["span_id"]], spans.get(t["true_parent_span_id"]))
        for t in truth
        if t.get("hop") == args.hop and t["span_id"] in spans
    ]
    stored = [(c, p) for c, p in orphans if p is not None]
    print(f"orphans {len(orphans)}, whose producer span is stored {len(stored)}")
    lag = np.array([c[2] - p[3] for c, p in stored]) / 1e6
    q = np.percentile(lag, [1, 5, 50, 95, 99])
    p1, p5, p50, p95, p99 = q
    print(
        f"lag (consumer start - producer end), ms: p1 {p1:.1f} p5 {p5:.1f} median {p50:.1f} "
        f"p95 {p95:.1f} p99 {p99:.1f}"
    )
    consumers = np.sort([r[2] for r in rows if r[1] == "CONSUMER"]) / 1e6
    producer_ends = np.sort([r[3] for r in rows if r[1] == "PRODUCER"]) / 1e6
    consumer_gap, producer_gap = np.median(np.diff(consumers)), np.median(np.diff(producer_ends))
    print(
        f"gap between consumer starts, ms: median {consumer_gap:.2f}; "
        f"between stored producer spans: median {producer_gap:.1f}"
    )
    fits = [
        int(np.sum((c[2] / 1e6 - producer_ends >= q[0]) & (c[2] / 1e6 - producer_ends <= q[4])))
        for c, _ in orphans
    ]
    print(
        f"stored producer spans fitting an orphan's lag (p1..p99): median {np.median(fits):.0f}, "
        f"max {max(fits)}"
    )
    by_partition: dict[str, list] = {}
    for c, p in orphans:
        by_partition.setdefault(c[4], []).append((c, p))
    print("orphans per partition:", {k: len(v) for k, v in sorted(by_partition.items())})
    in_order = all(
        [c[5] for c, _ in sorted(v, key=lambda x: x[1][2])] == sorted(c[5] for c, _ in v)
        for v in ({k: [(c, p) for c, p in v if p] for k, v in by_partition.items()}).values()
    )
    print("offsets follow produce order within each partition (truth):", in_order)
    # one fetch delivers a burst across partitions: how many partitions per burst, and how many
    # messages of one partition in it (the order within a partition constrains only those)
    bursts = np.split(np.arange(len(consumers)), np.nonzero(np.diff(consumers) > 5.0)[0] + 1)
    by_start = sorted((r[2], r[4]) for r in rows if r[1] == "CONSUMER")
    per_burst = [[by_start[i][1] for i in b] for b in bursts]
    most = [max(np.unique(b, return_counts=True)[1]) for b in per_burst]
    print(
        f"consumer bursts (>5 ms apart): {len(bursts)}; "
        f"messages per burst median {np.median([len(b) for b in per_burst]):.0f}; "
        f"partitions per burst median {np.median([len(set(b)) for b in per_burst]):.0f}; "
        f"most messages of one partition in a burst: median {np.median(most):.0f}"
    )


if __name__ == "__main__":
    main()
