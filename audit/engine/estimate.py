"""Estimates with 95% intervals, for the sampling figures (docs/sampling.md, "Intervals").

Stored spans are a sample: each one stands for 1/p spans (its adjusted count, from `ot=th`).
A figure is a ratio of two weighted sums over sampled units, R = sum(w*a) / sum(w*b): a
proportion when b = 1 and a is 0 or 1, a ratio of two totals otherwise. Its variance comes
from the delta method (linearization), summed over clusters, since the spans of one trace are
kept or dropped together:

    V(R) = sum over clusters c of f_c * (sum over units i in c of w_i * (a_i - R * b_i))^2 / sum(w*b)^2

f_c = 1 describes the process (how often the hop loses context); f_c = 1 - p_c (the finite
population correction) describes this window's traffic, whose totals are fixed and only
unseen because of sampling. Proportions get a Wilson interval at the effective sample size
R(1 - R) / V; ratios a log-normal interval. The SQL does the sums, however many units there are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import duckdb

_Z95 = 1.959964
P56 = 72057594037927936  # 2^56: `th` is a 56-bit rejection threshold

# adjusted count of a span: 1/p from its threshold, else from the configured assumption (NULL
# when neither is known: such a span is left out of the weighted figures and counted apart)
ADJUSTED_COUNT_MACRO = f"""
CREATE OR REPLACE TEMP MACRO adjusted_count(th, assumed) AS
  CASE WHEN th IS NULL THEN 1.0 / assumed ELSE {P56}.0 / ({P56}.0 - th::DOUBLE) END;
"""


def wilson_interval(p: float, n: float) -> tuple[float, float]:
    """The 95% Wilson score interval of proportion p observed on (effective) sample size n > 0."""
    denominator = 1 + _Z95**2 / n
    centre = (p + _Z95**2 / (2 * n)) / denominator
    half = _Z95 * math.sqrt(max(0.0, p * (1 - p) / n + _Z95**2 / (4 * n * n))) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _estimate(value, low, high, n: int) -> dict:
    r = lambda x: None if x is None else round(x, 6)  # noqa: E731
    return {"value": r(value), "ci_low": r(low), "ci_high": r(high), "n": n}


def wilson(hits: int, n: int) -> dict:
    """A plain proportion with its 95% Wilson interval; value and bounds are None when n = 0."""
    if n == 0:
        return _estimate(None, None, None, 0)
    return _estimate(hits / n, *wilson_interval(hits / n, n), n)


def proportion(n: int, numerator: float, denominator: float, variance: float, kish_n: float) -> dict:
    """A weighted proportion: Wilson at the effective sample size that the variance implies
    (Kish's, from the weights alone, when the estimate sits at 0 or 1 and the variance is 0)."""
    if n == 0 or not denominator:
        return _estimate(None, None, None, n)
    p = min(1.0, max(0.0, numerator / denominator))
    n_eff = p * (1 - p) / variance if variance > 0 and 0 < p < 1 else kish_n
    return _estimate(p, *wilson_interval(p, max(n_eff, 1e-9)), n)


def ratio(n: int, numerator: float, denominator: float, variance: float) -> dict:
    """A ratio of two totals with a log-normal 95% interval."""
    if n == 0 or not denominator or not numerator:
        return _estimate(0.0 if numerator == 0 and denominator else None, None, None, n)
    r = numerator / denominator
    spread = math.exp(_Z95 * math.sqrt(max(variance, 0.0)) / r)
    return _estimate(r, r / spread, r * spread, n)


def median(values: Sequence[float]) -> dict:
    """A median with its distribution-free 95% interval: the order statistics that bracket it
    with binomial(n, 1/2) probability of at least 95% (normal approximation of the ranks)."""
    n = len(values)
    if n == 0:
        return _estimate(None, None, None, 0)
    xs = sorted(values)
    mid = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    half = _Z95 * math.sqrt(n) / 2
    lo, hi = max(0, math.floor(n / 2 - half) - 1), min(n - 1, math.ceil(n / 2 + half))
    return _estimate(mid, xs[lo], xs[hi], n)


def ratio_sums(con: duckdb.DuckDBPyConnection, units_sql: str, keys: Sequence[str], params: dict | None = None,
               *, finite_population: bool = False) -> dict[tuple, tuple[int, float, float, float, float]]:  # fmt: skip
    """Per group of `keys`: (units, sum(w*a), sum(w*b), V(R), Kish's effective n).

    `units_sql` yields the columns `keys`, `cluster`, `w` (adjusted count), `a`, `b`; units
    with NULL w are skipped. Keys must not be NULL (they are joined on)."""
    grouped = list(keys) or ["g"]
    if not keys:
        units_sql = f"SELECT 0 AS g, * FROM ({units_sql})"
    k = ", ".join(grouped)
    on = " AND ".join(f"t.{key} = u.{key}" for key in grouped)
    fpc = "1.0 - least(1.0, avg(1.0 / u.w))" if finite_population else "1.0"
    sql = f"""
    WITH u AS (SELECT {k}, cluster, w::DOUBLE AS w, a::DOUBLE AS a, b::DOUBLE AS b
               FROM ({units_sql}) WHERE w IS NOT NULL),
    t AS (SELECT {k}, count(*) AS n, sum(w * a) AS num, sum(w * b) AS den,
                 sum(w) * sum(w) / sum(w * w) AS kish FROM u GROUP BY ALL),
    z AS (SELECT {", ".join(f"u.{key}" for key in grouped)}, u.cluster,
                 sum(u.w * (u.a - CASE WHEN t.den > 0 THEN t.num / t.den ELSE 0 END * u.b)) AS z, {fpc} AS f
          FROM u JOIN t ON {on} GROUP BY ALL)
    SELECT {", ".join(f"t.{key}" for key in grouped)}, any_value(t.n), any_value(t.num), any_value(t.den),
           coalesce(sum(z.f * z.z * z.z) / nullif(any_value(t.den) * any_value(t.den), 0), 0), any_value(t.kish)
    FROM t JOIN z ON {on.replace("u.", "z.")} GROUP BY {", ".join(f"t.{key}" for key in grouped)}
    """
    out = {}
    for row in con.execute(sql, params or {}).fetchall():
        out[tuple(row[: len(keys)])] = tuple(row[len(grouped):])
    return out


def kept_shares(con: duckdb.DuckDBPyConnection, units_sql: str, keys: Sequence[str],
                params: dict | None = None) -> dict[tuple, tuple[float, float, float]]:  # fmt: skip
    """Per group of `keys`: (m, N, V) where m = sum(s) counts the stored units, N = sum(s*w)
    estimates how many there were (Horvitz-Thompson), and V estimates the variance of m/N, the
    share that was kept, from N's: V(N) = sum over clusters of (1 - p_c) * (sum of s*w)^2.

    `units_sql` yields `keys`, `cluster`, `w` (adjusted count) and `s` (the unit's multiplicity,
    below 1 for a unit shared among groups); units with NULL w are skipped."""
    k = ", ".join(keys)
    sql = f"""
    WITH c AS (SELECT {k}, sum(s)::DOUBLE AS m, sum(s * w)::DOUBLE AS total, least(1.0, count(*) / sum(w)) AS p
               FROM ({units_sql}) WHERE w IS NOT NULL GROUP BY {k}, cluster)
    SELECT {k}, sum(m), sum(total), sum((1.0 - p) * total * total) FROM c GROUP BY {k}
    """
    out = {}
    for row in con.execute(sql, params or {}).fetchall():
        m, total, var_total = row[len(keys):]
        share = m / total if total else 0.0
        out[tuple(row[: len(keys)])] = (m, total, share * share * var_total / (total * total) if total else 0.0)
    return out


def proportion_from(value: float, variance: float, n: int, kish_n: float | None = None) -> dict:
    """A proportion estimated some other way, with its variance: Wilson at the effective n."""
    if n == 0:
        return _estimate(None, None, None, 0)
    p = min(1.0, max(0.0, value))
    n_eff = p * (1 - p) / variance if variance > 0 and 0 < p < 1 else (kish_n or n)
    return _estimate(p, *wilson_interval(p, max(n_eff, 1e-9)), n)


def share_ratio(m: float, total: float, variance: float, n: int) -> dict:
    """m/N from kept_shares, with a normal interval (the share is not a binomial count)."""
    if not total:
        return _estimate(None, None, None, n)
    share = m / total
    half = _Z95 * math.sqrt(max(variance, 0.0))
    return _estimate(share, max(0.0, share - half), min(1.0, share + half), n)
