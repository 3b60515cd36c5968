"""The audit `ctxaudit serve` runs on its own schedule: every so often, the newest settled
window (from where the last run ended), saved as a run. It reads on a cursor of its own next
to the writer, so ingestion goes on meanwhile (DuckDB's MVCC); a failed run is logged and the
next one tries again."""

from __future__ import annotations

import logging
import threading

from .audit_job import AuditSettings, audit_connection
from .store.errors import StoreError
from .store.writer import SpanStore

log = logging.getLogger(__name__)


class PeriodicAudit:
    def __init__(self, store: SpanStore, settings: AuditSettings, every_s: float):
        self.store, self.settings, self.every_s = store, settings, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="periodic-audit", daemon=True)
        self.runs = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No new run starts; one in progress finishes (and is saved)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.audit_once()

    def audit_once(self) -> None:
        con = self.store.connection.cursor()
        try:
            result = audit_connection(con, self.store.path, self.settings)
        except StoreError as e:
            log.error("periodic audit failed: %s; the next run tries again", e)
            return
        except Exception:  # the server goes on whatever an audit meets
            log.exception("periodic audit failed; the next run tries again")
            return
        finally:
            con.close()  # its temp tables go with it
        if result is not None:
            self.runs += 1
            c = result.counts()
            log.info("audit run %s: %d spans, %d orphan roots (%d with a probable parent), %d broken edges, %.1f s",
                     result.run_id, result.spans, c["orphan_root"], result.stitched(),
                     sum(e.broken for e in result.edges), result.seconds)  # fmt: skip
