"""The figures derived from an audit's edges and roots, each computed here and nowhere else:
the engine's edges, the store's run trends, the report, the CI gate, the explorer and the
service graph all call these. A figure over nothing is None ("n/a"), never 0 or 1."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def propagation_rate(propagated: int, calls: int) -> float | None:
    """The share of stored calls whose context reached the callee (a child, or a link)."""
    return propagated / calls if calls else None


def context_health(edges: Iterable[Mapping]) -> float | None:
    """The propagation rate over every stored call between instrumented services."""
    instrumented = [e for e in edges if e["callee_instrumented"]]
    return propagation_rate(sum(e["propagated"] for e in instrumented), sum(e["calls"] for e in instrumented))


def orphan_rate(roots: Mapping[str, Mapping[str, int]] | Mapping[str, int]) -> float | None:
    """Orphan roots / all roots (entry roots and orphan roots), over the services of `roots`
    ({service: {"entry": n, "orphan": n}}) or of one service ({"entry": n, "orphan": n})."""
    per_service = roots.values() if roots and isinstance(next(iter(roots.values())), Mapping) else [roots]
    orphans = sum(r.get("orphan", 0) for r in per_service)
    entries = sum(r.get("entry", 0) for r in per_service)
    return orphans / (orphans + entries) if orphans + entries else None
