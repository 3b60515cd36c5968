"""How ingestion is going right now: the rate of committed spans over the last minute, what was
refused or rejected, how full the write queue, the decode budget and the staging log are, and
how far the store is behind the acknowledgements (the staging log's lag). serve's progress
log and the read API's `ingest` query (the UI's overview) both read it."""

from __future__ import annotations

import threading
import time
from collections import deque

from audit.store.staging import StagingLoader
from audit.store.writer import SpanWriter

from .ingest import Ingestor

RATE_WINDOW_S = 60.0


class IngestHealth:
    def __init__(
        self,
        ingestor: Ingestor,
        writer: SpanWriter,
        *,
        loader: StagingLoader | None = None,
        clock=time.monotonic,
    ):
        self.ingestor, self.writer, self.loader, self._clock = ingestor, writer, loader, clock
        self._started = clock()
        self._samples: deque[tuple[float, int]] = deque([(self._started, 0)])
        self._lock = threading.Lock()

    def spans_per_s(self) -> float:
        """Committed spans per second over about the last minute (since the start, if sooner)."""
        now, committed = self._clock(), self.writer.stats.committed_spans
        with self._lock:
            self._samples.append((now, committed))
            while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
                self._samples.popleft()
            t0, c0 = self._samples[0]
        return (committed - c0) / (now - t0) if now > t0 else 0.0

    def snapshot(self) -> dict:
        s, w = self.ingestor.stats, self.writer.stats
        return self._counters(s, w) | self._staging()

    def _staging(self) -> dict:
        if self.loader is None:
            return {}
        log = self.loader.staging
        return {
            "staged_spans": log.spans,
            "staging_bytes": log.bytes,
            "staging_capacity_bytes": log.max_bytes,
            "staging_segments": log.segments,
            "staging_lag_s": round(log.lag_s(), 2),
            "last_load_lag_s": round(self.loader.last_lag_s, 2),
            "loads": log.stats.loads,
            "failed_loads": log.stats.failed_loads,
        }

    def _counters(self, s, w) -> dict:
        return {
            "uptime_s": round(self._clock() - self._started, 1),
            "spans_per_s": round(self.spans_per_s(), 1),
            "committed_spans": w.committed_spans,
            "commits": w.commits,  # DuckDB transactions: committed_spans / commits is the commit size
            "requests": s.requests,
            "accepted_spans": s.accepted_spans,  # durable (staged or committed) and acknowledged
            "rejected_spans": s.rejected_spans,
            "invalid_requests": s.invalid_requests,
            "refused_requests": s.refused_requests,
            "unauthenticated_requests": s.unauthenticated_requests,
            "queued_spans": w.queued_spans,
            "queue_capacity_spans": self.writer.max_queued_spans,
            "inflight_bytes": self.ingestor.inflight_bytes,
            "inflight_capacity_bytes": self.ingestor.max_inflight_bytes,
        }
