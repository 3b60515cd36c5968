"""How ingestion is going right now: the rate of committed spans over the last minute, what was
refused or rejected, and how full the write queue and the decode budget are. serve's progress
log and the read API's `ingest` query (the UI's overview) both read it."""

from __future__ import annotations

import threading
import time
from collections import deque

from audit.store.writer import SpanWriter

from .ingest import Ingestor

RATE_WINDOW_S = 60.0


class IngestHealth:
    def __init__(self, ingestor: Ingestor, writer: SpanWriter, *, clock=time.monotonic):
        self.ingestor, self.writer, self._clock = ingestor, writer, clock
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
        return {
            "uptime_s": round(self._clock() - self._started, 1),
            "spans_per_s": round(self.spans_per_s(), 1),
            "committed_spans": w.committed_spans,
            "requests": s.requests,
            "rejected_spans": s.rejected_spans,
            "invalid_requests": s.invalid_requests,
            "refused_requests": s.refused_requests,
            "unauthenticated_requests": s.unauthenticated_requests,
            "queued_spans": w.queued_spans,
            "queue_capacity_spans": self.writer.max_queued_spans,
            "inflight_bytes": self.ingestor.inflight_bytes,
            "inflight_capacity_bytes": self.ingestor.max_inflight_bytes,
        }
