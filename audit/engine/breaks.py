"""In-process breaks: a root CLIENT, PRODUCER or INTERNAL span that starts while its own service
is handling a request in another trace. Its probable parent is one of those requests.

Which one is learned from the data, per break operation, in the spirit of TraceWeaver's
delay model: a pool is handed work after a fixed step of the handler (the end of a certain
child span, with a gap of some distribution), and the handler often goes on with a certain
step when the work is done. Each candidate request is described by its last event before the
break started (which step, how long before) and its first event after the break ended. How
such features fall for a request that has nothing to do with the break is measured at shifted
instants (the same breaks moved by a second or so); what the true parents add on top of that
background is the excess of the real candidates' features over it. The excess is an honest
estimate: where the features do not separate candidates, it is noise, the likelihood ratios
stay near 1, and the confidence stays near 1/candidates: the matcher abstains.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from .estimate import stored_probability
from .tables import temp_table

_BUCKET_NS = 1_000_000_000

# candidate requests: stored SERVER/CONSUMER spans of the break's service, in another trace,
# in flight when the break started; `{roots}` is the breaks (or the shifted breaks)
_ENCLOSING = """
CREATE OR REPLACE TEMP TABLE {table} AS
WITH r AS ({roots}),
     s AS (SELECT rid, trace_id, span_id, service, start_ns, end_ns, th,
                  unnest(range((start_ns // $b)::BIGINT, (end_ns // $b)::BIGINT + 1)) AS bucket
           FROM w WHERE kind IN ('SERVER', 'CONSUMER') AND service IN (SELECT service FROM r)
             AND end_ns >= start_ns AND end_ns - start_ns < 3600000000000)
SELECT r.rid AS break_rid, s.rid AS parent_rid, s.trace_id AS parent_trace, s.span_id AS parent_span,
       r.service, r.name, r.start_ns, r.end_ns, coalesce(s.th, 0)::DOUBLE AS parent_th
FROM r JOIN s ON r.service = s.service AND (r.start_ns // $b)::BIGINT = s.bucket
WHERE r.start_ns BETWEEN s.start_ns AND s.end_ns AND r.trace_id <> s.trace_id
"""
_ROOTS = """SELECT rid, trace_id, service, name, start_ns::BIGINT AS start_ns,
  greatest(end_ns, start_ns)::BIGINT AS end_ns FROM roots WHERE kind NOT IN ('SERVER', 'CONSUMER')"""
# the same breaks at instants moved by 0.3-3 s either way: whatever request is in flight
# there has nothing to do with them (a hash of the row id makes the shift reproducible)
_COPIES = """SELECT r.*, k, (300000000 + hash(r.rid, k) % 2700000000)::BIGINT
    * (CASE WHEN hash(k, r.rid) % 2 = 0 THEN 1 ELSE -1 END) AS d
  FROM ({roots}) r JOIN break_ops USING (service, name), range({shifts}) t(k)"""
# the copies kept with their operation's rate (break_bg_rates; a hash again)
_SHIFTED = """SELECT rid, trace_id, service, name, start_ns + d AS start_ns, end_ns + d AS end_ns
FROM ({copies}) c JOIN break_bg_rates USING (service, name)
WHERE hash(rid, k, 1) % 1000000 < rate * 1000000"""
# The background only estimates a density, which a sample of it does as well as all of it: per
# break operation, the share of the shifted copies kept. All of them up to _BACKGROUND
# candidates; past that, enough for about _BACKGROUND_SHARE of the real candidates, or
# _BACKGROUND if more. A copy is expected to find as many candidates as a break does on
# average if it falls within the service's requests, none if not (in a short window most do not).
# Half as many as the real ones was too few: a noisier background inflates the likelihood
# ratios against "none of these" (a reliability run at 649 in flight named 35 more, all wrong)
_BG_RATES = """
CREATE OR REPLACE TEMP TABLE break_bg_rates AS
WITH s AS (SELECT service, min(start_ns)::BIGINT AS lo, max(end_ns)::BIGINT AS hi FROM w
           WHERE kind IN ('SERVER', 'CONSUMER') AND service IN (SELECT service FROM break_ops) GROUP BY ALL),
c AS (SELECT service, name, count(*) AS copies,
             count(*) FILTER (WHERE start_ns + d BETWEEN lo AND hi) AS inside
      FROM ({copies}) JOIN s USING (service) GROUP BY ALL),
p AS (SELECT service, name, count(*) AS n FROM break_pairs GROUP BY ALL)
SELECT service, name, least(1.0, greatest($target, $share * coalesce(p.n, 0))
                             / (coalesce(p.n, 0) * $shifts * inside / copies + 1))::DOUBLE AS rate
FROM c LEFT JOIN p USING (service, name)
"""
# each candidate's last event in the break's service before the break started (a span's end, or
# the request's start) and its first event after the break ended (a span's start, or its end).
# A table in DuckDB: at 10M spans there are millions of candidates (a row per request in flight
# for each break, twice that for the background), and their step names as Python strings were
# most of the audit's memory; Python fetches them numeric, the steps coded (_CODED). The real
# (`bg` false) and the background candidates share one statement: each ASOF join sorts the
# events of every request of the break services once, not once for each. The joins match on a
# number per candidate request (its trace and service), read only the events of those requests
# and carry the operation as a number: sorting by 128-bit trace ids and service names, and
# carrying the names, cost a third of their time.
_FEATURES = """
CREATE OR REPLACE TEMP TABLE break_all_features AS
WITH o AS (SELECT service, name, (row_number() OVER (ORDER BY service, name))::INTEGER AS op FROM break_ops),
p AS (SELECT break_rid, parent_rid, parent_trace, service, op, start_ns, end_ns, parent_th, false AS bg
      FROM break_pairs JOIN o USING (service, name)
      UNION ALL SELECT break_rid, parent_rid, parent_trace, service, op, start_ns, end_ns, parent_th, true
      FROM break_bg_pairs JOIN o USING (service, name)),
c AS (SELECT parent_trace, service, (row_number() OVER ())::INTEGER AS k
      FROM (SELECT DISTINCT parent_trace, service FROM p)),
pk AS (SELECT p.bg, p.break_rid, p.parent_rid, p.op, p.parent_th, p.start_ns, p.end_ns, c.k
       FROM p JOIN c USING (parent_trace, service)),
ev AS (SELECT c.k, w.kind, w.name, w.start_ns::BIGINT AS start_ns, w.end_ns::BIGINT AS end_ns
       FROM w JOIN c ON w.trace_id = c.parent_trace AND w.service = c.service
       WHERE w.service IN (SELECT service FROM break_ops)),
before AS (
  SELECT k, end_ns AS t, name FROM ev
  UNION ALL
  SELECT k, start_ns, '<start>' FROM ev WHERE kind IN ('SERVER', 'CONSUMER')),
after AS (
  SELECT k, start_ns AS t, name FROM ev WHERE kind NOT IN ('SERVER', 'CONSUMER')
  UNION ALL
  SELECT k, end_ns, '<end>' FROM ev WHERE kind IN ('SERVER', 'CONSUMER')),
p1 AS (SELECT pk.*, pk.start_ns - b.t AS gap1, b.name AS name1 FROM pk ASOF LEFT JOIN before b
       ON b.k = pk.k AND b.t <= pk.start_ns),
p2 AS (SELECT p1.bg, p1.break_rid, p1.parent_rid, p1.op, p1.parent_th, p1.gap1, p1.name1,
              a.t - p1.end_ns AS gap2, a.name AS name2
       FROM p1 ASOF LEFT JOIN after a ON a.k = p1.k AND a.t >= p1.end_ns)
SELECT p2.bg, p2.break_rid, p2.parent_rid, o.service, o.name, p2.parent_th, p2.gap1,
       coalesce(p2.name1, '<none>') AS name1, p2.gap2, coalesce(p2.name2, '<none>') AS name2
FROM p2 JOIN o USING (op)
"""
# how often each step name is a candidate's previous or next step, per break operation (real
# and background candidates): each operation's vocabulary is its 30 most frequent steps
_STEP_COUNTS = """
SELECT service, name, step, count(*)::BIGINT FROM (
  SELECT service, name, name1 AS step FROM break_all_features
  UNION ALL SELECT service, name, name2 FROM break_all_features)
GROUP BY ALL
"""
# candidates with their operation as a number and their steps as codes in its vocabulary
# (`other`, one past the vocabulary, for the rest); the real ones in a fixed order, so that a
# break's equally likely candidates are ranked the same in every run
_CODED = """
SELECT f.break_rid, f.parent_rid, o.op, f.parent_th,
       f.gap1::DOUBLE AS gap1, coalesce(c1.code, o.other) AS code1,
       f.gap2::DOUBLE AS gap2, coalesce(c2.code, o.other) AS code2
FROM break_all_features f JOIN break_vocab_ops o USING (service, name)
LEFT JOIN break_vocab c1 ON c1.op = o.op AND c1.step = f.name1
LEFT JOIN break_vocab c2 ON c2.op = o.op AND c2.step = f.name2
WHERE f.bg = {bg}
"""
_OP_RATES = "SELECT o.op, r.rate FROM break_vocab_ops o JOIN break_bg_rates r USING (service, name)"
_BATCH_ROWS = 1 << 20  # background candidates are counted into histograms a batch at a time
_SHIFTS = 2  # shifted copies of each break: the background sample is twice the real one
_BACKGROUND = 500_000  # background candidates per break operation past which copies are sampled
_BACKGROUND_SHARE = 1.0  # the sampled background's size against the real candidates'

_BREAK_OPS = """
SELECT r.service, r.name, mode(r.kind), count(DISTINCT r.rid) AS roots, count(DISTINCT p.break_rid) AS during
FROM roots r LEFT JOIN break_pairs p ON p.break_rid = r.rid
WHERE r.kind NOT IN ('SERVER', 'CONSUMER') GROUP BY r.service, r.name
"""
# the share of the window during which a service has a stored request in flight, from 1000
# evenly spaced instants: what "starts during a request" would be by chance alone
_DUTY = """
WITH pts AS (SELECT $wlo + i * (($whi - $wlo) // 1000) AS t FROM range(1000) r(i)),
     s AS (SELECT service, start_ns, end_ns,
                  unnest(range((start_ns // $b)::BIGINT, (end_ns // $b)::BIGINT + 1)) AS bucket
           FROM w WHERE kind IN ('SERVER', 'CONSUMER') AND end_ns >= start_ns
             AND end_ns - start_ns < 3600000000000
             AND service IN (SELECT service FROM roots WHERE kind NOT IN ('SERVER', 'CONSUMER')))
SELECT service, count(DISTINCT pts.t) / 1000.0 FROM pts JOIN s ON (pts.t // $b)::BIGINT = s.bucket
WHERE pts.t BETWEEN s.start_ns AND s.end_ns GROUP BY service
"""


def break_operations(con: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int) -> tuple[list, list]:
    """Build break_pairs; split the root operations that are not calls into (breaks, jobs).

    An operation is a break when its roots start during a stored request of their service more
    often than chance (the service's duty cycle) explains: the request handed it work. Where
    requests are (nearly) always in flight, or too few roots leave the test without power,
    timing cannot tell, and a root exit (CLIENT, PRODUCER) is taken for a break while a root
    INTERNAL span is taken for a job (cron, poller)."""
    con.execute(_ENCLOSING.format(table="break_pairs", roots=_ROOTS), {"b": _BUCKET_NS})
    duty = dict(con.execute(_DUTY, {"b": _BUCKET_NS, "wlo": start_ns, "whi": end_ns}).fetchall())
    breaks, jobs = [], []
    for service, name, kind, roots, during in con.execute(_BREAK_OPS).fetchall():
        d = duty.get(service, 0.0)
        excess, noise = during / roots - d, 3 * (d * (1 - d) / roots) ** 0.5
        correlated = during >= 2 and excess >= max(0.1, noise)
        # timing cannot tell when even roots that all start inside requests would not stand out
        # of the chance (1 - d leaves no room for an excess of 0.1 or of the noise): a busy
        # service's root exits are then taken for breaks
        untestable = d >= 0.9 or 1 - d < max(0.1, noise)
        busy_exit = untestable and kind in ("CLIENT", "PRODUCER") and during / roots >= 0.9
        (breaks if correlated or busy_exit else jobs).append((service, name))
    return breaks, jobs


def stitch_breaks(con: duckdb.DuckDBPyConnection) -> dict[str, np.ndarray]:
    """Columns rid, parent_rid, confidence, candidates: each break's likeliest request, for the
    breaks of the operations in `break_ops` (break_pairs built by `break_operations`).

    The confidence is the posterior of that request among its candidates and "none of these"
    (the real request was not sampled), with each candidate's likelihood ratio from the delay
    model learned for its break operation (`HandoffModel`)."""
    copies = _COPIES.format(roots=_ROOTS, shifts=_SHIFTS)
    params = {"target": _BACKGROUND, "share": _BACKGROUND_SHARE, "shifts": _SHIFTS}
    con.execute(_BG_RATES.format(copies=copies), params)
    shifted = _SHIFTED.format(copies=copies)
    con.execute(_ENCLOSING.format(table="break_bg_pairs", roots=shifted), {"b": _BUCKET_NS})
    con.execute(_FEATURES)
    con.execute("DROP TABLE break_bg_pairs")
    rows = _vocabularies(con)
    rates = dict(con.execute(_OP_RATES).fetchall())
    real = _fetch(con, _CODED.format(bg="false") + " ORDER BY f.break_rid, f.parent_rid")
    background = _background_counts(con, rows)
    for table in ("break_all_features", "break_vocab", "break_vocab_ops", "break_bg_rates"):
        con.execute(f"DROP TABLE {table}")
    n = len(real["break_rid"])
    empty = {"rid": np.zeros(0, np.int64), "parent_rid": np.zeros(0, np.int64), "confidence": np.zeros(0)}
    if n == 0:
        return empty | {"candidates": np.zeros(0, np.int64)}
    brk, parent = real["break_rid"].astype(np.int64), real["parent_rid"].astype(np.int64)
    c1, c2 = _cells(real["code1"], real["gap1"]), _cells(real["code2"], real["gap2"])
    p_stored = stored_probability(real["parent_th"])
    ratio = np.ones(n)
    for op in np.unique(real["op"]):
        i = np.nonzero(real["op"] == op)[0]
        size = rows[op] * _BINS
        counts = (np.bincount(c1[i], minlength=size), np.bincount(c2[i], minlength=size))
        per_break = np.unique(brk[i], return_index=True)[1]
        trues = float(p_stored[i][per_break].sum())  # expected true parents among the candidates
        model = HandoffModel.fit(counts, background[op], rows[op], len(i), trues, rates.get(op, 1.0))
        ratio[i] = model.ratio(c1[i], c2[i])
    return posterior(brk, parent, ratio, p_stored)


def _vocabularies(con: duckdb.DuckDBPyConnection) -> dict[int, int]:
    """Tables break_vocab_ops (service, name, op, other) and break_vocab (op, step, code): each
    break operation's 30 most frequent steps; returns the histogram rows per op (steps + other)."""
    steps: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for service, name, step, count in con.execute(_STEP_COUNTS).fetchall():
        steps.setdefault((service, name), []).append((step, count))
    ops, vocab = [], []
    for op, (key, pairs) in enumerate(sorted(steps.items())):
        pairs.sort()  # as np.unique orders them, so that ties in count are broken the same way
        names = np.array([x for x, _ in pairs], dtype=object)
        kept = names[np.argsort(-np.array([c for _, c in pairs], dtype=np.int64))][:30]
        ops.append((*key, op, len(kept)))
        vocab += [(op, str(x), k) for k, x in enumerate(kept)]
    temp_table(
        con,
        "break_vocab_ops",
        {
            "service": pa.array([o[0] for o in ops], pa.string()),
            "name": pa.array([o[1] for o in ops], pa.string()),
            "op": pa.array([o[2] for o in ops], pa.int64()),
            "other": pa.array([o[3] for o in ops], pa.int64()),
        },
    )
    temp_table(
        con,
        "break_vocab",
        {
            "op": pa.array([v[0] for v in vocab], pa.int64()),
            "step": pa.array([v[1] for v in vocab], pa.string()),
            "code": pa.array([v[2] for v in vocab], pa.int64()),
        },
    )
    return {op: other + 1 for _, _, op, other in ops}


def _columns(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    # gaps without an event are NULL: NaN in the float column
    return {n: batch.column(n).to_numpy(zero_copy_only=False) for n in batch.schema.names}


def _fetch(con: duckdb.DuckDBPyConnection, query: str) -> dict[str, np.ndarray]:
    table = con.sql(query).to_arrow_table()
    return {n: table.column(n).to_numpy() for n in table.column_names}


def _background_counts(con: duckdb.DuckDBPyConnection, rows: dict[int, int]) -> dict:
    """Per operation: the background candidates' counts per (step, gap bin) cell, before and
    after, counted a batch at a time (the background is twice the real candidates)."""
    counts = {op: (np.zeros(r * _BINS, np.int64), np.zeros(r * _BINS, np.int64)) for op, r in rows.items()}
    reader = con.sql(_CODED.format(bg="true")).to_arrow_reader(_BATCH_ROWS)
    for batch in reader:
        cols = _columns(batch)
        c1, c2 = _cells(cols["code1"], cols["gap1"]), _cells(cols["code2"], cols["gap2"])
        for op in np.unique(cols["op"]):
            i = cols["op"] == op
            size = rows[op] * _BINS
            counts[op][0][:] += np.bincount(c1[i], minlength=size)
            counts[op][1][:] += np.bincount(c2[i], minlength=size)
    return counts


def posterior(brk, parent, ratio, p_stored) -> dict[str, np.ndarray]:
    """Per break, its best candidate and that candidate's posterior. Before the data, each of a
    break's N candidates is the parent with probability p/N (p: the chance that the parent was
    sampled at all, from the candidates' thresholds) and none is with 1 - p; a candidate's
    likelihood ratio (true parent against unrelated request) updates that."""
    order = np.lexsort((-ratio, brk))
    brk, parent, ratio, p_stored = brk[order], parent[order], ratio[order], p_stored[order]
    starts = np.r_[0, np.nonzero(np.diff(brk))[0] + 1]  # each break's candidates, best first
    counts = np.diff(np.r_[starts, len(brk)])
    p = np.add.reduceat(p_stored, starts) / counts
    none = counts * (1.0 - p) / p
    confidence = ratio[starts] / (np.add.reduceat(ratio, starts) + none)
    return {"rid": brk[starts], "parent_rid": parent[starts], "confidence": confidence, "candidates": counts}


_BINS = 80  # gap bins: a tenth of a decade each from 1 µs to 100 s, after bin 0 (no such event)
_Z = 2.0  # an excess within this many standard deviations of the background's noise is none
_SMOOTH = np.array([0.25, 0.5, 0.25])


def _cells(codes: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """(step code, gap bin) -> one cell number; a gap without an event (NaN) is bin 0."""
    g = np.asarray(gaps, dtype=float)
    missing = np.isnan(g)
    lg = np.log10(np.maximum(np.where(missing, 1.0, g), 1_000.0)) - 3.0
    b = np.where(missing, 0, 1 + np.clip((lg * 10).astype(np.int64), 0, _BINS - 2))
    return np.asarray(codes, dtype=np.int64) * _BINS + b


def _histogram(counts: np.ndarray, rows: int) -> np.ndarray:
    """Cell counts smoothed along the gap bins of each step."""
    h = counts.astype(float).reshape(rows, _BINS)
    smooth = h.copy()
    smooth[:, 1:] = np.apply_along_axis(lambda x: np.convolve(x, _SMOOTH, mode="same"), 1, h[:, 1:])
    return smooth.ravel()


class HandoffModel:
    """Per break operation: the likelihood ratio, true parent against unrelated request, of a
    candidate's (previous step, gap before) and (next step, gap after), each a histogram over
    step x log-gap. The background is measured at shifted instants; the true parents' share is
    what the real candidates show in excess of it (E[real] = (N - p) background + p true)."""

    def __init__(self, lr1: np.ndarray, lr2: np.ndarray):
        self.lr1, self.lr2 = lr1, lr2

    @classmethod
    def fit(
        cls, real: tuple, background: tuple, rows: int, n_real: int, trues: float, rate: float = 1.0
    ) -> HandoffModel:
        """`real`, `background`: per feature (before, after), the candidates' counts per cell
        (_cells); `trues`: the expected number of true parents among the n_real candidates;
        `rate`: the share of the shifted copies the background kept (break_bg_rates)."""
        lrs = []
        for real_counts, bg_counts in zip(real, background):
            h, bg = _histogram(real_counts, rows), _histogram(bg_counts, rows)
            p_bg = (bg + 1.0 / len(bg)) / (bg.sum() + 1.0)
            unrelated = max(n_real - trues, 0.0)
            expected = unrelated * p_bg
            # the noise allowed for is the real candidates' (Poisson) with the full background;
            # a sampled background adds its own, each of its counts standing for unrelated / n_bg
            # real ones (a cell it left empty may still hold about one)
            scale = unrelated / max(float(bg_counts.sum()), 1.0)
            noise = expected + 1.0 + (1.0 - rate) * scale**2 * (bg + 1.0)
            excess = np.maximum(h - expected - _Z * np.sqrt(noise), 0.0)
            if excess.sum() > trues:
                excess *= trues / excess.sum()
            p_true = excess / max(trues, 1e-9) + (1.0 - excess.sum() / max(trues, 1e-9)) * p_bg
            lrs.append(p_true / p_bg)
        return cls(*lrs)

    def ratio(self, cells1: np.ndarray, cells2: np.ndarray) -> np.ndarray:
        return self.lr1[cells1] * self.lr2[cells2]
