"""The calibration solves the assignment only over the groups of orphans and exits that hold a
decoy (audit/engine/calibrate.py): the maps it fits are those of solving every orphan again,
and it leaves the main pass's candidate tables as they were."""

import duckdb
import numpy as np

from audit.cli import DbSink
from audit.engine import calibrate as calibration
from audit.scenarios.model import Scenario
from audit.scenarios.simulate import Simulator
from tests.audit_helpers import candidates_over_store

_TABLES = ("cand_orphans", "cand_exits", "cand_pairs", "cand_counts", "exact_only")


def _store(path: str) -> None:
    """A custom RPC hop without a key at a few calls in flight (many small groups of orphans and
    exits), two server spans in five starting late, and an HTTP hop with paths; 30% of both
    calls lose context."""
    call = {"latency_ms": {"median": 1.0, "p99": 4.0}}
    drop = {"probability": 0.3, "cause": "custom_rpc_no_context"}
    scenario = Scenario.model_validate(
        {
            "name": "groups",
            "duration_s": 8,
            "services": {
                "gateway": {
                    "operations": {
                        "GET /page": {
                            "duration_ms": {"median": 0.5, "p99": 5},
                            "calls": [
                                {"to": "rpcsvc", "protocol": "rpc", "operation": "shop.Custom/Call"}
                                | call
                                | {"drop": drop},
                                {"to": "web", "protocol": "http", "operation": "GET /items/{id}"}
                                | call
                                | {"drop": drop | {"cause": "http_no_context"}},
                            ],
                        }
                    }
                },
                "rpcsvc": {"operations": {"shop.Custom/Call": {"duration_ms": {"median": 5, "p99": 40}}}},
                "web": {"operations": {"GET /items/{id}": {"duration_ms": {"median": 3, "p99": 20}}}},
            },
            "entrypoints": [{"service": "gateway", "operation": "GET /page", "rate_per_s": 300}],
        }
    )
    sink = DbSink(path)
    for request, _ in Simulator(scenario, seed=5).run():
        sink.send(request.SerializeToString())
    sink.close()
    con = duckdb.connect(path)  # two server spans in five start late: the raw confidences overstate
    con.execute(
        "UPDATE spans SET start_ns = start_ns + (end_ns - start_ns) * 9 // 10"
        " WHERE service_name = 'rpcsvc' AND hash(span_id) % 5 < 2"
    )
    con.close()


def _rows(con) -> dict:
    return {name: con.execute(f"SELECT * FROM {name} ORDER BY ALL").fetchall() for name in _TABLES}


def test_the_decoys_groups_give_the_maps_of_every_orphan_and_leave_the_tables(tmp_path, monkeypatch):
    db = str(tmp_path / "late.duckdb")
    _store(db)
    con = duckdb.connect(db, read_only=True)
    learned, audited, skew, lag = candidates_over_store(con)
    before = _rows(con)
    sizes = {}
    grouped_only = calibration._decoy_groups

    def grouped(con, first):
        got = grouped_only(con, first)
        sizes["groups"] = len(got)
        sizes["all"] = con.execute("SELECT count(DISTINCT oid) FROM cal_pairs").fetchall()[0][0]
        return got

    monkeypatch.setattr(calibration, "_decoy_groups", grouped)
    cal = calibration.calibrate(con, learned, audited, skew, lag)
    assert _rows(con) == before
    left = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE table_name LIKE 'cal%'"
        " UNION ALL SELECT view_name FROM duckdb_views() WHERE view_name = 'cand_exits'"
    ).fetchall()
    assert left == []
    assert 0 < sizes["groups"] < sizes["all"]  # some orphans were left out of the assignment

    def every(con, first):  # every orphan with a candidate, decoy or not
        return con.execute("SELECT DISTINCT oid FROM cal_pairs ORDER BY oid").fetchnumpy()["oid"]

    monkeypatch.setattr(calibration, "_decoy_groups", every)
    full = calibration.calibrate(con, learned, audited, skew, lag)
    con.close()
    assert sum(cal.links.values()) >= 100
    assert cal.links == full.links and cal.right == full.right
    assert cal.protocols.keys() == full.protocols.keys() and cal.edges.keys() == full.edges.keys()
    for mine, theirs in [(cal.protocols[p], full.protocols[p]) for p in cal.protocols] + [
        (cal.edges[e], full.edges[e]) for e in cal.edges
    ]:
        assert len(mine[0]) == len(theirs[0])
        assert np.allclose(mine[0], theirs[0], atol=1e-4) and np.allclose(mine[1], theirs[1], atol=1e-4)
