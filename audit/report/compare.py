"""What changed since the previous report: hops newly broken, fixed, worse or better, and the
headline figures before and after. A hop got worse or better only when its propagation rate
moved by at least a point and a two-proportion z-test says the move is not noise (|z| >= 1.96),
so a quiet night with a handful of calls does not read as a regression."""

from __future__ import annotations

import math

Z_95 = 1.96
MIN_CHANGE = 0.01


def _key(hop: dict) -> tuple[str, str, str]:
    return hop["caller"], hop["callee"], hop["protocol"]


def _moved(before: dict, after: dict) -> float:
    """The z statistic of after's propagation rate against before's (0 when it cannot move)."""
    n1, n2 = before["calls"], after["calls"]
    if not n1 or not n2:
        return 0.0
    p1, p2 = before["propagated"] / n1, after["propagated"] / n2
    pooled = (before["propagated"] + after["propagated"]) / (n1 + n2)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if spread == 0 or abs(p2 - p1) < MIN_CHANGE:
        return 0.0
    return (p2 - p1) / spread


def _change(before: dict, after: dict) -> dict:
    return {
        "caller": after["caller"],
        "callee": after["callee"],
        "protocol": after["protocol"],
        "before": {k: before[k] for k in ("calls", "propagated", "propagation_rate")},
        "after": {k: after[k] for k in ("calls", "propagated", "propagation_rate")},
        "cause": after.get("cause") or before.get("cause"),
    }


def compare(previous: dict | None, current: dict) -> dict | None:
    """`previous` and `current` are report snapshots (report.snapshot); None without a previous one."""
    if previous is None:
        return None
    before = {_key(h): h for h in previous["hops"]}
    after = {_key(h): h for h in current["hops"]}
    changes: dict[str, list[dict]] = {"new_broken": [], "fixed": [], "worse": [], "better": [], "unseen": []}
    for key, hop in after.items():
        old = before.get(key)
        if hop["broken"] and (old is None or not old["broken"]):
            changes["new_broken"].append(
                _change(old or {"calls": 0, "propagated": 0, "propagation_rate": None}, hop)
            )
        elif old is not None and old["broken"] and not hop["broken"]:
            changes["fixed"].append(_change(old, hop))
        elif old is not None and old["broken"] and hop["broken"]:
            z = _moved(old, hop)
            if z <= -Z_95:
                changes["worse"].append(_change(old, hop) | {"z": round(z, 2)})
            elif z >= Z_95:
                changes["better"].append(_change(old, hop) | {"z": round(z, 2)})
    for key, old in before.items():
        if old["broken"] and key not in after:
            changes["unseen"].append(
                {"caller": key[0], "callee": key[1], "protocol": key[2], "cause": old.get("cause")}
            )
    figures = {
        name: {"before": previous["figures"].get(name), "after": value}
        for name, value in current["figures"].items()
    }
    return {
        "previous": {k: previous[k] for k in ("generated_at", "window_start", "window_end")},
        "figures": figures,
        **changes,
        "counts": {f"{name}_hops": len(items) for name, items in changes.items()},
    }
