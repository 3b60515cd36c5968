"""Hand-built stores for two things the audit learns from the data: the timing of an edge that
never propagates, on a slow hop with jittery legs (audit/engine/skew.py), and the callee of
client spans that name no target, from the calls of the same operation that propagated
(audit/engine/learn.py, `Learned.operation_targets`)."""

import math
import random
import re

import duckdb
import numpy as np
import pytest

from audit.engine.learn import operation_targets
from audit.engine.skew import infer_edge
from audit.engine.timing import LogNormal, StudentT, SyncModel
from tests.audit_helpers import audit_all, store_requests
from tests.otlp_builders import request, span

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


US = 1_000
T0 = 1_764_115_200 * 10**9
CLIENT, SERVER = 3, 2


def _client_spans_without_targets(tmp_path, *, cut: float = 0.3, n: int = 300):
    """`seat` handles a request and calls `config` with an `HTTP GET` client span that carries
    no URL, no address, no peer.service (the OTel Java agent's spans in the TrainTicket
    capture); `seat`'s `HTTP POST` spans go to `order` or `price` at random. A share `cut` of
    the calls lose their context. Returns the store and the truth {orphan span id: (trace, exit span)}."""
    rnd = random.Random(7)
    spans: dict[str, list] = {"seat": [], "config": [], "order": [], "price": []}
    truth = {}
    t = T0
    for _ in range(n):
        trace, root = rnd.randbytes(16), rnd.randbytes(8)
        at = t + 100 * US
        end = at
        for name, callee in (("HTTP GET", "config"), ("HTTP POST", rnd.choice(["order", "price"]))):
            exit_id, server_id = rnd.randbytes(8), rnd.randbytes(8)
            work = int(rnd.uniform(300, 900)) * US
            spans["seat"].append(
                span(trace, exit_id, root, name=name, kind=CLIENT, start=at, end=at + work + 400 * US)
            )
            lost = rnd.random() < cut
            server_trace = rnd.randbytes(16) if lost else trace
            spans[callee].append(
                span(
                    server_trace,
                    server_id,
                    b"" if lost else exit_id,
                    name=f"/api/v1/{callee}",
                    kind=SERVER,
                    start=at + 200 * US,
                    end=at + 200 * US + work,
                    attrs={"http.route": f"/api/v1/{callee}"},
                )
            )
            if lost:
                truth[server_id] = (trace, exit_id)
            end = at = at + work + 600 * US
        spans["seat"].append(span(trace, root, b"", name="/api/v1/seat", kind=SERVER, start=t, end=end))
        t += int(rnd.expovariate(1.0) * 4_000 * US)
    path = store_requests(
        str(tmp_path / "no-targets.duckdb"), [request(s, service=k) for k, s in spans.items()]
    )
    return path, truth


def test_client_spans_without_a_target_take_the_callee_their_operation_propagates_to(tmp_path):
    path, truth = _client_spans_without_targets(tmp_path)
    result = audit_all(path)
    orphans = {bytes.fromhex(f["span_id"]): f for f in result.iter_findings() if f["kind"] == "orphan_root"}
    config = {
        sid: want for sid, want in truth.items() if sid in orphans and orphans[sid]["service"] == "config"
    }
    assert len(config) > 50
    right = sum(
        (p := orphans[sid]["probable_parent"]) is not None
        and (bytes.fromhex(p["trace_id"]), bytes.fromhex(p["span_id"])) == want
        for sid, want in config.items()
    )
    assert right >= 0.95 * len(config)
    # the evidence is the resolution: the unpaired `HTTP GET` exits say where they were going
    unpaired = [
        f for f in result.iter_findings() if f["kind"] == "unpaired_exit" and f["span_name"] == "HTTP GET"
    ]
    assert unpaired and all(f["callee"] == "config" for f in unpaired)
    assert all(
        re.search(r"resolved by operation \(learned from \d+ propagated calls\)", f["evidence"])
        for f in unpaired
    )
    # `HTTP POST` lands in two services about half and half: no single callee is learned, each
    # of its unpaired exits may have gone to either (tests/test_spread_targets.py), and is one
    # finding, on one of them
    posts = [
        f for f in result.iter_findings() if f["kind"] == "unpaired_exit" and f["span_name"] == "HTTP POST"
    ]
    assert posts and {f["callee"] for f in posts} <= {"order", "price"}
    assert len({f["span_id"] for f in posts}) == len(posts)
    assert all("one of 2 callees" in f["evidence"] for f in posts)


def test_an_operation_is_resolved_only_where_one_callee_dominates_enough_calls():
    rows = [("seat", "HTTP GET", "http", "config", 96), ("seat", "HTTP GET", "http", "other", 4)]
    rows += [("seat", "HTTP PUT", "http", "config", 19)]  # too few calls to trust
    rows += [("gw", "HTTP POST", "http", "a", 90), ("gw", "HTTP POST", "http", "b", 10)]
    assert operation_targets(rows) == {("seat", "HTTP GET", "http"): ("config", 100)}
