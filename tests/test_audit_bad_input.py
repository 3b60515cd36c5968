"""Odd and hostile span data: the audit finishes, says something sensible, and never crashes."""

import random

import pytest

from tests.audit_helpers import audit_all, store_requests
from tests.otlp_builders import request, span

SERVER, CLIENT, UNSPECIFIED = 2, 3, 0
MS = 1_000_000
T0 = 1_764_115_200 * 10**9


@pytest.fixture
def rnd():
    return random.Random(7)


def ids(rnd, n=8):
    return rnd.randbytes(n)


def call(rnd, caller, callee, *, propagate=True, start=T0, skew=0, attrs=None):
    """A CLIENT span in `caller` and the SERVER span in `callee` it reaches (a new trace if not
    propagated); returns their requests."""
    tid, cid = ids(rnd, 16), ids(rnd)
    client = span(
        tid,
        cid,
        kind=CLIENT,
        start=start,
        end=start + 10 * MS,
        name="GET",
        attrs={"server.address": f"{callee}.local", "server.port": 80, **(attrs or {})},
    )
    server = span(
        tid if propagate else ids(rnd, 16),
        ids(rnd),
        cid if propagate else b"",
        kind=SERVER,
        start=start + MS + skew,
        end=start + 9 * MS + skew,
        name="GET /x",
        attrs={"server.address": f"{callee}.local", "server.port": 80},
    )
    return [request([client], service=caller), request([server], service=callee)]


def test_spans_without_kind_or_attributes(tmp_path, rnd):
    tid = ids(rnd, 16)
    root, child = ids(rnd), ids(rnd)
    reqs = [
        request(
            [
                span(tid, root, kind=UNSPECIFIED, start=T0, end=T0 + MS),
                span(tid, child, root, kind=UNSPECIFIED, start=T0, end=T0 + MS),
            ],
            service="bare",
        ),
        request(
            [span(ids(rnd, 16), ids(rnd), kind=UNSPECIFIED, start=T0 + 5 * MS, end=T0 + 6 * MS)],
            service="bare",
        ),
    ]
    result = audit_all(store_requests(str(tmp_path / "s.duckdb"), reqs))
    assert result.spans == 3
    assert result.counts()["orphan_root"] == 0  # no SERVER/CONSUMER root: nothing claims to be called


def test_huge_clock_skew_keeps_the_propagated_call(tmp_path, rnd):
    reqs = []
    for i in range(30):
        reqs += call(
            rnd, "a", "b", start=T0 + i * 100 * MS, skew=-3600 * 10**9
        )  # b's clock is an hour behind
    reqs += call(rnd, "a", "b", start=T0 + 50 * 100 * MS, propagate=False)
    result = audit_all(store_requests(str(tmp_path / "s.duckdb"), reqs))
    edge = {(e.caller, e.callee): e for e in result.edges}[("a", "b")]
    assert (edge.calls, edge.propagated) == (31, 30)
    assert result.counts()["orphan_root"] == 1


@pytest.mark.slow
def test_duplicate_delivery_and_duplicate_ids(tmp_path, rnd):
    reqs = []
    for i in range(20):
        reqs += call(rnd, "a", "b", start=T0 + i * 50 * MS, propagate=i % 2 == 0)
    once = audit_all(store_requests(str(tmp_path / "once.duckdb"), reqs))
    twice = audit_all(store_requests(str(tmp_path / "twice.duckdb"), reqs + reqs))  # at-least-once delivery
    assert twice.counts() == once.counts() and twice.spans == once.spans == 40
    # two different spans that share an id: one is kept, nothing breaks
    tid, sid = ids(rnd, 16), ids(rnd)
    clash = [
        request([span(tid, sid, kind=SERVER, start=T0, end=T0 + MS, name="one")], service="c"),
        request([span(tid, sid, kind=CLIENT, start=T0, end=T0 + MS, name="two")], service="d"),
    ]
    result = audit_all(store_requests(str(tmp_path / "clash.duckdb"), reqs + clash))
    assert result.spans == 41


def test_parent_cycles_do_not_hang_or_make_roots(tmp_path, rnd):
    tid, a, b = ids(rnd, 16), ids(rnd), ids(rnd)
    reqs = [
        request(
            [
                span(tid, a, b, kind=SERVER, start=T0, end=T0 + MS),
                span(tid, b, a, kind=CLIENT, start=T0, end=T0 + MS),
            ],
            service="loop",
        ),
        request([span(tid, ids(rnd), ids(rnd), kind=SERVER, start=T0, end=T0 + MS)], service="self"),
    ]
    result = audit_all(store_requests(str(tmp_path / "s.duckdb"), reqs))
    counts = result.counts()
    assert counts["orphan_root"] == 0 and counts["in_process_break"] == 0
    assert counts["dangling_parent"] == 1  # the span whose parent never came


@pytest.mark.slow
def test_one_trace_of_100k_spans(tmp_path, rnd):
    tid, root = ids(rnd, 16), ids(rnd)
    spans = [span(tid, root, kind=SERVER, start=T0, end=T0 + 10**9, name="batch")]
    spans += [
        span(
            tid,
            ids(rnd),
            root,
            kind=CLIENT,
            start=T0 + i * 1000,
            end=T0 + i * 1000 + 500,
            name="SELECT",
            attrs={"db.system.name": "postgresql", "server.address": "db"},
        )
        for i in range(100_000)
    ]
    reqs = [request(spans[i : i + 5000], service="etl") for i in range(0, len(spans), 5000)]
    result = audit_all(store_requests(str(tmp_path / "s.duckdb"), reqs))
    assert result.spans == 100_001 and result.traces == 1
    assert result.findings.num_rows == 0
    assert {(e.caller, e.callee, e.calls, e.propagated) for e in result.edges} == {
        ("etl", "db", 100_000, 100_000)
    }


def test_unicode_and_empty_service_names(tmp_path, rnd):
    reqs = []
    for i in range(30):
        reqs += call(rnd, "", "サービス-β", start=T0 + i * 100 * MS, propagate=i % 3 != 0)
    result = audit_all(store_requests(str(tmp_path / "s.duckdb"), reqs))
    orphans = [f for f in result.iter_findings() if f["kind"] == "orphan_root"]
    assert len(orphans) == 10
    # an empty service.name is stored as the SDKs' own fallback, "unknown_service"
    assert {(f["caller"], f["service"]) for f in orphans} == {("unknown_service", "サービス-β")}
    assert all(f["probable_parent"] is not None for f in orphans)
