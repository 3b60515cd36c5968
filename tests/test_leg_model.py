"""The timing model of an edge with enough propagated calls: the joint density of its two gaps
(client start -> server start, server end -> client end), as the calls show it."""

from __future__ import annotations

import numpy as np

from audit.engine.stitch import _assign
from audit.engine.timing import SyncModel

MS = 1_000_000.0


def stalled_calls(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaps of a gRPC hop like Online Boutique's frontend -> currencyservice: legs of 1-3 ms, and
    one call in four held ~90 ms (or twice that) on one side, the request or the response."""
    d1 = rng.lognormal(np.log(2.0 * MS), 0.4, n)
    d2 = rng.lognormal(np.log(1.0 * MS), 0.3, n)
    stall = rng.random(n) < 0.25
    held = rng.choice([90.0, 180.0], n) * MS * rng.lognormal(0.0, 0.05, n)
    before = rng.random(n) < 0.5
    d1 = np.where(stall & before, d1 + held, d1)
    d2 = np.where(stall & ~before, d2 + held, d2)
    return d1, d2


def test_a_stall_on_one_leg_fits_and_a_span_in_the_middle_of_a_long_call_does_not():
    d1, d2 = stalled_calls(np.random.default_rng(1), 4000)
    model = SyncModel.fit(d1, d2, "edge")
    assert model.legs is not None
    one_side = float(model.nll(92 * MS, 1 * MS))  # a held request: what a quarter of the calls do
    middle = float(model.nll(46 * MS, 47 * MS))  # the same long call, the server span in its middle
    assert one_side < middle - 3.0
    # the overhead + offset model alone says the opposite: it has no notion of a leg held
    parametric = SyncModel(model.overhead, model.offset, model.pairs, "edge")
    assert float(parametric.nll(92 * MS, 1 * MS)) > float(parametric.nll(46 * MS, 47 * MS))


def test_no_parent_is_priced_so_that_few_true_calls_cost_more():
    rng = np.random.default_rng(2)
    d1, d2 = stalled_calls(rng, 4000)
    model = SyncModel.fit(d1, d2, "edge")
    parametric = SyncModel(model.overhead, model.offset, model.pairs, "edge")
    # on calls neither was fitted on: the parametric price leaves the held quarter beyond it,
    # the calls' own density at most 5% (its bound), and not far fewer either
    f1, f2 = stalled_calls(rng, 4000)
    assert np.mean(parametric.nll(f1, f2) > parametric.null()) > 0.2
    assert 0.02 < np.mean(model.nll(f1, f2) > model.null()) < 0.07


def test_few_calls_or_a_pooled_model_keep_the_parametric_model():
    d1, d2 = stalled_calls(np.random.default_rng(3), 100)
    assert SyncModel.fit(d1, d2, "edge").legs is None
    d1, d2 = stalled_calls(np.random.default_rng(3), 1000)
    assert SyncModel.fit(d1, d2, "callee").legs is None
    assert SyncModel.fit(d1, d2, "edge").pooled(50 * MS, "callee").legs is None


def test_the_right_parent_wins_over_a_long_call_that_merely_contains_the_orphan():
    # one orphan, two candidate exits: its true parent held the response 90 ms (d1 2 ms, d2 91 ms);
    # an unrelated 140 ms call has the orphan in its middle (d1 70 ms, d2 69 ms)
    d1, d2 = stalled_calls(np.random.default_rng(4), 4000)
    model = SyncModel.fit(d1, d2, "edge")
    parametric = SyncModel(model.overhead, model.offset, model.pairs, "edge")
    gaps = (np.array([2 * MS, 70 * MS]), np.array([91 * MS, 69 * MS]))
    oid, eid = np.zeros(2, np.int64), np.array([10, 11], np.int64)
    got = _assign(oid, eid, model.nll(*gaps), np.full(2, model.null()), np.ones(2))
    named = dict(zip(got.eid.tolist(), got.confidence.tolist()))
    assert named.get(10, 0.0) > 0.6 and 11 not in named  # above the default --min-confidence
    # the overhead + offset model ranks the long call first, and prices both beyond "no parent"
    costs = parametric.nll(*gaps)
    assert costs[1] < costs[0] and costs[0] > parametric.null()
