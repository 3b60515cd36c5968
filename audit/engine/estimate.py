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
import numpy as np

_Z95 = 1.959964
P56 = 72057594037927936  # 2^56: `th` is a 56-bit rejection threshold


def stored_probability(th) -> np.ndarray:
    """Per span, the probability p = (2^56 - th) / 2^56 that its sampler kept it (`th` as the
    store keeps it: 0 where the tracestate had none), kept away from 0."""
    return np.clip((P56 - np.asarray(th, dtype=float)) / P56, 1e-6, 1.0)


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
    from `units` (columns keys, cluster, z, p). Units of one cluster and one p add up first;
    a cluster with one p is then (1 - p) z^2, and only the few with several pair up."""
    return f"""
    WITH r AS MATERIALIZED (SELECT {keys}, cluster, p, sum(z) AS z FROM ({units}) GROUP BY ALL),
    c AS (SELECT {keys}, cluster, count(*) AS k, max(p) AS p, sum(z) AS z FROM r GROUP BY ALL),
    several AS (SELECT {keys}, cluster FROM c WHERE k > 1)
    SELECT {keys}, sum(v) AS v FROM (
      SELECT {keys}, (1.0 - p) * z * z AS v FROM c WHERE k = 1
      UNION ALL
      SELECT {", ".join(f"i.{key}" for key in keys.split(", "))}, i.z * j.z * (1.0 - greatest(i.p, j.p))
      FROM r i JOIN several USING ({keys}, cluster) JOIN r j USING ({keys}, cluster)
    ) GROUP BY ALL
    """


def ratio_sums(
    con: duckdb.DuckDBPyConnection,
    units_sql: str,
    keys: Sequence[str],
    params: dict | None = None,
    *,
    finite_population: bool = False,
    variance_every: int = 1,
) -> dict[tuple, tuple]:
    """Per group of `keys`: (units, sum(w*a), sum(w*b), V(R), Kish's effective n).

    `units_sql` yields the columns `keys`, `cluster`, `w` (adjusted count), `a`, `b`; units
    with NULL w are skipped. Keys must not be NULL (they are joined on). The variance is
    summed over one cluster in `variance_every` (by hash) and scaled up: an unbiased estimate
    of the same sum, for windows whose millions of clusters would cost seconds to group."""
    grouped = list(keys) or ["g"]
    if not keys:
        units_sql = f"SELECT 0 AS g, * FROM ({units_sql})"
    k = ", ".join(grouped)
    p = "1.0 / w::DOUBLE" if finite_population else "0.0"
    sampled = f"AND hash(cluster) % {int(variance_every)} = 0" if variance_every > 1 else ""
    z_rows = (
        f"SELECT {k}, cluster, p, c.num - CASE WHEN t.den > 0 THEN t.num / t.den ELSE 0 END * c.den AS z "
        f"FROM c JOIN t USING ({k})"
    )
    sql = f"""
    WITH t AS (SELECT {k}, count(*) AS n, sum(w * a::DOUBLE) AS num, sum(w * b::DOUBLE) AS den,
                      sum(w) * sum(w) / sum(w * w) AS kish
               FROM ({units_sql}) WHERE w IS NOT NULL GROUP BY ALL),
    c AS (SELECT {k}, cluster, {p} AS p, sum(w * a::DOUBLE) AS num, sum(w * b::DOUBLE) AS den
          FROM ({units_sql}) WHERE w IS NOT NULL {sampled} GROUP BY ALL),
    v AS ({_pairwise_variance_sql(k, z_rows)})
    SELECT {k}, t.n, t.num, t.den, coalesce({int(variance_every)} * v.v / nullif(t.den * t.den, 0), 0), t.kish
    FROM t LEFT JOIN v USING ({k})
    """
    out = {}
    for row in con.execute(sql, params or {}).fetchall():
        out[tuple(row[: len(keys)])] = tuple(row[len(grouped) :])
    return out


def kept_shares(
    con: duckdb.DuckDBPyConnection,
    units_sql: str,
    keys: Sequence[str],
    params: dict | None = None,
    *,
    variance_every: int = 1,
) -> dict[tuple, tuple[float, float, float]]:
    """Per group of `keys`: (m, N, V) where m = sum(s) counts the stored units, N = sum(s*w)
    estimates how many there were (Horvitz-Thompson), and V estimates the variance of m/N, the
    share that was kept, from N's variance over sampling (the pairwise sum with z = s*w, over
    one cluster in `variance_every`, scaled up).

    `units_sql` yields `keys`, `cluster`, `w` (adjusted count) and `s` (the unit's multiplicity,
    below 1 for a unit shared among groups); units with NULL w are skipped."""
    k = ", ".join(keys)
    sampled = f"AND hash(cluster) % {int(variance_every)} = 0" if variance_every > 1 else ""
    sql = f"""
    WITH t AS (SELECT {k}, sum(s::DOUBLE) AS m, sum(s * w::DOUBLE) AS total
               FROM ({units_sql}) WHERE w IS NOT NULL GROUP BY ALL),
    c AS (SELECT {k}, cluster, 1.0 / w::DOUBLE AS p, sum(s * w::DOUBLE) AS z
          FROM ({units_sql}) WHERE w IS NOT NULL {sampled} GROUP BY ALL),
    v AS ({_pairwise_variance_sql(k, "SELECT * FROM c")})
    SELECT {k}, t.m, t.total, {int(variance_every)} * coalesce(v.v, 0) FROM t LEFT JOIN v USING ({k})
    """
    out = {}
    for row in con.execute(sql, params or {}).fetchall():
        m, total, var_total = row[len(keys) :]
        share = m / total if total else 0.0
        out[tuple(row[: len(keys)])] = (
            m,
            total,
            share * share * var_total / (total * total) if total else 0.0,
        )
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


# A figure may carry its sufficient statistics under this key: the arguments it was computed
# from, so the figures of several time slices (the Spark audit's) are recomputed from their
# pooled statistics (sampling_merge.py). The run strips them before the document sees them.
STATS = "_stats"


def with_stats(name: str, figure: dict, *args) -> dict:
    """`figure`, computed by the function registered as `name` in sampling_merge.py from `args`."""
    figure[STATS] = [name, list(args)]
    return figure


def stat(name: str, *args) -> dict:
    """One of the primitive figures above, with its statistics: wilson, proportion, ratio, share_ratio."""
    fn = {"wilson": wilson, "proportion": proportion, "ratio": ratio, "share_ratio": share_ratio}[name]
    return with_stats(name, fn(*args), *args)
