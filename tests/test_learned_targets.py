"""Hand-built stores for two things the audit learns from the data: the timing of an edge that
never propagates, on a slow hop with jittery legs (audit/engine/skew.py), and the callee of
client spans that name no target, from the calls of the same operation that propagated
(audit/engine/learn.py, `Learned.operation_targets`)."""

import math

import duckdb
import numpy as np
import pytest

from audit.engine.skew import infer_edge
from audit.engine.timing import LogNormal, StudentT, SyncModel

MS = 1_000_000


def _slow_jittery_hop(con: duckdb.DuckDBPyConnection, rng: np.random.Generator) -> np.ndarray:
    """`roots` and `xt` as the scan and the resolution leave them, for one edge that never
    propagates: a call every 1.1 ms, 240 ms in the callee (so about 200 in flight), each leg of
    the network log-normal with a 2.5 ms median and p99 ten times that; 70% of the calls'
    server spans stored (the callee samples its own roots). Returns the true overheads."""
    n = 2600
    es = np.cumsum(rng.exponential(1.1 * MS, n)).astype(np.int64)
    legs = np.exp(rng.normal(math.log(2.5 * MS), 1.0, (2, n)))
    serve = np.exp(rng.normal(math.log(240 * MS), 0.3, n))
    os_ = es + legs[0]
    oe = os_ + serve
    ee = oe + legs[1]
    kept = rng.random(n) < 0.7
    con.execute(
        "CREATE TEMP TABLE roots AS SELECT 'callee' AS service, 'SERVER' AS kind, false AS linked,"
        " unnest($s)::BIGINT AS start_ns, unnest($e)::BIGINT AS end_ns",
        {"s": os_[kept].astype(np.int64).tolist(), "e": oe[kept].astype(np.int64).tolist()},
    )
    con.execute(
        "CREATE TEMP TABLE xt AS SELECT 'caller' AS service, 'callee' AS target, 'grpc' AS protocol,"
        " true AS instrumented, false AS continued_to_target,"
        " unnest($s)::BIGINT AS start_ns, unnest($e)::BIGINT AS end_ns",
        {"s": es.tolist(), "e": ee.astype(np.int64).tolist()},
    )
    return (legs[0] + legs[1])[kept]


def test_a_slow_jittery_hop_that_never_propagates_learns_its_own_overhead():
    # the borrowed model (everything else's, widened) reaches 120 ms of overhead: over every
    # overhead at once the unrelated pairs drown the peak, and the overhead fitted on the pairs
    # "in the peak" was theirs (63 ms on such a hop, where true calls have 6 ms)
    con = duckdb.connect()
    true_overhead = _slow_jittery_hop(con, np.random.default_rng(5))
    borrowed = SyncModel(LogNormal(math.log(3.3 * MS), 1.2), StudentT(0.0, 50 * MS), 0, "default")
    model = infer_edge(con, "caller", "callee", "grpc", borrowed, 50 * MS)
    assert model is not None and model.source == "inferred"
    median = float(np.median(true_overhead))
    assert model.overhead.quantile(0.0) == pytest.approx(median, rel=0.35)
    assert abs(model.offset.loc) < 2 * MS  # the legs are symmetric, the clocks agree
    assert model.offset.scale < 8 * MS
