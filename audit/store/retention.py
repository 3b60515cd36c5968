"""Retention: spans older than N days, and the oldest spans beyond N GiB, deleted in the
background while the server ingests. Deletes go a minute of span start times at a time, each
its own short transaction beside the writer's (DuckDB's MVCC: deleting old rows and appending
new ones do not conflict), so ingestion never waits on a long delete. Saved audit runs,
findings and edges are kept: the explorer and reports still show them, and a deleted trace
only says it is no longer stored.

On size: DuckDB does not give freed space back to the file system; it reuses it after a
checkpoint. So the limit stops the file from growing past it; it does not shrink it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import duckdb

from .errors import translate

log = logging.getLogger(__name__)

_NS_PER_DAY = 86_400 * 10**9
_SLICE_NS = 60 * 10**9  # one transaction deletes at most a minute of span start times
_SIZE_HEADROOM = 0.9  # delete down to 90% of the size limit, so one pass lasts a while


@dataclass
class Pruned:
    spans: int = 0
    links: int = 0
    seconds: float = 0.0


class Retention:
    def __init__(
        self,
        source,
        path: str,
        *,
        days: float | None = None,
        max_bytes: int | None = None,
        clock=time.time_ns,
    ):
        """`source`: a DuckDB connection or a SpanStore; each pass takes a fresh cursor from it."""
        self.source, self.path, self.days, self.max_bytes, self.clock = source, path, days, max_bytes, clock
        self._size_after_last_delete: tuple[int, int] | None = None

    def _cutoff_ns(self, con: duckdb.DuckDBPyConnection) -> int | None:
        """Spans starting before this go: the older of the age and the size limits' cutoffs."""
        cutoffs = []
        if self.days is not None:
            cutoffs.append(self.clock() - int(self.days * _NS_PER_DAY))
        if self.max_bytes is not None:
            by_size = self._size_cutoff(con)
            if by_size is not None:
                cutoffs.append(by_size)
        return max(cutoffs) if cutoffs else None

    @staticmethod
    def _used(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
        block_size, used, total = con.execute(
            "SELECT block_size, used_blocks, total_blocks FROM pragma_database_size()"
        ).fetchone()
        return used * block_size, total

    def _size_cutoff(self, con: duckdb.DuckDBPyConnection) -> int | None:
        used, total = self._used(con)
        if used <= self.max_bytes:
            return None
        if self._size_after_last_delete == (used, total):
            return None  # what the last pass freed is not counted before a checkpoint: do not delete twice
        share = 1 - self.max_bytes * _SIZE_HEADROOM / used  # the oldest share of spans to delete
        (cutoff,) = con.execute(
            "SELECT approx_quantile(start_ns::BIGINT, ?::FLOAT) FROM spans", [min(share, 1.0)]
        ).fetchone()
        return None if cutoff is None else int(cutoff)

    def prune_once(self) -> Pruned:
        """One pass: delete what the limits say, a slice at a time; then the links of deleted spans."""
        started, pruned = time.monotonic(), Pruned()
        con = None
        try:
            con = self.source.cursor()
            cutoff = self._cutoff_ns(con)
            if cutoff is None:
                return pruned
            while True:
                (oldest,) = con.execute("SELECT min(start_ns) FROM spans").fetchone()
                if oldest is None or oldest >= cutoff:
                    break
                end = min(oldest + _SLICE_NS, cutoff)
                (n,) = con.execute("DELETE FROM spans WHERE start_ns < ?", [end]).fetchone()
                pruned.spans += n
            if pruned.spans:
                (pruned.links,) = con.execute("""
                    DELETE FROM span_links l WHERE NOT EXISTS
                      (SELECT 1 FROM spans s
                       WHERE s.trace_id = l.trace_id AND s.span_id = l.span_id)""").fetchone()
                self._checkpoint(con)
                if self.max_bytes is not None:
                    self._size_after_last_delete = self._used(con)
        except duckdb.Error as e:
            raise translate(e, self.path, writing=True) from None
        finally:
            if con is not None:
                con.close()
        pruned.seconds = time.monotonic() - started
        return pruned

    @staticmethod
    def _checkpoint(con: duckdb.DuckDBPyConnection) -> None:
        """Make the freed blocks reusable now, if no transaction is in the way (else the writer's
        next automatic checkpoint does it)."""
        try:
            con.execute("CHECKPOINT")
        except duckdb.Error as e:
            log.debug("retention: no checkpoint now (%s); the next automatic one frees the space", e)
