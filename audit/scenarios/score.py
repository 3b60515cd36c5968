"""Score an audit against the ground truth of the simulator or the demo fleet: detection,
stitching and edge figures, overall and per protocol. Used by bench/accuracy.py and the tests."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

_ENTRY_KINDS = ("SERVER", "CONSUMER")


@dataclass
class Rate:
    hits: int = 0
    total: int = 0

    @property
    def value(self) -> float | None:
        return self.hits / self.total if self.total else None

    def __str__(self) -> str:
        return "n/a" if self.total == 0 else f"{self.value:.4f} ({self.hits}/{self.total})"


@dataclass
class StitchScore:
    precision: Rate = field(default_factory=Rate)  # named parents that are the true parent
    recall: Rate = field(default_factory=Rate)  # orphans whose true parent is stored, named right
    abstention: Rate = field(default_factory=Rate)  # orphans whose true parent is not stored, no parent named


@dataclass
class EdgeScore:
    caller: str
    callee: str
    true_rate: float
    true_calls: int
    found_rate: float | None
    found_calls: int
    broken: bool  # in the truth
    found_broken: bool


@dataclass
class Score:
    detection: dict[str, tuple[Rate, Rate]]  # kind -> (precision, recall)
    stitching: dict[str, StitchScore]  # "all", a protocol, or "in_process_break"
    edges: list[EdgeScore]
    causes: Rate  # orphan findings whose cause code is the truth's

    def summary(self) -> dict:
        return {
            "detection": {
                k: {"precision": p.value, "recall": r.value, "n": r.total}
                for k, (p, r) in self.detection.items()
            },
            "stitching": {
                k: {n: getattr(s, n).value for n in ("precision", "recall", "abstention")}
                | {"orphans_parent_stored": s.recall.total, "orphans_parent_not_stored": s.abstention.total}
                for k, s in self.stitching.items()
            },
            "edges": [asdict(e) for e in self.edges],
            "cause_accuracy": self.causes.value,
        }


def _protocol(truth_protocol: str | None) -> str:
    return {"kafka": "messaging", None: "unknown"}.get(truth_protocol, truth_protocol)


def score(truth: Iterable[dict], result: dict, exit_peers: dict[tuple[str, str], str] | None = None) -> Score:
    """`truth`: records as in docs/scenarios.md; `result`: the audit's JSON document.
    `exit_peers` maps (trace_id, span_id) of exported exits to the peer they called, for
    scoring edges to peers without spans (the truth does not name them)."""
    spans: dict[tuple[str, str], tuple] = {}
    for r in truth:
        spans[(r["trace_id"], r["span_id"])] = (
            r["service"],
            r["kind"],
            r["exported"],
            r["parent_span_id"],
            r["true_parent_trace_id"],
            r["true_parent_span_id"],
            r["cause"],
            r["hop"],
            r["protocol"],
            r["linked"],
        )
    findings: dict[str, dict[tuple[str, str], dict]] = defaultdict(dict)
    for f in result["findings"]:
        findings[f["kind"]][(f["trace_id"], f["span_id"])] = f

    true_kind: dict[tuple[str, str], str] = {}
    for key, (_, kind, exported, parent, _, tp_span, _, _, _, linked) in spans.items():
        if not exported or parent is not None or tp_span is None or linked:
            continue
        true_kind[key] = "orphan_root" if kind in _ENTRY_KINDS else "in_process_break"

    detection = {}
    for kind in ("orphan_root", "in_process_break"):
        truth_set = {k for k, v in true_kind.items() if v == kind}
        found = set(findings[kind])
        detection[kind] = (
            Rate(len(found & truth_set), len(found)),
            Rate(len(found & truth_set), len(truth_set)),
        )

    stitching: dict[str, StitchScore] = defaultdict(StitchScore)
    causes = Rate()
    for kind in ("orphan_root", "in_process_break"):
        for key, f in findings[kind].items():
            record = spans.get(key)
            named = f["probable_parent"]
            groups = ["all" if kind == "orphan_root" else "in_process_break"]
            if kind == "orphan_root" and record is not None:
                groups.append(_protocol(record[8]))
            true_parent = (record[4], record[5]) if record and true_kind.get(key) == kind else None
            stored = true_parent is not None and spans.get(true_parent, (None,) * 3)[2]
            right = named is not None and true_parent == (named["trace_id"], named["span_id"])
            for g in groups:
                s = stitching[g]
                if named is not None:
                    s.precision.total += 1
                    s.precision.hits += right
                if stored:
                    s.recall.total += 1
                    s.recall.hits += right
                elif true_parent is not None:
                    s.abstention.total += 1
                    s.abstention.hits += named is None
            if kind == "orphan_root" and record is not None and record[6] is not None:
                causes.total += 1
                causes.hits += f["cause"] == record[6]
    return Score(detection, dict(stitching), _edges(spans, result, exit_peers or {}), causes)


# Exits to peers without spans (databases, external hosts) in a store written by the simulator or
# the fleet: there, instrumented services live at *.svc.cluster.local or on loopback.
_PEERS = """
SELECT lpad(lower(hex(trace_id)), 32, '0'), lpad(lower(hex(span_id)), 16, '0'), server_address FROM spans
WHERE kind IN ('CLIENT', 'PRODUCER') AND protocol <> 'messaging' AND server_address IS NOT NULL
  AND server_address NOT LIKE '%.svc.cluster.local' AND server_address NOT IN ('127.0.0.1', 'localhost')
"""


def exit_peers(con) -> dict[tuple[str, str], str]:
    """(trace_id, span_id) -> peer address, for `score(exit_peers=...)`; `con` is a DuckDB connection."""
    return {(t, s): a for t, s, a in con.execute(_PEERS).fetchall()}


def _strip_port(name: str) -> str:
    host, _, port = name.rpartition(":")
    return host if port.isdigit() and host else name


def _edges(spans: dict, result: dict, exit_peers: dict) -> list[EdgeScore]:
    calls: Counter = Counter()
    propagated: Counter = Counter()
    for service, kind, _, _, tp_trace, tp_span, cause, _, _, _ in spans.values():
        if kind not in _ENTRY_KINDS or tp_span is None:
            continue
        parent = spans.get((tp_trace, tp_span))
        if parent is None or parent[0] == service:
            continue
        key = (parent[0], service)
        calls[key] += 1
        propagated[key] += cause is None
    for (trace_id, span_id), peer in exit_peers.items():  # in-process loss on calls to peers
        record = spans.get((trace_id, span_id))
        if record is None:
            continue
        key = (record[0], _strip_port(peer))
        calls[key] += 1
        propagated[key] += record[6] is None
    found: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for e in result["edges"]:
        key = (e["caller"], _strip_port(e["callee"]))
        found[key][0] += e["calls"]
        found[key][1] += e["propagated"]
    out = []
    for key in sorted(set(calls) | {k for k, (c, p) in found.items() if c > p}):
        true_rate = propagated[key] / calls[key] if calls[key] else 1.0
        fc, fp = found.get(key, (0, 0))
        out.append(
            EdgeScore(
                key[0],
                key[1],
                round(true_rate, 4),
                calls[key],
                round(fp / fc, 4) if fc else None,
                fc,
                true_rate < 1.0,
                fc > fp,
            )
        )
    return out
