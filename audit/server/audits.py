"""The audits `ctxaudit serve` runs itself: on its own schedule (every so often, the newest
settled window from where the last run ended) and on request through the read API (`ctxaudit
audit --server`, the UI's "Audit now"). Each reads on a cursor of its own next to the writer, so
ingestion goes on meanwhile (DuckDB's MVCC); one runs at a time, so windows never overlap; a
failed scheduled run is logged and the next one tries again.

An audit can never take ingestion down with it: at most one request waits behind the running
audit (others are refused as busy), a request whose client has gone is dropped before it
starts, and a memory guard stops an audit that grows the server past its ceiling."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import psutil

from ..audit_job import audit_connection, summary_lines
from ..engine import AuditResult
from ..settings import AuditRequest, AuditSettings
from ..store.errors import StoreError
from ..store.writer import SpanStore
from .periodic import Periodic

log = logging.getLogger(__name__)


class AuditBusy(Exception):
    """An audit runs and another waits: the request is refused (HTTP 429), nothing queues."""


class AuditTooLarge(StoreError):
    """The audit would have grown the server past its memory ceiling, and was stopped."""


class ClientGone(Exception):
    """The request's client hung up before its audit started; it was not run."""


class MemoryGuard:
    """Watches the server's resident memory while an audit runs. Past `limit_bytes` it
    interrupts the audit's DuckDB work and makes the audit's next step fail, so the audit
    ends, its memory is freed, and ingestion, which never waits for audits, goes on."""

    def __init__(self, limit_bytes: int, every_s: float = 0.05):
        self.limit_bytes, self.every_s = limit_bytes, every_s
        self._process = psutil.Process()

    @contextmanager
    def watching(self, con):
        tripped, done = threading.Event(), threading.Event()

        def watch() -> None:
            while not done.wait(self.every_s):
                if self._process.memory_info().rss > self.limit_bytes:
                    tripped.set()
                    con.interrupt()
                    return

        watcher = threading.Thread(target=watch, name="audit-memory-guard", daemon=True)
        watcher.start()

        def check(step: str) -> None:  # called between the audit's steps
            if tripped.is_set():
                raise self._too_large()

        try:
            yield check
        except Exception as e:
            if tripped.is_set() and not isinstance(e, AuditTooLarge):
                raise self._too_large() from None
            raise
        finally:
            done.set()
            watcher.join()

    def _too_large(self) -> AuditTooLarge:
        return AuditTooLarge(
            f"the audit was stopped: the server's memory passed {self.limit_bytes >> 20} MiB "
            "(--audit-max-rss-mib). Audit a shorter window (since/until), or raise the ceiling."
        )


class ServerAudits:
    def __init__(
        self,
        store: SpanStore,
        settings: AuditSettings,
        every_s: float = 0.0,
        *,
        max_rss_bytes: int | None = None,
    ):
        self.store, self.settings, self.every_s = store, settings, every_s
        self.guard = MemoryGuard(max_rss_bytes) if max_rss_bytes else None
        self._one_at_a_time = threading.Lock()
        self._admission = threading.Lock()
        self._busy = 0  # audits running or waiting to
        self._status = {"succeeded": 0, "failed": 0, "refused_busy": 0, "dropped_client_gone": 0}
        self._last_failure: str | None = None
        self._last_success_unix_s: float | None = None
        self._schedule = Periodic("periodic-audit", lambda: every_s, self.audit_once)

    def start(self) -> None:
        if self.every_s:
            self._schedule.start()

    def stop(self) -> None:
        """No new scheduled run starts; one in progress finishes (and is saved)."""
        self._schedule.stop()

    def status(self) -> dict:
        """For /v1/ingest and the log: how the server's audits are going."""
        with self._admission:
            return self._status | {
                "busy": self._busy,
                "last_failure": self._last_failure,
                "last_success_unix_s": self._last_success_unix_s,
            }

    def audit_once(self) -> None:
        try:
            result = self.audit(self.settings, queue=True)
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

    def run_request(
        self, request: AuditRequest, still_wanted: Callable[[], bool] = lambda: True
    ) -> tuple[AuditResult | None, list[str]]:
        """Run a requested audit (after the one in progress, if any): its result and text
        summary, or (None, []) when there is nothing new to audit. AuditBusy when another
        already waits; ClientGone when `still_wanted()` says no by the time it could start;
        StoreError (AuditTooLarge among them) when the store or the memory guard stops it."""
        result = self.audit(
            request.settings,
            since_ns=request.since_ns,
            until_ns=request.until_ns,
            resume=request.resume,
            save=request.save,
            still_wanted=still_wanted,
        )
        if result is None:
            return None, []
        self._log(result, "requested")
        return result, summary_lines(result)

    def audit(
        self,
        settings: AuditSettings,
        *,
        queue: bool = False,
        still_wanted: Callable[[], bool] = lambda: True,
        **window,
    ) -> AuditResult | None:
        """One audit, after the one in progress, on a cursor of its own; `window`:
        audit_connection's. Without `queue` (requests), refused when one already waits."""
        with self._admission:
            if self._busy >= 2 and not queue:
                self._status["refused_busy"] += 1
                raise AuditBusy("an audit is running and another is waiting; try again when they are done")
            self._busy += 1
        try:
            with self._one_at_a_time:
                if not still_wanted():
                    self._count("dropped_client_gone")
                    raise ClientGone()
                result = self._run(settings, window)
        except Exception as e:
            if not isinstance(e, ClientGone):
                self._count("failed", failure=str(e) or type(e).__name__)
            raise
        finally:
            with self._admission:
                self._busy -= 1
        self._count("succeeded")
        return result

    def _run(self, settings: AuditSettings, window: dict) -> AuditResult | None:
        con = self.store.cursor()
        try:
            if self.guard is None:
                return audit_connection(con, self.store.path, settings, **window)
            with self.guard.watching(con) as check:
                return audit_connection(con, self.store.path, settings, progress=check, **window)
        finally:
            con.close()  # its temp tables go with it

    def _count(self, what: str, failure: str | None = None) -> None:
        with self._admission:
            self._status[what] += 1
            if failure is not None:
                self._last_failure = failure
            if what == "succeeded":
                self._last_success_unix_s = time.time()

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
