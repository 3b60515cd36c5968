"""Estimates with 95% intervals, for the sampling figures (docs/sampling.md, "Intervals").

Stored spans are a sample: each one stands for w = 1/p spans (its adjusted count, from
`ot=th`). A figure is a ratio of two weighted sums over sampled units, R = sum(w*a) / sum(w*b):
a proportion when b = 1 and a is 0 or 1, a ratio of two totals otherwise. Its variance comes
from the delta method (linearization) with z_i = w_i * (a_i - R * b_i):

    V(R) = sum over clusters c of  sum over i, j in c of  z_i * z_j * (1 - max(p_i, p_j))  / sum(w*b)^2

Spans of one trace are kept on the same 56 bits of randomness (consistent probability
sampling): two of them are both kept with probability min(p_i, p_j), hence the pairwise
term, which is (1 - p) * (sum of z)^2 when a trace has one threshold. That is the variance
over sampling alone (`finite_population`): right for totals that are fixed, like the calls on
an edge in this window. For rates of a process (how often a hop loses context) the outcome
is random too, and the terms lose the (1 - max p) factor: the clusters are then the logical
requests, as far as stitching joined them. Proportions get a Wilson interval at the effective
sample size R(1 - R) / V; ratios a log-normal interval. The SQL does the sums, however many
units there are.
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


def _pairwise_variance_sql(keys: str, units: str) -> str:
    """Per group of `keys`, sum over clusters of sum over pairs i, j of z_i z_j (1 - max(p_i, p_j)),
    from `units` (columns keys, cluster, z, p): sorted by p within a cluster, unit k pairs with
    itself and, twice, with every unit before it, all at its own (larger) p."""
    return f"""
    SELECT {keys}, sum((1.0 - p) * z * (z + 2 * before)) AS v FROM (
      SELECT *, coalesce(sum(z) OVER (PARTITION BY {keys}, cluster ORDER BY p
                                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
      FROM ({units})) GROUP BY {keys}
    """


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
    p = "1.0 / u.w" if finite_population else "0.0"
    z_units = f"""SELECT {", ".join(f"u.{key}" for key in grouped)}, u.cluster, {p} AS p,
                         u.w * (u.a - CASE WHEN t.den > 0 THEN t.num / t.den ELSE 0 END * u.b) AS z
                  FROM u JOIN t ON {on}"""
    sql = f"""
    WITH u AS (SELECT {k}, cluster, w::DOUBLE AS w, a::DOUBLE AS a, b::DOUBLE AS b
               FROM ({units_sql}) WHERE w IS NOT NULL),
    t AS (SELECT {k}, count(*) AS n, sum(w * a) AS num, sum(w * b) AS den,
                 sum(w) * sum(w) / sum(w * w) AS kish FROM u GROUP BY ALL),
    v AS ({_pairwise_variance_sql(k, z_units)})
    SELECT {", ".join(f"t.{key}" for key in grouped)}, t.n, t.num, t.den,
           coalesce(v.v / nullif(t.den * t.den, 0), 0), t.kish
    FROM t JOIN v ON {on.replace("u.", "v.")}
    """
    out = {}
    for row in con.execute(sql, params or {}).fetchall():
        out[tuple(row[: len(keys)])] = tuple(row[len(grouped):])
    return out


def kept_shares(con: duckdb.DuckDBPyConnection, units_sql: str, keys: Sequence[str],
                params: dict | None = None) -> dict[tuple, tuple[float, float, float]]:  # fmt: skip
    """Per group of `keys`: (m, N, V) where m = sum(s) counts the stored units, N = sum(s*w)
    estimates how many there were (Horvitz-Thompson), and V estimates the variance of m/N, the
    share that was kept, from N's variance over sampling (the pairwise sum with z = s*w).

    `units_sql` yields `keys`, `cluster`, `w` (adjusted count) and `s` (the unit's multiplicity,
    below 1 for a unit shared among groups); units with NULL w are skipped."""
    k = ", ".join(keys)
    sql = f"""
    WITH u AS (SELECT {k}, cluster, w::DOUBLE AS w, s::DOUBLE AS s FROM ({units_sql}) WHERE w IS NOT NULL),
    t AS (SELECT {k}, sum(s) AS m, sum(s * w) AS total FROM u GROUP BY ALL),
    v AS ({_pairwise_variance_sql(k, f"SELECT {k}, cluster, 1.0 / w AS p, s * w AS z FROM u")})
    SELECT {", ".join(f"t.{key}" for key in keys)}, t.m, t.total, v.v
    FROM t JOIN v ON {" AND ".join(f"t.{key} = v.{key}" for key in keys)}
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
