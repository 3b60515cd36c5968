"""The audit's memory is bounded by its limit, not by concurrency: a keyless custom-RPC hop with
about 1,000 calls in flight, audited under a small DuckDB memory limit. Each orphan keeps at most
CANDIDATES_PER_ORPHAN candidates however many fit; a stage that still runs out of memory gives
its orphans up (they abstain, and the run says so) instead of failing the audit."""

from __future__ import annotations

import duckdb
import pytest

from audit.audit_job import audit_store, summary_lines
from audit.engine import AuditWindow, run_audit, stitch
from audit.scenarios.model import load_scenario
from audit.scenarios.simulate import Simulator
from audit.settings import AuditSettings
from tests.audit_helpers import store_requests

K = stitch.CANDIDATES_PER_ORPHAN


@pytest.fixture(scope="module")
def keyless(tmp_path_factory):
    """4 s of the keyless-rpc scenario at 2,500 requests/s: ~1,000 calls in flight on
    front -> ledger, 30% of them orphaned. Returns the store and orphan span id -> true parent."""
    scenario = load_scenario("keyless-rpc").model_copy(update={"duration_s": 4.0})
    truth: dict[int, int] = {}
    requests = []
    for request, records in Simulator(scenario, seed=3).run():
        requests.append(request)
        for r in records:
            if r.cause and r.exported:
                truth[int(r.span_id, 16)] = int(r.true_parent_span_id, 16)
    db = store_requests(str(tmp_path_factory.mktemp("keyless") / "keyless.duckdb"), requests)
    return db, truth


def _audit(db: str, memory_limit: str) -> tuple[duckdb.DuckDBPyConnection, object]:
    """Audit the whole store on a connection with `memory_limit`; the connection keeps the run's
    temp tables (cand_counts among them)."""
    con = duckdb.connect(db, read_only=True, config={"memory_limit": memory_limit})
    lo, hi = con.execute("SELECT min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
    return con, run_audit(con, AuditWindow(lo, hi))


def _orphans_on_ledger(result) -> list[tuple[int, int | None]]:
    f = result.findings.to_pydict()
    return [
        (span, parent)
        for kind, callee, span, parent in zip(f["kind"], f["callee"], f["span_id"], f["parent_span_id"])
        if kind == "orphan_root" and callee == "ledger"
    ]


def test_each_orphan_keeps_at_most_k_candidates_under_a_small_limit(keyless):
    db, truth = keyless
    con, result = _audit(db, "150MB")
    orphans, kept_max, fitted_median, degraded = con.execute(
        "SELECT count(*), max(kept), median(candidates), count(*) FILTER (WHERE degraded) FROM cand_counts"
    ).fetchone()
    con.close()
    assert orphans >= 0.95 * len(truth)  # the hop's orphans all had candidates
    assert kept_max <= K
    # the bound is doing something: hundreds of exits fitted each orphan before the cap
    assert fitted_median > 10 * K
    assert degraded == 0
    hop = _orphans_on_ledger(result)
    assert {span for span, _ in hop} == set(truth)  # every orphan on the hop found, nothing else
    named = [(span, parent) for span, parent in hop if parent is not None]
    assert len(named) > 0.5 * len(hop)
    assert sum(truth[span] == parent for span, parent in named) >= 0.95 * len(named)


def test_the_whole_audit_finishes_under_a_100mb_limit(keyless):
    db, truth = keyless
    result = audit_store(db, AuditSettings(settle_s=0), resume=False, save=False, memory_limit="100MB")
    hop = _orphans_on_ledger(result)
    assert {span for span, _ in hop} == set(truth)
    named = [(span, parent) for span, parent in hop if parent is not None]
    assert sum(truth[span] == parent for span, parent in named) >= 0.95 * len(named)
    assert result.degraded == []


@pytest.fixture(scope="module")
def burst(tmp_path_factory):
    """10,000 requests within 0.1 s on the keyless hop: ~3,000 orphans in the same few 100 ms
    buckets, each fitting ~3,000 unpaired exits in flight."""
    base = load_scenario("keyless-rpc")
    entry = base.entrypoints[0].model_copy(update={"rate_per_s": 100_000})
    scenario = base.model_copy(update={"duration_s": 0.1, "entrypoints": [entry]})
    truth: dict[int, int] = {}
    requests = []
    for request, records in Simulator(scenario, seed=3).run():
        requests.append(request)
        truth.update({int(r.span_id, 16): 1 for r in records if r.cause and r.exported})
    return store_requests(str(tmp_path_factory.mktemp("burst") / "burst.duckdb"), requests), truth


def test_a_stage_that_cannot_fit_its_bucket_abstains_there_instead_of_failing(burst, monkeypatch):
    """Keeping every candidate (no cap) needs ~3,000 x 3,000 per bucket: more than a 100MB limit
    holds however the slices are cut. The stage gives those orphans up: they stay findings,
    without a parent, and the run lists the hop as degraded."""
    db, truth = burst
    monkeypatch.setattr(stitch, "CANDIDATES_PER_ORPHAN", 999_999)  # the most min_by keeps
    con, result = _audit(db, "100MB")
    degraded = con.execute("SELECT count(*) FROM cand_counts WHERE degraded").fetchone()[0]
    con.close()
    assert degraded > 0.5 * len(truth)
    hop = _orphans_on_ledger(result)
    assert {span for span, _ in hop} == set(truth)  # still found, and not taken for entry points
    assert result.degraded == [{"callee": "ledger", "operation": "Post", "orphans": degraded}]
    assert any("degraded" in line for line in summary_lines(result))
