"""The server's side of the Parquet export (docs/scale.md): the read API's `GET /v1/export`
stream (`ctxaudit export --server URL --parquet DIR` writes it), and `serve --export-parquet
DIR`: every `--export-every`, the hours whose spans are all past the settle time are exported
under DIR/spans/shard=NAME/..., on a thread of its own, with the same files and the same
replacement of re-exported hours as `ctxaudit export --db`. A failed export is logged and
counted (`parquet_export` in /v1/ingest) and tried again at the next tick; serve goes on."""

from __future__ import annotations

import calendar
import io
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from ..store.errors import StoreError, translate
from ..store.parquet import HOUR_NS, KINDS, StoreSource, check_shard_name, export_spans, read_manifest
from ..store.writer import SpanStore
from .periodic import Periodic

log = logging.getLogger(__name__)

ARROW_STREAM = "application/vnd.apache.arrow.stream"


@contextmanager
def _batches(store: SpanStore, kind: str, lo: int, hi: int) -> Iterator[pa.RecordBatchReader]:
    cursor = store.cursor()
    try:
        yield StoreSource(cursor, store.path).batches(kind, lo, hi)
    finally:
        cursor.close()


def ipc_chunks(store: SpanStore, kind: str, lo: int, hi: int) -> Iterator[bytes]:
    """The rows the export writes for `kind` and span starts in [lo, hi), as an Arrow IPC stream
    cut into chunks (one per batch); the first chunk holds the schema. StoreError if the store
    fails; a failure after the first chunk cuts the stream off (the client sees it incomplete)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    buffer = io.BytesIO()

    def take() -> bytes:
        data = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return data

    try:
        with _batches(store, kind, lo, hi) as batches:
            writer = pa.ipc.new_stream(buffer, batches.schema)
            yield take()
            for batch in batches:
                writer.write_batch(batch)
                yield take()
            writer.close()  # the end-of-stream marker
            yield take()
    except duckdb.Error as e:
        raise translate(e, store.path, writing=False) from None


class ScheduledParquetExport:
    """`serve --export-parquet DIR --export-every SECONDS --export-shard NAME`."""

    def __init__(self, store: SpanStore, out: str, shard: str, every_s: float, settle_s: float):
        check_shard_name(shard)
        self.store, self.out, self.shard, self.every_s, self.settle_s = store, out, shard, every_s, settle_s
        Path(out).mkdir(parents=True, exist_ok=True)
        read_manifest(Path(out), shard, missing_ok=True)  # an unreadable or foreign one: say so at start
        self._lock = threading.Lock()
        self._status = {
            "dir": str(out),
            "shard": shard,
            "exports": 0,
            "failures": 0,
            "exported_until_ns": None,
            "last_spans": None,
            "last_error": None,
            "last_success_unix_s": None,
        }
        delays = iter([min(1.0, every_s)])  # a first pass soon after the start
        self._periodic = Periodic("parquet-export", lambda: next(delays, every_s), self.export_settled)

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        """No new export starts; one in progress finishes (its hours are swapped in whole)."""
        self._periodic.stop()

    def status(self) -> dict:
        with self._lock:
            return dict(self._status)

    def settled_hours(self, now_ns: int | None = None) -> tuple[int, int] | None:
        """[from, until) in whole hours: from the end of the last hour this shard exported (else
        the first span's hour), up to the last hour that ended a settle time ago and holds spans
        (quiet hours after the newest span wait for the next one); None: nothing new."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        cursor = self.store.cursor()
        try:
            first, last = cursor.execute("SELECT min(start_ns), max(start_ns) FROM spans").fetchone()
        except duckdb.Error as e:
            raise translate(e, self.store.path, writing=False) from None
        finally:
            cursor.close()
        if first is None:
            return None
        until = min((now_ns - int(self.settle_s * 1e9)) // HOUR_NS, last // HOUR_NS + 1) * HOUR_NS
        manifest = read_manifest(Path(self.out), self.shard, missing_ok=True)
        if manifest and manifest["hours"]:
            newest = max(manifest["hours"])  # 'YYYY-MM-DDTHH' sorts as time
            start = calendar.timegm(time.strptime(newest, "%Y-%m-%dT%H")) * 1_000_000_000 + HOUR_NS
        else:
            start = first // HOUR_NS * HOUR_NS
        return (start, until) if until > start else None

    def export_settled(self) -> dict | None:
        """Export the newly settled hours (the tick); the manifest, or None when nothing was due."""
        try:
            hours = self.settled_hours()
            if hours is None:
                return None
            cursor = self.store.cursor()
            try:
                source = StoreSource(cursor, self.store.path)
                manifest = export_spans(
                    source, self.out, shard=self.shard, since_ns=hours[0], until_ns=hours[1]
                )
            finally:
                cursor.close()
        except Exception as e:  # serve goes on whatever an export meets; the next tick tries again
            with self._lock:
                self._status["failures"] += 1
                self._status["last_error"] = str(e) or type(e).__name__
            if isinstance(e, (StoreError, OSError)):
                log.error("parquet export to %s failed: %s; the next one tries again", self.out, e)
            else:
                log.exception("parquet export to %s failed; the next one tries again", self.out)
            return None
        done = manifest["last_export"]
        with self._lock:
            self._status.update(
                exports=self._status["exports"] + 1,
                exported_until_ns=done["until_ns"],
                last_spans=done["spans"],
                last_error=None,
                last_success_unix_s=time.time(),
            )
        log.info(
            "parquet export: %d spans in %d hour(s) to %s (shard=%s)",
            done["spans"],
            done["hours"],
            self.out,
            self.shard,
        )
        return manifest
