"""The sampling figures of several time slices as one set (the Spark audit's slices,
docs/scale.md): each figure is computed again, by the same function, from its slices' pooled
sufficient statistics (the `_stats` a figure carries: estimate.STATS). Point estimates are
then exactly what the figure's formula gives on the slices' units taken together; intervals
come from variances pooled across slices (each slice's linearisation kept around its own
estimate, a trace cut by a slice boundary counted in both: docs/scale.md says where this
differs from one pass)."""

from __future__ import annotations

import copy
from collections.abc import Callable

from .estimate import STATS, proportion, ratio, share_ratio, wilson
from .sampling_edges import _capture, _protocol, _upstream_missing
from .sampling_overall import latency_figure


def strip(sampling):
    """The figures without their statistics: what the document and the saved run hold."""
    if isinstance(sampling, dict):
        return {k: strip(v) for k, v in sampling.items() if k != STATS}
    if isinstance(sampling, list):
        return [strip(v) for v in sampling]
    return sampling


# pooling the arguments of one figure function across slices


def _ratio_sums(parts: list) -> tuple | None:
    """(n, num, den, V(R), kish) of estimate.ratio_sums; V(R) = V / den^2 pooled as V."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    n, num, den = (sum(p[i] for p in parts) for i in range(3))
    var = sum(p[3] * p[2] * p[2] for p in parts) / (den * den) if den else 0.0
    return (n, num, den, var) + ((sum(p[4] for p in parts),) if len(parts[0]) > 4 else ())


def _kept(parts: list) -> tuple | None:
    """(m, N, V(m/N)) of estimate.kept_shares; pooled through V(N) = V(m/N) N^4 / m^2."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    m, total = sum(p[0] for p in parts), sum(p[1] for p in parts)
    var_total = sum(p[2] * p[1] ** 4 / (p[0] * p[0]) for p in parts if p[0])
    share = m / total if total else 0.0
    return m, total, share * share * var_total / (total * total) if total else 0.0


def _stricter(parts: list) -> int | None:
    counted = [p for p in parts if p is not None]
    return sum(counted) if counted else None


_POOL: dict[str, tuple[Callable, Callable[[list[list]], list]]] = {
    "wilson": (wilson, lambda args: [sum(a[0] for a in args), sum(a[1] for a in args)]),
    "proportion": (proportion, lambda args: list(_ratio_sums(args))),
    "ratio": (ratio, lambda args: list(_ratio_sums(args))),
    "share_ratio": (
        share_ratio,
        lambda args: [*_kept([a[:3] for a in args]), sum(a[3] for a in args)],
    ),
    "capture": (
        _capture,
        lambda args: [
            (sum(a[0][0] for a in args), sum(a[0][1] for a in args)),
            _ratio_sums([a[1] for a in args]),
            _kept([a[2] for a in args]),
            _stricter([a[3] for a in args]),
        ],
    ),
    "upstream_missing": (
        _upstream_missing,
        lambda args: [_kept([a[0] for a in args]), _kept([a[1] for a in args])],
    ),
    "latency_undercount": (
        latency_figure,
        lambda args: [[x for a in args for x in a[0]], [x for a in args for x in a[1]]],
    ),
}


def _figure(figures: list[dict]) -> dict:
    name = figures[0][STATS][0]
    fn, pool = _POOL[name]
    args = pool([f[STATS][1] for f in figures])
    out = fn(*args)
    out[STATS] = [name, args]
    return out


def _merge_entity(entities: list[dict], counts: Callable[[list, dict], None]) -> dict:
    """One service, edge or `overall` from its slices: figures pooled, counts added, the rest
    (names, settings) as the first slice has them; `counts` derives what depends on pooled counts."""
    out = copy.deepcopy(entities[0])
    for key, value in entities[0].items():
        if isinstance(value, dict) and STATS in value:
            out[key] = _figure([e[key] for e in entities if e.get(key) is not None])
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = sum(e.get(key) or 0 for e in entities)
    pooled = [sum(e[STATS][1][i] for e in entities) for i in range(len(entities[0][STATS][1]))]
    out[STATS] = [entities[0][STATS][0], pooled]
    counts(pooled, out)
    return out


def _service_counts(pooled: list, out: dict) -> None:
    entries, dangling, differs = pooled
    out["parent_based"] = None if entries == 0 and dangling == 0 else (dangling == 0 and differs == 0)


def _edge_counts(pooled: list, out: dict) -> None:
    spans, without_th = pooled
    _, num, den, _ = out["volume_ratio"][STATS][1]
    out["caller_exits_adjusted"], out["callee_entries_adjusted"] = round(num, 1), round(den, 1)
    out["unknown_adjusted_count_share"] = round(without_th / spans, 6) if spans else None


def _overall_counts(pooled: list, out: dict) -> None:
    spans, known = pooled
    out["spans"], out["known_threshold_share"] = spans, round(known / spans, 6) if spans else None


def merge_sampling(slices: list[dict]) -> dict:
    """The `sampling` object, statistics kept, of the slices' (each as engine.sampling_figures
    gave it, statistics included) taken together."""
    services: dict[str, list[dict]] = {}
    edges: dict[tuple, list[dict]] = {}
    for s in slices:
        for service in s.get("services", []):
            services.setdefault(service["service"], []).append(service)
        for edge in s.get("edges", []):
            edges.setdefault((edge["caller"], edge["callee"], _protocol(edge["protocol"])), []).append(edge)
    overall = [s["overall"] for s in slices if s.get("overall")]
    out = {
        "services": [_merge_entity(services[k], _service_counts) for k in sorted(services)],
        "edges": [
            _merge_entity(edges[k], _edge_counts)
            for k in sorted(edges, key=lambda k: tuple(x or "" for x in k))
        ],
    }
    if overall:
        out["overall"] = _merge_entity(overall, _overall_counts)
    return out
