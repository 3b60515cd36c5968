"""Sampling figures per service: the Wilson interval, and the shop's figures against its truth."""

import math

import pytest

from audit.engine.estimate import wilson
from tests.audit_helpers import audit_all, simulated_store


def test_wilson_interval_matches_the_textbook():
    # Wilson (1927) for 8 of 10 at 95%: 0.4902 .. 0.9433 (e.g. Newcombe 1998, table I)
    w = wilson(8, 10)
    assert w["value"] == 0.8 and w["n"] == 10
    assert math.isclose(w["ci_low"], 0.4902, abs_tol=5e-4) and math.isclose(w["ci_high"], 0.9433, abs_tol=5e-4)
    assert wilson(0, 20)["ci_low"] == 0.0 < wilson(0, 20)["ci_high"] < 0.2
    assert wilson(0, 0) == {"value": None, "ci_low": None, "ci_high": None, "n": 0}


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
        orphans = [t for t in roots if t["true_parent_span_id"] and not t["linked"]
                   and t["kind"] in ("SERVER", "CONSUMER")]  # fmt: skip
        assert s["spans"] == len(mine) and s["roots"] == len(roots), name
        assert s["orphan_roots"] == len(orphans), name
        with_parent = [t for t in mine if t["parent_span_id"] is not None]
        dangling = [t for t in with_parent if not by_id[t["parent_span_id"]]["exported"]]
        assert s["dangling_parent_rate"]["n"] == len(with_parent), name
        if with_parent:
            assert s["dangling_parent_rate"]["value"] == pytest.approx(len(dangling) / len(with_parent), abs=1e-6), name
        assert s["known_threshold_share"]["value"] == 1.0  # every simulated span carries ot=th
        interval = s["root_inflation"]
        if interval["n"]:
            assert interval["ci_low"] <= interval["value"] <= interval["ci_high"]
