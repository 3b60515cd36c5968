"""Sampling figures against simulated truth: per service on the shop, per edge and overall on
the parent-based bench scenario, and what spans without `ot=th` do to them."""

from pathlib import Path

import pytest

from audit.scenarios.model import load_scenario
from audit.scenarios.sampling_truth import truth_figures
from audit.scenarios.simulate import Simulator
from tests.audit_helpers import audit_all, simulated_store, store_requests

BENCH_SCENARIOS = Path(__file__).parent.parent / "bench" / "scenarios"


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    db, truth = simulated_store(tmp_path_factory.mktemp("sampling"))
    return truth, {s["service"]: s for s in audit_all(db).sampling["services"]}


def test_services_that_ignore_their_callers_decision_are_named(shop):
    _, services = shop
    assert services["fulfilment"]["parent_based"] is False  # an independent sampler in shop-small
    for name in ("gateway", "checkout", "cart", "payments"):
        assert services[name]["parent_based"] in (True, None), name


def test_root_inflation_and_dangling_rate_agree_with_the_truth(shop):
    truth, services = shop
    by_id = {t["span_id"]: t for t in truth}
    exported = [t for t in truth if t["exported"]]
    for name, s in services.items():
        mine = [t for t in exported if t["service"] == name]
        roots = [t for t in mine if t["parent_span_id"] is None]
        orphans = [
            t
            for t in roots
            if t["true_parent_span_id"] and not t["linked"] and t["kind"] in ("SERVER", "CONSUMER")
        ]
        assert s["spans"] == len(mine) and s["roots"] == len(roots), name
        assert s["orphan_roots"] == len(orphans), name
        with_parent = [t for t in mine if t["parent_span_id"] is not None]
        dangling = [t for t in with_parent if not by_id[t["parent_span_id"]]["exported"]]
        assert s["dangling_parent_rate"]["n"] == len(with_parent), name
        if with_parent:
            assert s["dangling_parent_rate"]["value"] == pytest.approx(
                len(dangling) / len(with_parent), abs=1e-6
            ), name
        assert s["known_threshold_share"]["value"] == 1.0  # every simulated span carries ot=th
        interval = s["root_inflation"]
        if interval["n"]:
            assert interval["ci_low"] <= interval["value"] <= interval["ci_high"]


def _simulate(tmp_path, scenario, seed=3):
    requests, truth = [], []
    for request, records in Simulator(scenario, seed=seed).run():
        requests.append(request)
        truth.extend(r.to_dict() for r in records)
    return store_requests(str(tmp_path / f"{scenario.name}.duckdb"), requests), truth


@pytest.fixture(scope="module")
def parent_based(tmp_path_factory):
    scenario = load_scenario(str(BENCH_SCENARIOS / "sampling-parent-based.yaml")).model_copy(
        update={"duration_s": 60}
    )
    db, truth = _simulate(tmp_path_factory.mktemp("parent-based"), scenario)
    return truth_figures(truth), audit_all(db).sampling


@pytest.mark.slow  # the parent-based scenario, simulated and audited
def test_edge_and_overall_figures_agree_with_the_truth(parent_based):
    truth, sampling = parent_based
    estimates = {
        (f, (e["caller"], e["callee"], e["protocol"])): e[f]
        for e in sampling["edges"]
        for f in ("propagation_rate", "conditional_capture_rate", "upstream_missing_share", "volume_ratio")
    }
    estimates |= {(f, ()): v for f, v in sampling["overall"].items() if isinstance(v, dict)}
    compared = covered = 0
    for (figure, key), true in truth.items():
        if figure == "sampling_probability":
            continue
        est = estimates[(figure, key)]  # every true figure is estimated
        tolerance = 0.08 * true if figure in ("volume_ratio", "fragmentation_factor") else 0.05
        assert est["value"] == pytest.approx(true, abs=tolerance), (figure, key, est)
        assert est["n"] > 0
        compared += 1
        covered += est["ci_low"] - 1e-9 <= true <= est["ci_high"] + 1e-9
    assert compared == 16  # 4 figures on each of 3 edges, 4 overall
    assert covered >= 0.75 * compared  # 95% intervals: 12 of 16 or fewer has odds under 1%


@pytest.mark.slow
def test_broken_edges_show_their_loss_and_intact_figures_their_ideal(parent_based):
    _, sampling = parent_based
    edges = {(e["caller"], e["callee"]): e for e in sampling["edges"]}
    web, mobile = edges[("web", "api")], edges[("mobile", "api")]
    # the proxy drops 20% of both front ends' calls; api keeps 1/4 of the new roots
    for e in (web, mobile):
        assert e["propagation_rate"]["value"] == pytest.approx(0.8, abs=0.05)
        assert e["conditional_capture_rate"]["value"] == pytest.approx(0.8 + 0.2 * 0.25, abs=0.03)
    # an orphan's upstream is missing as often as its caller did not sample: 1/2 and 7/8
    assert web["upstream_missing_share"]["value"] == pytest.approx(0.5, abs=0.05)
    assert mobile["upstream_missing_share"]["value"] == pytest.approx(0.875, abs=0.05)
    # stock keeps all its new roots: whatever api stored, stock's side is stored too
    assert edges[("api", "stock")]["conditional_capture_rate"]["value"] == 1.0
    overall = sampling["overall"]
    assert overall["known_threshold_share"] == 1.0 and overall["assumed_sampling_probability"] is None
    assert overall["latency_undercount"]["value"] == 0.0  # synchronous calls: fragments end inside


NO_THRESHOLD = """
name: no-threshold
duration_s: 30
services:
  front:
    sampler: {type: parent_based, probability: 0.5}
    operations:
      "GET /":
        calls:
          - {to: back, protocol: http, operation: "GET /x",
             drop: {probability: 0.3, cause: proxy_strips_traceparent}}
  back:
    sampler: {type: parent_based, probability: 0.5, writes_threshold: false}
    operations:
      "GET /x": {}
entrypoints:
  - {service: front, operation: "GET /", rate_per_s: 100}
"""


@pytest.fixture(scope="module")
def no_threshold(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("no-threshold")
    (tmp / "s.yaml").write_text(NO_THRESHOLD)
    db, truth = _simulate(tmp, load_scenario(str(tmp / "s.yaml")))
    return db, truth_figures(truth)


def test_spans_without_a_threshold_are_counted_and_left_out(no_threshold):
    db, _ = no_threshold
    sampling = audit_all(db).sampling
    back = next(s for s in sampling["services"] if s["service"] == "back")
    assert back["known_threshold_share"]["value"] == 0.0 and back["sampling_probability"]["value"] is None
    (edge,) = sampling["edges"]
    assert 0.3 < edge["unknown_adjusted_count_share"] < 0.7  # back's entries; front's exits carry th:8
    # back's entries cannot be weighted: nothing is estimated from them, rather than a guess
    assert edge["propagation_rate"]["value"] is None and edge["volume_ratio"]["value"] is None
    assert 0.3 < sampling["overall"]["known_threshold_share"] < 0.7


def test_an_assumed_probability_weights_them(no_threshold):
    db, truth = no_threshold
    sampling = audit_all(db, assume_sampling_probability=0.5).sampling
    (edge,) = sampling["edges"]
    assert sampling["overall"]["assumed_sampling_probability"] == 0.5
    assert edge["propagation_rate"]["value"] == pytest.approx(
        truth[("propagation_rate", ("front", "back", "http"))], abs=0.05
    )
    assert edge["volume_ratio"]["value"] == pytest.approx(1.0, rel=0.08)
    # a wrong assumption shows as volumes that disagree: back's entries count double
    wrong = audit_all(db, assume_sampling_probability=0.25).sampling["edges"][0]
    assert wrong["volume_ratio"]["ci_high"] < 0.7
