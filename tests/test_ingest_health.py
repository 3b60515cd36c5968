"""The ingest figures serve reports (its log, the read API's `ingest`, the UI's overview): the
rate is over about the last minute, and the counters are the ingestor's and the writer's."""

from types import SimpleNamespace

from collector_ext.ingest_health import IngestHealth


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _health():
    writer = SimpleNamespace(
        stats=SimpleNamespace(committed_spans=0, commits=0, queued_spans=0), max_queued_spans=500
    )
    ingestor = SimpleNamespace(
        stats=SimpleNamespace(
            requests=0,
            accepted_spans=0,
            rejected_spans=0,
            invalid_requests=0,
            refused_requests=0,
            unauthenticated_requests=0,
        ),
        inflight_bytes=0,
        max_inflight_bytes=1 << 20,
    )
    clock = Clock()
    return IngestHealth(ingestor, writer, clock=clock), writer, clock


def test_rate_is_over_the_last_minute():
    health, writer, clock = _health()
    for _ in range(12):  # two minutes at 100 spans/s, sampled every 10 s
        clock.t += 10
        writer.stats.committed_spans += 1000
        assert abs(health.spans_per_s() - 100) < 1e-9
    for _ in range(6):  # then a minute at 10/s: the old rate has left the window
        clock.t += 10
        writer.stats.committed_spans += 100
        health.spans_per_s()
    assert abs(health.spans_per_s() - 10) < 1e-9
    assert len(health._samples) <= 9  # old samples are dropped, not kept forever


def test_snapshot_reports_the_counters():
    health, writer, clock = _health()
    clock.t += 2
    writer.stats.committed_spans, writer.stats.commits, writer.stats.queued_spans = 300, 3, 40
    health.ingestor.stats.refused_requests = 2
    snap = health.snapshot()
    assert snap["spans_per_s"] == 150 and snap["uptime_s"] == 2
    assert (snap["committed_spans"], snap["queued_spans"], snap["queue_capacity_spans"]) == (300, 40, 500)
    assert snap["commits"] == 3  # bench/ingest.py's commit size: committed_spans / commits
    assert snap["refused_requests"] == 2 and snap["inflight_capacity_bytes"] == 1 << 20
