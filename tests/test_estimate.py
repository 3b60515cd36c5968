"""The estimators behind the sampling figures: SQL sums against the same formulas in numpy,
and intervals against textbook values."""

import math
import random

import duckdb
import numpy as np
import pytest

from audit.engine.estimate import kept_shares, median, proportion, ratio, ratio_sums, wilson, wilson_interval


@pytest.fixture
def units():
    rng = random.Random(7)
    rows = []
    for cluster in range(300):
        for _ in range(rng.randint(1, 3)):  # spans of one trace, each with its own threshold
            w = rng.choice([1.0, 2.0, 4.0, 8.0])
            rows.append((rng.choice(["a", "b"]), cluster, w, float(rng.random() < 0.3), 1.0))
    con = duckdb.connect()
    con.execute("CREATE TABLE u (g VARCHAR, cluster INTEGER, w DOUBLE, a DOUBLE, b DOUBLE)")
    con.executemany("INSERT INTO u VALUES (?, ?, ?, ?, ?)", rows)
    return con, rows


def _by_hand(rows, group, fpc):
    """The linearized variance, pair by pair: spans i, j of one trace are both kept with
    probability min(p_i, p_j) under consistent sampling."""
    mine = [r for r in rows if r[0] == group]
    w, a, b = (np.array([r[i] for r in mine]) for i in (2, 3, 4))
    r = (w * a).sum() / (w * b).sum()
    v = 0.0
    for _, ci, wi, ai, bi in mine:
        for _, cj, wj, aj, bj in mine:
            if ci == cj:
                factor = 1 - max(1 / wi, 1 / wj) if fpc else 1.0
                v += wi * (ai - r * bi) * wj * (aj - r * bj) * factor
    return len(mine), r, v / (w * b).sum() ** 2


@pytest.mark.parametrize("fpc", [False, True])
def test_ratio_sums_match_the_linearized_variance(units, fpc):
    con, rows = units
    got = ratio_sums(con, "SELECT g, cluster, w, a, b FROM u", ["g"], finite_population=fpc)
    for group in ("a", "b"):
        n, num, den, var, kish = got[(group,)]
        n_hand, r_hand, v_hand = _by_hand(rows, group, fpc)
        assert n == n_hand
        assert num / den == pytest.approx(r_hand, rel=1e-9)
        assert var == pytest.approx(v_hand, rel=1e-9)
        assert 0 < kish <= n


def test_ratio_sums_without_keys_pool_everything(units):
    con, rows = units
    ((n, num, den, _, _),) = ratio_sums(con, "SELECT cluster, w, a, b FROM u", []).values()
    assert n == len(rows)
    assert num / den == pytest.approx(sum(r[2] * r[3] for r in rows) / sum(r[2] for r in rows))


def test_kept_share_is_stored_over_adjusted_count(units):
    con, rows = units
    got = kept_shares(con, "SELECT g, cluster, w, 1.0 AS s FROM u", ["g"])
    for group in ("a", "b"):
        mine = [r for r in rows if r[0] == group]
        m, total, var = got[(group,)]
        assert m == len(mine) and total == pytest.approx(sum(r[2] for r in mine))
        var_total = sum(
            wi * wj * (1 - max(1 / wi, 1 / wj))
            for (_, ci, wi, *_) in mine
            for (_, cj, wj, *_) in mine
            if ci == cj
        )
        assert var == pytest.approx((m / total) ** 2 * var_total / total**2, rel=1e-9)


def test_wilson_interval_matches_the_textbook():
    # Wilson (1927) for 8 of 10 at 95%: 0.4902 .. 0.9433 (e.g. Newcombe 1998, table I)
    w = wilson(8, 10)
    assert w["value"] == 0.8 and w["n"] == 10
    assert math.isclose(w["ci_low"], 0.4902, abs_tol=5e-4) and math.isclose(
        w["ci_high"], 0.9433, abs_tol=5e-4
    )
    assert wilson(0, 20)["ci_low"] == 0.0 < wilson(0, 20)["ci_high"] < 0.2
    assert wilson(0, 0) == {"value": None, "ci_low": None, "ci_high": None, "n": 0}


def test_weighted_proportion_uses_the_effective_sample_size():
    # equal weights and independent units: the effective n is n, so Wilson's own interval
    p = 0.3
    variance = p * (1 - p) / 400
    e = proportion(400, 120.0, 400.0, variance, 400.0)
    low, high = wilson_interval(0.3, 400)
    assert (e["ci_low"], e["ci_high"]) == (round(low, 6), round(high, 6))
    # a larger variance (clustered or unequal weights) widens it
    wide = proportion(400, 120.0, 400.0, 4 * variance, 400.0)
    assert wide["ci_low"] < e["ci_low"] and wide["ci_high"] > e["ci_high"]
    # at 0, the variance is 0: Kish's n from the weights alone
    assert proportion(400, 0.0, 400.0, 0.0, 100.0)["ci_high"] == round(wilson_interval(0.0, 100)[1], 6)


def test_ratio_interval_is_log_symmetric():
    e = ratio(100, 200.0, 100.0, 0.01)
    assert e["value"] == 2.0
    assert e["ci_low"] * e["ci_high"] == pytest.approx(4.0, rel=1e-5)
    assert ratio(0, 0.0, 0.0, 0.0)["value"] is None


def test_median_interval_brackets_the_median():
    values = list(range(1, 101))
    e = median(values)
    assert e["value"] == 50.5 and e["n"] == 100
    # order statistics 40 and 61 bracket the median of 100 at 95% (binomial(100, 1/2))
    assert 39 <= e["ci_low"] <= 41 and 60 <= e["ci_high"] <= 62
    assert median([0.0] * 50)["ci_high"] == 0.0
    assert median([])["value"] is None
