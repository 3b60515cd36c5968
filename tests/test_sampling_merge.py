"""Pooling the sampling figures of time slices (audit/engine/sampling_merge.py, the Spark
audit's slices): each figure is recomputed from its slices' pooled sufficient statistics."""

from __future__ import annotations

import json

import pytest

from audit.engine import AuditWindow, run_audit
from audit.engine.estimate import STATS
from audit.engine.sampling_merge import merge_sampling, strip
from tests.audit_helpers import simulated_store


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    import duckdb

    db, _ = simulated_store(tmp_path_factory.mktemp("merge"))
    con = duckdb.connect(db, read_only=True)
    lo, hi = con.execute("SELECT min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
    result = run_audit(con, AuditWindow(lo, hi))
    con.close()
    return result


def _values(sampling, path=()):
    """Every (path, point estimate) of a sampling object."""
    if isinstance(sampling, dict):
        if "value" in sampling:
            yield path, sampling["value"]
        for k, v in sampling.items():
            if k not in ("value", "ci_low", "ci_high"):
                yield from _values(v, (*path, k))
    elif isinstance(sampling, list):
        for i, v in enumerate(sampling):
            yield from _values(v, (*path, i))


def test_the_document_carries_no_statistics(audited):
    assert STATS not in json.dumps(audited.sampling)
    assert STATS in json.dumps(audited.sampling_stats)
    assert strip(audited.sampling_stats) == audited.sampling


def test_one_slice_pools_to_itself(audited):
    stats = json.loads(json.dumps(audited.sampling_stats))  # as a Spark task hands it over
    assert strip(merge_sampling([stats])) == audited.sampling


def test_a_slice_pooled_with_itself_keeps_every_rate_and_doubles_every_count(audited):
    once = audited.sampling
    twice = strip(merge_sampling([audited.sampling_stats, audited.sampling_stats]))
    values = dict(_values(once))
    assert dict(_values(twice)).keys() == values.keys()
    for path, value in _values(twice):
        if value is None:
            assert values[path] is None, path
        else:
            assert value == pytest.approx(values[path], abs=2e-6), path
    for a, b in zip(once["services"], twice["services"]):
        assert (b["spans"], b["roots"], b["root_inflation"]["n"]) == (
            2 * a["spans"],
            2 * a["roots"],
            2 * a["root_inflation"]["n"],
        )
        assert b["parent_based"] == a["parent_based"]
    assert twice["overall"]["spans"] == 2 * once["overall"]["spans"]
    # twice the units: intervals no wider
    ff1, ff2 = once["overall"]["fragmentation_factor"], twice["overall"]["fragmentation_factor"]
    assert ff2["ci_high"] - ff2["ci_low"] <= ff1["ci_high"] - ff1["ci_low"] + 1e-9
