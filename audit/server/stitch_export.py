"""`serve --export-otlp URL`: after each audit run is saved, its stitched hops go to the user's
trace backend (audit/otlp_export.py), on a thread of its own. A target that is down is retried
with backoff by the exporter, then reported (the log, and `otlp_export` in /v1/ingest); the run
is tried again at the next tick, and the state file keeps anything from being sent twice.
Ingest and the audits never wait for it."""

from __future__ import annotations

import logging
import threading
import time

from ..contract.reader import Reader
from ..otlp_export import ExportError, ExportRecord, OtlpTarget, StitchExporter
from ..store.errors import StoreError
from .periodic import Periodic

log = logging.getLogger(__name__)

CHECK_EVERY_S = 10.0  # how often it looks for a new run (one small query)
MAX_DELAY_S = 300.0  # after failures in a row, the wait doubles up to this


class ScheduledExport:
    def __init__(self, reader: Reader, url: str, state_path: str, *, every_s: float = CHECK_EVERY_S):
        self.url = url
        self._reader = reader
        self._target = OtlpTarget(url)
        self._record = ExportRecord(state_path)
        self._exporter = StitchExporter(reader, self._target, self._record)
        # the newest run exported whole; runs saved before the server started are left to
        # `ctxaudit export --run`
        newest = reader.audit_run(None)
        self._exported_run = newest["run_id"] if newest else 0
        self._lock = threading.Lock()
        self._status = {
            "target": url,
            "last_run": None,
            "spans_sent": 0,
            "failures": 0,
            "last_error": None,
            "last_success_unix": None,
        }
        self._every_s = self._delay_s = every_s
        self._periodic = Periodic("otlp-export", lambda: self._delay_s, self.export_new)

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._target.close()  # an export waiting in its backoff gives up
        self._periodic.stop()
        self._record.close()

    def status(self) -> dict:
        with self._lock:
            return dict(self._status)

    def export_new(self) -> None:
        """Export every run saved since the last one exported."""
        try:
            newest = self._reader.audit_run(None)
        except StoreError as e:
            log.warning("otlp export: cannot read the audit runs: %s", e)
            return
        if newest is None:
            return
        for run_id in range(self._exported_run + 1, newest["run_id"] + 1):
            try:
                stats = self._exporter.export_run(run_id)
            except (ExportError, StoreError) as e:
                with self._lock:
                    self._status["failures"] += 1
                    self._status["last_error"] = str(e)
                self._delay_s = min(self._delay_s * 2, MAX_DELAY_S)
                log.error("otlp export of run %d failed: %s; tried again in %g s", run_id, e, self._delay_s)
                return
            self._delay_s = self._every_s
            self._exported_run = run_id
            with self._lock:
                self._status.update(
                    last_run=run_id,
                    spans_sent=self._status["spans_sent"] + stats.sent,
                    last_error=None,
                    last_success_unix=time.time(),
                )
            if stats.sent:
                log.info("%s", stats.summary(self.url))
