"""The audit engine on the simulator's shop: what it finds, what it stitches, the edges it
counts, against the ground truth; and the result document's contract."""

import re

import duckdb
import pytest

from audit.scenarios.score import exit_peers, score
from tests.audit_helpers import audit_all, simulated_store

HEX32, HEX16 = re.compile(r"^[0-9a-f]{32}$"), re.compile(r"^[0-9a-f]{16}$")
FINDING_KEYS = {
    "kind",
    "trace_id",
    "span_id",
    "service",
    "span_name",
    "span_kind",
    "start_time_unix_nano",
    "protocol",
    "system",
    "caller",
    "callee",
    "cause",
    "explanation",
    "fix",
    "evidence",
    "probable_parent",
}
EDGE_KEYS = {
    "caller",
    "callee",
    "protocol",
    "system",
    "callee_instrumented",
    "calls",
    "propagated",
    "dropped",
    "stitched",
    "propagation_rate",
    "broken",
    "cause",
}


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    db, truth = simulated_store(tmp_path_factory.mktemp("shop"))
    result = audit_all(db)
    con = duckdb.connect(db, read_only=True)
    peers = exit_peers(con)
    con.close()
    return db, truth, result, result.to_dict() | {"peers": peers}


def test_detection_matches_the_truth(shop):
    _, truth, _, doc = shop
    s = score(truth, doc)
    for kind, (precision, recall) in s.detection.items():
        assert recall.total > 0, kind
        assert precision.value >= 0.99 and recall.value >= 0.99, (kind, str(precision), str(recall))


def test_stitching_names_true_parents_and_abstains_when_the_parent_was_not_stored(shop):
    _, truth, _, doc = shop
    stitched = score(truth, doc).stitching["all"]
    assert stitched.recall.total >= 10 and stitched.abstention.total >= 30
    assert stitched.precision.value >= 0.98, str(stitched.precision)
    assert stitched.recall.value >= 0.95, str(stitched.recall)
    assert stitched.abstention.value >= 0.95, str(stitched.abstention)


def test_every_orphan_names_the_truths_cause_and_hop(shop):
    _, truth, _, doc = shop
    assert score(truth, doc).causes.value == 1.0
    by_id = {(t["trace_id"], t["span_id"]): t for t in truth}
    for f in doc["findings"]:
        t = by_id[(f["trace_id"], f["span_id"])]
        if f["kind"] == "orphan_root":
            assert f"{f['caller']}->{f['callee']}" == t["hop"]
            assert f["protocol"] == {"kafka": "messaging"}.get(t["protocol"], t["protocol"])


def test_broken_edges_are_the_truths(shop):
    _, truth, _, doc = shop
    edges = score(truth, doc, doc["peers"]).edges
    assert {(e.caller, e.callee) for e in edges if e.broken} == {
        (e.caller, e.callee) for e in edges if e.found_broken
    }
    assert {(e.caller, e.callee) for e in edges if e.broken} >= {
        ("gateway", "recommendations"),
        ("checkout", "payments"),
        ("checkout", "notifications"),
    }
    for e in edges:
        if e.found_rate is not None:  # the stored calls are a sample: allow three standard errors
            noise = 3 * (e.true_rate * (1 - e.true_rate) / e.found_calls) ** 0.5
            assert abs(e.found_rate - e.true_rate) <= noise + 0.02, e


def test_the_document_keeps_its_contract(shop):
    _, _, result, _ = shop
    doc = result.to_dict()
    assert doc.keys() == {"schema_version", "run", "findings", "edges", "sampling"}
    assert {s["service"] for s in doc["sampling"]["services"]} >= {"gateway", "recommendations", "fulfilment"}
    assert doc["schema_version"] == 1
    assert {"window_start", "window_end", "spans", "traces"} <= doc["run"].keys()
    assert doc["run"]["spans"] > 0 and doc["run"]["traces"] > 0
    assert doc["findings"] and doc["edges"]
    for f in doc["findings"]:
        assert f.keys() == FINDING_KEYS
        assert HEX32.match(f["trace_id"]) and HEX16.match(f["span_id"])
        assert f["kind"] in ("orphan_root", "in_process_break", "dangling_parent", "unpaired_exit")
        assert f["protocol"] in ("http", "grpc", "messaging", "rpc", "db", "unknown")
        assert f["explanation"] and f["fix"]
        if f["probable_parent"] is not None:
            p = f["probable_parent"]
            assert p.keys() == {"trace_id", "span_id", "service", "confidence"}
            assert HEX32.match(p["trace_id"]) and HEX16.match(p["span_id"]) and 0 <= p["confidence"] <= 1
            assert p["trace_id"] != f["trace_id"]
    for e in doc["edges"]:
        assert e.keys() == EDGE_KEYS
        assert e["dropped"] == e["calls"] - e["propagated"] >= 0


def test_entry_points_are_learned_and_can_be_configured(tmp_path, shop):
    db, _, result, _ = shop
    assert {"gateway:GET /cart", "gateway:POST /checkout", "billing-cron:rollup"} <= set(result.entrypoints)
    assert not any(
        e.startswith(("recommendations:", "payments:", "notifications:")) for e in result.entrypoints
    )
    configured = audit_all(db, entrypoints=frozenset({"recommendations"}))
    services = {f["service"] for f in configured.iter_findings() if f["kind"] == "orphan_root"}
    assert "recommendations" not in services and "payments" in services


def test_consumers_that_link_to_their_producer_are_not_findings(shop):
    _, truth, _, doc = shop
    linked = {(t["trace_id"], t["span_id"]) for t in truth if t["linked"]}
    assert linked
    assert not linked & {(f["trace_id"], f["span_id"]) for f in doc["findings"]}


def test_dangling_parents_point_at_the_sampler(shop):
    _, _, _, doc = shop
    dangling = [f for f in doc["findings"] if f["kind"] == "dangling_parent"]
    assert dangling and {f["service"] for f in dangling} == {"fulfilment"}
    assert {f["cause"] for f in dangling} == {"sampler_not_parent_based"}
