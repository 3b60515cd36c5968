"""The write side of the store: one connection, one writer thread, group commits.

Producers `submit` a `SpanBatch` and get a future that resolves once the batch is
committed: the receivers acknowledge only then. The queue is bounded in spans; a
full queue refuses at once (`QueueFull`) so clients retry instead of the server
buffering without bound.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from ..settings import ServeSettings
from .batch import LINK_SCHEMA, RESOURCE_COLUMNS, SCOPE_COLUMNS, SPAN_SCHEMA, SpanBatch, with_group_ids
from .errors import StoreError, StoreUnavailable, translate
from .migrations import apply_migrations

log = logging.getLogger(__name__)
_DEFAULTS = ServeSettings()  # declared in audit/settings.py


class QueueFull(Exception):
    """The write queue has no room for this batch now; the client should retry."""


def joined_columns(schema: pa.Schema, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(column, SQL expression) per stored column of a batch with `schema`: each `<x>_hi`/`<x>_lo`
    pair joined into one UHUGEINT column `<x>`; `ingested_at` last, one value per transaction."""
    out = []
    for name in schema.names:
        if name.endswith("_lo") or name in skip:
            continue
        if name.endswith("_hi"):
            base = name[:-3]
            out.append((base, f"({base}_hi::UHUGEINT << 64) | {base}_lo::UHUGEINT"))
        else:
            out.append((name, name))
    return out + [("ingested_at", "current_timestamp")]  # the commit group


def _insert_sql(table: str, schema: pa.Schema, skip: tuple[str, ...] = ()) -> str:
    columns = joined_columns(schema, skip)
    targets, exprs = ", ".join(c for c, _ in columns), ", ".join(e for _, e in columns)
    return f"INSERT INTO {table} ({targets}) SELECT {exprs} FROM batch_{table}"


# a span's resource and scope columns go to span_resources and span_scopes, once per id
_INSERT_SPANS = _insert_sql("spans", SPAN_SCHEMA, RESOURCE_COLUMNS + SCOPE_COLUMNS)
_INSERT_GROUPS = (
    "INSERT OR IGNORE INTO span_resources "
    f"SELECT resource_id, {', '.join(RESOURCE_COLUMNS)} FROM batch_resources; "
    f"INSERT OR IGNORE INTO span_scopes SELECT scope_id, {', '.join(SCOPE_COLUMNS)} FROM batch_scopes"
)
_INSERT_LINKS = _insert_sql("span_links", LINK_SCHEMA)
# a load from the staging log records its segments with their rows (exactly once after a crash)
# and forgets the rows of segments older than the load's, whose files are gone
_RECORD_SEGMENTS = (
    "DELETE FROM staging_segments WHERE segment < (SELECT min(forget_below) FROM batch_segments); "
    "INSERT INTO staging_segments SELECT segment, spans, current_timestamp FROM batch_segments"
)
_INVALIDATED = "database has been invalidated"


def _new_groups(spans: pa.Table, known: tuple[set, set]) -> tuple[pa.Table, pa.Table] | None:
    """The resources and scopes of `spans` not in `known` (resource ids, scope ids), one row
    each; None when every one is stored already (the usual case: one statement less)."""
    if spans.num_rows == 0:
        return None
    out, fresh = [], False
    for key, columns, ids_known in zip(("resource_id", "scope_id"), (RESOURCE_COLUMNS, SCOPE_COLUMNS), known):
        ids = spans.column(key).to_numpy()
        # spans come grouped by scope: look at the first row of each run only
        starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
        first: dict[int, int] = {}
        for row, i in zip(starts.tolist(), ids[starts].tolist()):
            if i not in ids_known:
                first.setdefault(i, row)
        fresh = fresh or bool(first)
        rows = spans.select([key, *columns])  # sliced, not taken: take would unify the dictionaries
        out.append(pa.concat_tables([rows.slice(0, 0)] + [rows.slice(r, 1) for r in first.values()]))
    return (out[0], out[1]) if fresh else None


class SpanStore:
    """The DuckDB file opened read-write, migrated, with `duckdb.Error` translated.

    A failed write to the file (disk full, an I/O error) makes DuckDB invalidate the database:
    every later call fails. The store then reopens it (DuckDB replays its WAL: nothing
    committed is lost) before the next append, at most once a second, so writes resume by
    themselves once the cause has passed. Whoever reads beside the writer takes a fresh cursor
    from `cursor()` for each piece of work, and registers what it needs with `on_open`."""

    REOPEN_EVERY_S = 1.0

    def __init__(
        self,
        path: str,
        *,
        memory_limit: str = _DEFAULTS.memory_limit,
        checkpoint_mib: int = _DEFAULTS.checkpoint_mib,
    ):
        self.path = path
        # DuckDB checkpoints when the WAL passes this size. Its default (16 MiB) rewrites the
        # growing row group so often that commits cost 3x more (bench: docs/performance.md).
        self._config = {"memory_limit": memory_limit, "checkpoint_threshold": f"{int(checkpoint_mib)}MiB"}
        self._hooks: list = []
        self._invalidated = False  # DuckDB refuses every call: reopen before the next write
        self._failing_since: float | None = None
        self._last_reopen = 0.0
        self._con = self._open()

    def _open(self) -> duckdb.DuckDBPyConnection:
        try:
            con = duckdb.connect(self.path, config=self._config)
            apply_migrations(con)
            # the resources and scopes stored: a load inserts only those it brings new
            self._known = tuple(
                {r[0] for r in con.execute(f"SELECT {key} FROM {table}").fetchall()}
                for key, table in (("resource_id", "span_resources"), ("scope_id", "span_scopes"))
            )
            for hook in self._hooks:
                hook(con)
        except duckdb.Error as e:
            raise translate(e, self.path, writing=True) from None
        return con

    def on_open(self, hook) -> None:
        """Call `hook(connection)` now and after every reopen (e.g. to register functions)."""
        self._hooks.append(hook)
        hook(self._con)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        return self._con.cursor()

    def _reopen_if_invalidated(self) -> None:
        if not self._invalidated:
            return
        now = time.monotonic()
        if now - self._last_reopen < self.REOPEN_EVERY_S:
            raise StoreUnavailable(
                f"cannot write to {self.path} since a failed write; it is reopened once a second"
            )
        self._last_reopen = now
        with contextlib.suppress(duckdb.Error):
            self._con.close()
        self._con = self._open()  # raises (retryably) while the cause lasts
        self._invalidated = False

    def _failed(self, error: duckdb.Error) -> StoreError:
        if _INVALIDATED in str(error) or "FATAL" in str(error):
            self._invalidated = True
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.error(
                    "writing %s failed (%s): refusing spans, retryably, until writes succeed again",
                    self.path,
                    error,
                )
            return StoreUnavailable(
                f"cannot write to {self.path} ({error}); free disk space or fix the I/O error: "
                "writes resume by themselves"
            )
        return translate(error, self.path, writing=True)

    def _succeeded(self) -> None:
        if self._failing_since is not None:
            log.warning(
                "writes to %s resumed after %.0f s", self.path, time.monotonic() - self._failing_since
            )
            self._failing_since = None

    def append(self, batches: list[SpanBatch], segments: pa.Table | None = None) -> None:
        """Append batches in one transaction: all of them are committed, or none. `segments`
        (columns segment, spans, forget_below): the staging log's segments these batches come
        from, recorded in the same transaction (`loaded_segments`)."""
        self._reopen_if_invalidated()
        spans = pa.concat_tables([with_group_ids(b.spans) for b in batches], promote_options="permissive")
        links = [b.links for b in batches if b.links.num_rows]
        new = _new_groups(spans, self._known)
        con = self._con
        # Few calls on purpose: each DuckDB call drops and retakes the GIL, which costs
        # milliseconds while transport threads are busy. A registration is simply replaced
        # by the next one, so nothing is unregistered.
        try:
            con.register("batch_spans", spans)
            statements = [_INSERT_SPANS]
            if new is not None:
                con.register("batch_resources", new[0])
                con.register("batch_scopes", new[1])
                statements.insert(0, _INSERT_GROUPS)
            if links:
                con.register("batch_span_links", pa.concat_tables(links, promote_options="permissive"))
                statements.append(_INSERT_LINKS)
            if segments is not None:
                con.register("batch_segments", segments)
                statements.append(_RECORD_SEGMENTS)
            sql = (
                f"BEGIN TRANSACTION; {'; '.join(statements)}; COMMIT"
                if len(statements) > 1
                else _INSERT_SPANS
            )
            try:
                con.execute(sql)
            except BaseException:
                with contextlib.suppress(duckdb.Error):  # no transaction is open after a failed autocommit
                    con.execute("ROLLBACK")
                raise
        except duckdb.Error as e:
            raise self._failed(e) from None
        if new is not None:
            for known, table, key in zip(self._known, new, ("resource_id", "scope_id")):
                known.update(table.column(key).to_pylist())
        self._succeeded()

    def loaded_segments(self) -> set[int]:
        """The staging log's segments whose spans are stored (at least those a segment file
        still on disk may be: older rows are forgotten once their files are gone)."""
        try:
            return {r[0] for r in self._con.execute("SELECT segment FROM staging_segments").fetchall()}
        except duckdb.Error as e:
            raise translate(e, self.path, writing=True) from None

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """The write connection, for an audit run in this process (it reads with temp tables
        and saves its results here; nothing else may write meanwhile)."""
        return self._con

    def close(self) -> None:
        self._con.close()


@dataclass
class WriterStats:
    committed_spans: int = 0
    committed_batches: int = 0
    commits: int = 0
    refused_batches: int = 0
    failed_batches: int = 0
    queued_spans: int = 0


@dataclass
class _Job:
    batch: SpanBatch
    done: Future
    batches: list[SpanBatch] | None = None  # a load from the staging log: committed on its own
    segments: pa.Table | None = None


_STOP = object()


class SpanWriter:
    """The only writer thread; it owns the store. Group-commits whatever is queued."""

    def __init__(
        self,
        store: SpanStore,
        *,
        max_queued_spans: int = _DEFAULTS.queue_spans,
        max_group_spans: int = 100_000,
    ):
        self.store = store
        self.max_queued_spans = max_queued_spans
        self.max_group_spans = max_group_spans
        self.stats = WriterStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._resume = threading.Event()
        self._resume.set()
        self._thread = threading.Thread(target=self._run, name="ctxaudit-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: SpanBatch) -> Future:
        """Queue a batch; the future resolves when it is committed. Raises QueueFull."""
        n = batch.accepted
        with self._lock:
            # an empty queue always takes one batch, so a batch larger than the bound is not stuck
            if self.stats.queued_spans and self.stats.queued_spans + n > self.max_queued_spans:
                self.stats.refused_batches += 1
                raise QueueFull(f"write queue is full ({self.stats.queued_spans} spans waiting)")
            self.stats.queued_spans += n
        job = _Job(batch, Future())
        self._queue.put(job)
        return job.done

    def submit_load(self, batches: list[SpanBatch], segments: pa.Table) -> Future:
        """Queue a load from the staging log: its batches and its segments' rows, in one
        transaction of their own. Not bounded by the queue: the loader waits for each load."""
        job = _Job(batches[0], Future(), batches, segments)
        self._queue.put(job)
        return job.done

    def pause(self) -> None:
        """Hold commits (queued batches wait): for maintenance and for overload tests."""
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    def close(self) -> None:
        """Commit everything queued, then stop the thread and close the store."""
        self._resume.set()
        self._queue.put(_STOP)
        self._thread.join()
        self.store.close()

    def _run(self) -> None:
        stopping = False
        carried = None  # a load met while grouping: it is committed next, on its own
        while not stopping:
            item, carried = carried or self._queue.get(), None
            if item is _STOP:
                break
            if item.batches is not None:
                self._resume.wait()
                self._commit([item], sum(b.accepted for b in item.batches), queued=False)
                continue
            group = [item]
            spans = item.batch.accepted
            while spans < self.max_group_spans:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                if nxt.batches is not None:
                    carried = nxt
                    break
                group.append(nxt)
                spans += nxt.batch.accepted
            self._resume.wait()
            self._commit(group, spans)

    def _commit(self, group: list[_Job], spans: int, *, queued: bool = True) -> None:
        error: Exception | None = None
        try:
            if group[0].batches is not None:
                self.store.append(group[0].batches, group[0].segments)
            else:
                self.store.append([job.batch for job in group])
        except StoreError as e:
            error = e
        except Exception as e:  # a bug must fail the requests, not kill the only writer
            log.exception("unexpected error while committing %d spans", spans)
            error = e
        with self._lock:
            if queued:
                self.stats.queued_spans -= spans
            if error is None:
                self.stats.commits += 1
                self.stats.committed_batches += len(group)
                self.stats.committed_spans += spans
            else:
                self.stats.failed_batches += len(group)
        for job in group:
            if error is None:
                job.done.set_result(None)
            else:
                job.done.set_exception(error)
