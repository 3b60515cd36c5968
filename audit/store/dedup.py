"""Which spans of a batch the store holds already, so that loading the same capture twice
stores nothing new (`ctxaudit import`).

A span is already stored when a span with the same trace id, span id and start time is. The
start time is part of the key only to bound the search: DuckDB skips the row groups whose
start times lie outside the batch's, so a check reads little of a large store when the capture
covers a different time, and all of it at worst."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .batch import SpanBatch

# Row numbers (`i`) of the batch's spans to drop: stored already, or an earlier copy in the batch.
_DROP_SPANS = """
WITH b AS (
    SELECT i, (trace_id_hi::UHUGEINT << 64) | trace_id_lo::UHUGEINT AS trace_id, span_id, start_ns
    FROM dedup_batch
)
SELECT i, true AS stored FROM b SEMI JOIN (
    SELECT trace_id, span_id, start_ns FROM spans WHERE start_ns BETWEEN $lo AND $hi
) s USING (trace_id, span_id, start_ns)
UNION ALL
SELECT i, false FROM b QUALIFY row_number() OVER (PARTITION BY trace_id, span_id, start_ns ORDER BY i) > 1
"""

# Row numbers of the links to drop: their span is stored already, or the same link came twice.
_DROP_LINKS = """
SELECT l.i FROM dedup_links l SEMI JOIN stored_spans d USING (trace_id_hi, trace_id_lo, span_id)
UNION
SELECT i FROM dedup_links
QUALIFY row_number() OVER (
    PARTITION BY trace_id_hi, trace_id_lo, span_id, link_trace_id_hi, link_trace_id_lo, link_span_id
    ORDER BY i
) > 1
"""


def _keep(n: int, drop: list[int]) -> pa.Array:
    mask = np.ones(n, dtype=bool)
    mask[np.asarray(drop, dtype=np.int64)] = False
    return pa.array(mask)


def drop_stored(cursor, batch: SpanBatch) -> tuple[SpanBatch, int]:
    """`batch` without the spans `cursor`'s store holds already (and their links), and how many
    were dropped. `cursor` is a cursor of the write connection: commits before the call are seen."""
    spans = batch.spans
    n = spans.num_rows
    if n == 0:
        return batch, 0
    ids = pa.table(
        {
            "i": pa.array(np.arange(n, dtype=np.int64)),
            "trace_id_hi": spans["trace_id_hi"],
            "trace_id_lo": spans["trace_id_lo"],
            "span_id": spans["span_id"],
            "start_ns": spans["start_ns"],
        }
    )
    lo, hi = pc.min_max(spans["start_ns"]).values()
    cursor.register("dedup_batch", ids)
    try:
        rows = cursor.execute(_DROP_SPANS, {"lo": lo.as_py(), "hi": hi.as_py()}).fetchall()
    finally:
        cursor.unregister("dedup_batch")
    if not rows:
        return batch, 0
    drop = list({i for i, _ in rows})  # a copy of a stored span is both
    keep = _keep(n, drop)
    links = batch.links
    if links.num_rows:
        # (only the id columns: `take` cannot unify dictionary columns across chunks)
        stored = spans.select(["trace_id_hi", "trace_id_lo", "span_id"])
        stored = stored.take(pa.array([i for i, was in rows if was], pa.int64()))
        link_ids = links.select(
            ["trace_id_hi", "trace_id_lo", "span_id", "link_trace_id_hi", "link_trace_id_lo", "link_span_id"]
        ).append_column("i", pa.array(np.arange(links.num_rows, dtype=np.int64)))
        cursor.register("dedup_links", link_ids)
        cursor.register("stored_spans", stored)
        try:
            drop_links = [r[0] for r in cursor.execute(_DROP_LINKS).fetchall()]
        finally:
            cursor.unregister("dedup_links")
            cursor.unregister("stored_spans")
        if drop_links:
            links = links.filter(_keep(links.num_rows, drop_links))
    kept = SpanBatch(
        spans.filter(keep), links, batch.rejected, batch.rejection_reasons, batch.end_before_start
    )
    return kept, len(drop)
