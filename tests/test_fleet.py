"""The demo fleet through the real instrumentation: each loss mode gives the span shape it should,
and the out-of-band truth agrees with what was stored."""

import json

import pytest

from audit.fleet.runner import run_fleet

pytestmark = pytest.mark.slow  # the demo fleet: processes, Kafka's mock cluster


@pytest.fixture(scope="module")
def fleet_store(tmp_path_factory):
    """The fleet run for 4 s against in-process receivers: (store file, truth file)."""
    from audit.store.writer import SpanStore, SpanWriter
    from collector_ext.ingest import Ingestor
    from collector_ext.receivers import OtlpReceivers

    tmp = tmp_path_factory.mktemp("fleet")
    db, truth_path = str(tmp / "fleet.duckdb"), str(tmp / "truth.jsonl")
    writer = SpanWriter(SpanStore(db))
    receivers = OtlpReceivers(Ingestor(writer, decoders=0), grpc_address="127.0.0.1:0", http_address=None)
    receivers.start()
    try:
        run = run_fleet(f"127.0.0.1:{receivers.grpc.port}", truth_path, seconds=4, rate=10)
    finally:
        receivers.stop()
        writer.close()
    assert run.failed == 0 and run.requests >= 30
    return db, truth_path


@pytest.fixture(scope="module")
def fleet(fleet_store):
    from audit.store.reader import LocalReader

    db, truth_path = fleet_store
    reader = LocalReader(db)
    rows = reader._dicts(
        "SELECT *, lpad(hex(trace_id), 32, '0') AS tid, lpad(hex(span_id), 16, '0') AS sid, "
        "lpad(hex(parent_span_id), 16, '0') AS pid FROM spans",
        [],
    )
    reader.close()
    for r in rows:
        r["tid"], r["sid"] = r["tid"].lower(), r["sid"].lower()
        r["pid"] = r["pid"].lower() if r["pid"] else None
    truth = [json.loads(line) for line in open(truth_path)]
    return {r["sid"]: r for r in rows}, {t["span_id"]: t for t in truth}


def test_truth_covers_every_stored_span_and_agrees_on_parents(fleet):
    spans, truth = fleet
    assert spans.keys() == {sid for sid, t in truth.items() if t["exported"]}
    assert any(not t["exported"] for t in truth.values())  # unsampled spans have truth too
    for sid, r in spans.items():
        t = truth[sid]
        assert (t["trace_id"], t["parent_span_id"], t["service"], t["kind"]) == (
            r["tid"],
            r["pid"],
            r["service_name"],
            r["kind"],
        )
        if t["cause"] is None and not t["linked"]:
            assert t["true_parent_span_id"] == t["parent_span_id"]


@pytest.mark.parametrize(
    "service, kind, cause, protocol, parent_kind",
    [
        ("recommendations", "SERVER", "proxy_strips_traceparent", "http", "CLIENT"),
        ("pricing", "SERVER", "client_does_not_inject", "http", "CLIENT"),
        ("payments", "SERVER", "custom_rpc_no_context", "rpc", "CLIENT"),
        ("frontend", "CLIENT", "thread_pool_no_context", "db", "SERVER"),  # the request it ran for
        ("notifications", "CONSUMER", "producer_does_not_inject", "messaging", "PRODUCER"),
    ],
)
def test_each_loss_mode_leaves_a_root_whose_real_parent_is_in_another_trace(
    fleet, service, kind, cause, protocol, parent_kind
):
    spans, truth = fleet
    orphans = [t for t in truth.values() if t["cause"] == cause and t["exported"]]
    assert orphans
    for t in orphans:
        r = spans[t["span_id"]]
        assert (r["service_name"], r["kind"], r["protocol"], r["pid"]) == (service, kind, protocol, None)
        assert t["true_parent_trace_id"] != t["trace_id"]
        parent = spans.get(t["true_parent_span_id"])  # stored when the caller's trace was sampled
        if parent is not None:
            assert parent["tid"] == t["true_parent_trace_id"]
            assert parent["kind"] == parent_kind
    assert any(t["true_parent_span_id"] in spans for t in orphans)  # some real parents were stored


def test_propagated_calls_stay_in_the_trace(fleet):
    spans, _ = fleet
    for r in spans.values():
        if (
            r["service_name"] == "payments"
            and r["rpc_method"] == "Authorize"
            or r["service_name"] in ("cart", "inventory")
        ):
            assert r["pid"] is not None and r["parent_is_remote"] is True
    grpc_servers = [r for r in spans.values() if r["service_name"] == "inventory"]
    assert grpc_servers and {(r["protocol"], r["rpc_service"], r["rpc_method"]) for r in grpc_servers} == {
        ("grpc", "shop.Inventory", "Reserve")
    }
    for r in grpc_servers:  # the parent, when stored, is the frontend's instrumented gRPC client span
        parent = spans.get(r["pid"])
        assert parent is None or (parent["service_name"], parent["kind"], parent["protocol"]) == (
            "frontend",
            "CLIENT",
            "grpc",
        )


def test_samplers_write_thresholds_and_the_independent_one_leaves_dangling_parents(fleet):
    spans, _ = fleet
    states = {(r["service_name"], r["trace_state"]) for r in spans.values() if r["kind"] == "SERVER"}
    assert ("frontend", "ot=th:8") in states and ("cart", "ot=th:4") in states
    dangling = [r for r in spans.values() if r["pid"] is not None and r["pid"] not in spans]
    assert dangling and {r["service_name"] for r in dangling} == {"cart"}


def test_entry_and_scheduled_roots_are_legitimate(fleet):
    spans, truth = fleet
    roots = [
        r
        for r in spans.values()
        if r["pid"] is None and truth[r["sid"]]["cause"] is None and not truth[r["sid"]]["linked"]
    ]
    assert {(r["service_name"], r["kind"]) for r in roots} == {
        ("frontend", "SERVER"),
        ("billing-cron", "INTERNAL"),
    }


def test_kafka_consumer_that_extracts_continues_the_producers_trace(fleet):
    spans, _ = fleet
    consumers = [r for r in spans.values() if r["service_name"] == "fulfilment"]
    assert consumers
    for c in consumers:
        assert c["pid"] is not None and c["parent_is_remote"] is True
        producer = spans[c["pid"]]  # a sampled consumer child means its producer was sampled too
        assert (producer["service_name"], producer["kind"], producer["messaging_destination"]) == (
            "frontend",
            "PRODUCER",
            "orders",
        )
        assert c["tid"] == producer["tid"] and c["messaging_destination"] == "orders"


def test_kafka_consumer_with_the_official_instrumentation_links_to_the_producer(fleet, tmp_path):
    spans, truth = fleet
    linked_roots = [t for t in truth.values() if t["linked"] and t["exported"]]
    assert linked_roots
    for t in linked_roots:
        root = spans[t["span_id"]]
        assert (root["service_name"], root["kind"], root["pid"]) == ("auditor", "CONSUMER", None)
        children = [r for r in spans.values() if r["pid"] == t["span_id"]]
        assert len(children) == 1 and children[0]["link_count"] == 1  # the `process` span carries the link
        assert children[0]["messaging_destination"] == "audit-log"
        producer = spans.get(t["true_parent_span_id"])
        assert producer is None or (producer["kind"], producer["messaging_destination"]) == (
            "PRODUCER",
            "audit-log",
        )


def test_the_audit_names_each_loss_mode_of_the_fleet(fleet_store):
    """Real instrumentation, real Kafka protocol: every loss mode is found, on the right hop,
    with the right cause, and nothing that propagated (or linked) is flagged."""
    from collections import Counter

    from audit.scenarios.score import score
    from tests.audit_helpers import audit_all

    db, truth_path = fleet_store
    result = audit_all(db)
    findings = list(result.iter_findings())
    hops = Counter((f["kind"], f["caller"], f["callee"], f["cause"]) for f in findings)
    for kind, caller, callee, cause in [
        ("orphan_root", "frontend", "recommendations", "proxy_strips_traceparent"),
        ("orphan_root", "frontend", "pricing", "client_does_not_inject"),
        ("orphan_root", "frontend", "payments", "custom_rpc_no_context"),
        ("orphan_root", "frontend", "notifications", "producer_does_not_inject"),
        ("in_process_break", "frontend", "redis", "thread_pool_no_context"),
        ("dangling_parent", None, "cart", "sampler_not_parent_based"),
    ]:
        assert hops[(kind, caller, callee, cause)] > 0, (kind, caller, callee, cause, hops)
    flagged = {f["service"] for f in findings if f["kind"] in ("orphan_root", "in_process_break")}
    assert not flagged & {"auditor", "fulfilment", "inventory", "cart", "billing-cron"}
    assert "billing-cron:rollup" in result.entrypoints
    truth = [json.loads(line) for line in open(truth_path)]
    s = score(truth, result.to_dict())
    for kind, (precision, recall) in s.detection.items():
        assert precision.value == recall.value == 1.0, (kind, str(precision), str(recall))
    assert s.stitching["all"].precision.value >= 0.95, s.summary()["stitching"]
    assert s.stitching["http"].recall.value >= 0.9, s.summary()["stitching"]  # one request at a time
    broken = {(e.caller, e.callee) for e in result.edges if e.broken}
    assert broken == {
        ("frontend", "recommendations"),
        ("frontend", "pricing"),
        ("frontend", "payments"),
        ("frontend", "notifications"),
        ("frontend", "redis"),
    }
