"""The simulator: valid OTLP, truth that agrees with the spans, determinism, and each loss mode's shape."""

import collections
import hashlib

import pytest
from click.testing import CliRunner

from audit.cli import main
from audit.scenarios.model import ScenarioError, load_scenario
from audit.scenarios.output import read_truth
from audit.scenarios.simulate import Simulator, th_value, threshold
from collector_ext.columns import to_span_batch
from collector_ext.decode import PROTOBUF, decode_request


@pytest.fixture(scope="module")
def run():
    """shop-small, seed 1: every exported span (as the store would read it) and every truth record."""
    sim = Simulator(load_scenario("shop-small"), seed=1)
    rows, truth = [], []
    for request, records in sim.run():
        batch = to_span_batch(decode_request(request.SerializeToString(), PROTOBUF))
        assert batch.rejected == 0
        rows += batch.spans.to_pylist()
        links = batch.links.to_pylist()
        for r in rows[-batch.accepted :]:
            r["links"] = [x for x in links if x["span_id"] == r["span_id"]]
        truth += [t.to_dict() for t in records]
    return rows, truth


def hexid(row, name="span_id"):
    return f"{row[name]:016x}" if row[name] is not None else None


def test_output_is_valid_otlp_and_matches_the_exported_truth(run):
    rows, truth = run
    exported = {t["span_id"]: t for t in truth if t["exported"]}
    assert len(rows) == len(exported) > 0
    for r in rows:
        t = exported[hexid(r)]
        assert t["trace_id"] == f"{r['trace_id_hi'] << 64 | r['trace_id_lo']:032x}"
        assert hexid(r, "parent_span_id") == t["parent_span_id"]
        assert r["service_name"] == t["service"] and r["kind"] == t["kind"]


def test_truth_parent_is_the_stored_parent_unless_the_context_was_lost(run):
    _, truth = run
    for t in truth:
        if t["cause"] is None and not t["linked"]:
            assert (t["true_parent_span_id"], t["true_parent_trace_id"] is None) == (
                t["parent_span_id"],
                t["parent_span_id"] is None,
            )
        else:
            assert t["true_parent_span_id"] is not None and t["parent_span_id"] is None  # a new root


def test_every_loss_mode_has_its_shape(run):
    rows, truth = run
    by_id = {hexid(r): r for r in rows}
    causes = collections.Counter((t["cause"], t["hop"], t["kind"]) for t in truth if t["cause"])
    assert set(causes) == {
        ("proxy_strips_traceparent", "gateway->recommendations", "SERVER"),
        ("custom_rpc_no_context", "checkout->payments", "SERVER"),
        ("producer_does_not_inject", "checkout->notifications", "CONSUMER"),
        ("thread_pool_no_context", "checkout->email-api.example", "CLIENT"),
    }
    for t in truth:
        r = by_id.get(t["span_id"])
        if r is None:
            continue
        if t["cause"]:  # exported orphan: a root whose real parent is elsewhere
            assert r["parent_span_id"] is None
            assert t["true_parent_trace_id"] != t["trace_id"]
        if t["linked"]:  # the correct messaging pattern: a new trace with a link to the producer
            assert r["parent_span_id"] is None and r["kind"] == "CONSUMER"
            assert t["true_parent_span_id"] in [f"{x['link_span_id']:016x}" for x in r["links"]]


def test_kafka_consumer_carries_the_producers_partition_and_offset(run):
    rows, truth = run
    by_id = {hexid(r): r for r in rows}
    pairs = 0
    for t in truth:
        batch = t["service"] == "analytics"  # batch consumers carry no single partition/offset
        if (
            t["kind"] == "CONSUMER"
            and not batch
            and t["span_id"] in by_id
            and t["true_parent_span_id"] in by_id
        ):
            c, p = by_id[t["span_id"]], by_id[t["true_parent_span_id"]]
            assert (c["messaging_partition"], c["messaging_offset"], c["messaging_destination"]) == (
                p["messaging_partition"],
                p["messaging_offset"],
                p["messaging_destination"],
            )
            assert c["start_ns"] >= p["end_ns"]  # consumed after produced
            pairs += 1
    assert pairs > 0


def test_samplers_write_thresholds_and_an_independent_sampler_leaves_dangling_parents(run):
    rows, truth = run
    assert {r["trace_state"] for r in rows if r["service_name"] == "gateway"} == {"ot=th:c"}
    exported = {hexid(r) for r in rows}
    dangling = [
        r for r in rows if r["parent_span_id"] is not None and hexid(r, "parent_span_id") not in exported
    ]
    assert dangling and {r["service_name"] for r in dangling} == {"fulfilment"}
    # parent-based services never export a span whose parent was not sampled
    assert all(
        t["exported"] is False
        for t in truth
        if t["service"] == "cart" and t["parent_span_id"] not in exported
    )


def test_threshold_encoding():
    assert (th_value(threshold(1.0)), th_value(threshold(0.5)), th_value(threshold(0.25))) == ("0", "8", "c")


def digest(seed: int, spans: int = 400) -> str:
    h = hashlib.sha256()
    for request, records in Simulator(load_scenario("shop-small"), seed=seed).run(spans):
        h.update(request.SerializeToString())
        h.update(repr([r.to_dict() for r in records]).encode())
    return h.hexdigest()


def test_same_seed_same_bytes():
    assert digest(7) == digest(7)
    assert digest(7) != digest(8)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.replace("to: cart,", "to: kart,"), "unknown service 'kart'"),
        (
            lambda s: s.replace('operation: "GET /cart/{id}"}', 'operation: "GET /carts"}'),
            "has no operation 'GET /carts'",
        ),
        (
            lambda s: s.replace("duration_ms: {median: 3, p99: 30}", "duration_ms: {median: 3, p99: 1}"),
            "p99 must be at least",
        ),
        (lambda s: s.replace("error_rate: 0.02", "eror_rate: 0.02"), "eror_rate"),
        (lambda s: s.replace("rate_per_s: 15}", "rate_per_s: 15, every_s: 3}"), "exactly one of"),
        (lambda s: s + "\n  - [", "not valid YAML"),
    ],
)
def test_scenario_errors_name_their_place(tmp_path, edit, message):
    from audit.scenarios.model import BUNDLED

    path = tmp_path / "bad.yaml"
    path.write_text(edit((BUNDLED / "shop-small.yaml").read_text()))
    with pytest.raises(ScenarioError, match=None) as err:
        load_scenario(str(path))
    assert message in str(err.value) and str(path) in str(err.value)


def test_unknown_scenario_lists_the_bundled_ones():
    with pytest.raises(ScenarioError) as err:
        load_scenario("no-such-scenario")
    assert "shop-small" in str(err.value) and "shop-large" in str(err.value)


@pytest.mark.slow
def test_simulate_over_otlp_into_a_running_server(make_server, tmp_path):
    server = make_server(decoders=1)
    truth = tmp_path / "truth.jsonl.gz"
    result = CliRunner().invoke(
        main,
        [
            "simulate",
            "--scenario",
            "shop-small",
            "--otlp",
            f"grpc://{server.grpc_target}",
            "--truth",
            str(truth),
            "--spans",
            "300",
        ],
    )
    assert result.exit_code == 0, result.output
    records = list(read_truth(str(truth)))
    exported = sum(r["exported"] for r in records)
    assert exported >= 300
    assert server.reader().stats().spans == exported


def test_simulate_needs_exactly_one_destination(tmp_path):
    r = CliRunner().invoke(main, ["simulate", "--scenario", "shop-small", "--truth", str(tmp_path / "t")])
    assert r.exit_code == 2 and "exactly one of" in r.output


def test_batch_consumer_links_to_every_producer_of_its_batch(run):
    rows, truth = run
    by_id = {hexid(r): r for r in rows}
    batches = [r for r in rows if r["service_name"] == "analytics"]
    assert batches
    for r in batches:
        assert r["kind"] == "CONSUMER" and r["parent_span_id"] is None and r["link_count"] == 4
        t = next(t for t in truth if t["span_id"] == hexid(r))
        assert t["linked"] and t["hop"] == "checkout->analytics"
        linked = [f"{x['link_span_id']:016x}" for x in r["links"]]
        assert t["true_parent_span_id"] in linked  # the message that completed the batch
        for sid in linked:
            producer = by_id.get(sid)
            assert producer is None or producer["messaging_destination"] == "clickstream"
