"""The audits `ctxaudit serve` runs itself: on its own schedule (every so often, the newest
settled window from where the last run ended) and on request through the read API (`ctxaudit
audit --server`, the UI's "Audit now"). Each reads on a cursor of its own next to the writer, so
ingestion goes on meanwhile (DuckDB's MVCC); one runs at a time, so windows never overlap; a
failed scheduled run is logged and the next one tries again."""

from __future__ import annotations

import logging
import threading

from ..audit_job import audit_connection, summary_lines
from ..engine import AuditResult
from ..settings import AuditRequest, AuditSettings
from ..store.errors import StoreError
from ..store.writer import SpanStore
from .periodic import Periodic

log = logging.getLogger(__name__)


class ServerAudits:
    def __init__(self, store: SpanStore, settings: AuditSettings, every_s: float = 0.0):
        self.store, self.settings, self.every_s = store, settings, every_s
        self._one_at_a_time = threading.Lock()
        self._schedule = Periodic("periodic-audit", lambda: every_s, self.audit_once)

    def start(self) -> None:
        if self.every_s:
            self._schedule.start()

    def stop(self) -> None:
        """No new scheduled run starts; one in progress finishes (and is saved)."""
        self._schedule.stop()

    def audit_once(self) -> None:
        try:
            result = self.audit(self.settings)
        except StoreError as e:
            log.error("periodic audit failed: %s; the next run tries again", e)
            return
        except Exception:  # the server goes on whatever an audit meets
            log.exception("periodic audit failed; the next run tries again")
            return
        if result is not None:
            self._log(result, "periodic")

    @staticmethod
    def parse_request(body: object) -> AuditRequest:
        """An audit request from the read API's JSON body; SettingsError (HTTP 400) if it is wrong."""
        return AuditRequest.parse(body)

    def run_request(self, request: AuditRequest) -> tuple[AuditResult | None, list[str]]:
        """Run a requested audit (after any in progress): its result and text summary, or
        (None, []) when there is nothing new to audit. StoreError when the store fails."""
        result = self.audit(
            request.settings,
            since_ns=request.since_ns,
            until_ns=request.until_ns,
            resume=request.resume,
            save=request.save,
        )
        if result is None:
            return None, []
        self._log(result, "requested")
        return result, summary_lines(result)

    def audit(self, settings: AuditSettings, **window) -> AuditResult | None:
        """One audit (after any in progress), on a cursor of its own; `window`: audit_connection's."""
        with self._one_at_a_time:
            con = self.store.cursor()
            try:
                return audit_connection(con, self.store.path, settings, **window)
            finally:
                con.close()  # its temp tables go with it

    def _log(self, result: AuditResult, how: str) -> None:
        c = result.counts()
        log.info(
            "%s audit %s: %d spans, %d orphan roots (%d with a probable parent), %d broken edges, %.1f s",
            how,
            f"run {result.run_id}" if result.run_id else "(not saved)",
            result.spans,
            c["orphan_root"],
            result.stitched(),
            sum(e.broken for e in result.edges),
            result.seconds,
        )
