"""The audit's output: findings, service edges and the run, and its JSON document
(`schema_version` 1, documented in docs/audit-json.md: a stable contract)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from .causes import CAUSES
from .figures import propagation_rate

SCHEMA_VERSION = 1


def finite(value):
    """`value` with every NaN or infinity replaced by None: JSON has neither."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, **options) -> str:
    """Strict JSON text: what every answer and document of ctxaudit is."""
    return json.dumps(finite(value), allow_nan=False, **options)


@dataclass(frozen=True)
class Edge:
    """Calls from one service to another (or to an uninstrumented peer) over one protocol."""

    caller: str
    callee: str
    protocol: str
    system: str | None
    callee_instrumented: bool
    calls: int  # stored exit spans of the caller towards the callee
    propagated: int  # of those, how many the callee's side continued (a child, or a link)
    stitched: int  # orphans of the callee whose probable parent is one of these calls
    cause: str | None = None  # the edge's likely cause when it drops context

    @property
    def dropped(self) -> int:
        return self.calls - self.propagated

    @property
    def propagation_rate(self) -> float | None:
        return propagation_rate(self.propagated, self.calls)

    @property
    def broken(self) -> bool:
        return self.dropped > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(dropped=self.dropped, propagation_rate=_round(self.propagation_rate), broken=self.broken)
        return d


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


FINDING_KINDS = ("orphan_root", "in_process_break", "dangling_parent", "unpaired_exit")
# what a finding or an edge says the hop spoke (docs/audit-json.md)
PROTOCOLS = ("http", "grpc", "rpc", "messaging", "db", "unknown")


def _trace_hex(hi: int, lo: int) -> str:
    return f"{hi:016x}{lo:016x}"


def evidence(row: dict) -> str:
    """What in the data led to a finding, in words (free text: not part of the contract)."""
    kind = row["kind"]
    if kind == "orphan_root":
        named = (
            f"probable parent in {row['parent_service']}"
            if row["parent_span_id"] is not None
            else "no parent named (ambiguous, or the parent was not sampled)"
        )
        return (
            f"root {row['span_kind']} span with no span link; {row['candidates']} candidate exit span(s) "
            f"in other traces; {named}"
        )
    if kind == "in_process_break":
        named = (
            "probable parent named"
            if row["parent_span_id"] is not None
            else "no parent named (ambiguous, or the request was not sampled)"
        )
        return (
            f"root {row['span_kind']} span starting inside {row['candidates']} stored request(s) of "
            f"{row['service']}; {named}"
        )
    if kind == "dangling_parent":
        return f"parent_span_id {row['detail']} is set but that span never arrived"
    return (
        f"{row['span_kind']} span to {row['callee']} (resolved by {row['detail']}) with no continuation there"
    )


def finding_dict(row: dict) -> dict:
    """One row of the findings table as the JSON document's finding object."""
    cause = CAUSES[row["cause"]]
    return {
        "kind": row["kind"],
        "trace_id": _trace_hex(row["trace_hi"], row["trace_lo"]),
        "span_id": f"{row['span_id']:016x}",
        "service": row["service"],
        "span_name": row["span_name"],
        "span_kind": row["span_kind"],
        "start_time_unix_nano": row["start_ns"],
        "protocol": row["protocol"],
        "system": row["system"],
        "caller": row["caller"],
        "callee": row["callee"],
        "cause": cause.code,
        "explanation": cause.explanation,
        "fix": cause.fix,
        "evidence": evidence(row),
        "probable_parent": None
        if row["parent_span_id"] is None
        else {
            "trace_id": _trace_hex(row["parent_trace_hi"], row["parent_trace_lo"]),
            "span_id": f"{row['parent_span_id']:016x}",
            "service": row["parent_service"],
            "confidence": round(row["confidence"], 4),
        },
    }


@dataclass
class AuditResult:
    window_start_ns: int
    window_end_ns: int
    spans: int
    traces: int
    findings: pa.Table  # one row per finding: the columns of FINDINGS_SELECT in audit/engine/findings.py
    edges: list[Edge] = field(default_factory=list)
    entrypoints: list[str] = field(default_factory=list)  # learned or configured, "svc:operation"
    roots: dict[str, dict[str, int]] = field(
        default_factory=dict
    )  # service -> entry/orphan/orphan_unattributed
    sampling: dict = field(default_factory=dict)  # {"services", "edges", "overall"}: audit/engine/sampling.py
    seconds: float = 0.0
    run_id: int | None = None
    # operations whose orphans stitching gave up for lack of memory (they abstain there):
    # [{"callee", "operation", "orphans"}], audit/engine/stitch.py
    degraded: list[dict] = field(default_factory=list)
    # `sampling` with each figure's sufficient statistics, to pool time slices (the Spark
    # audit: audit/engine/sampling_merge.py); never in the document
    sampling_stats: dict = field(default_factory=dict, repr=False)

    def counts(self) -> dict[str, int]:
        kinds = self.findings.column("kind").to_pylist()
        return {k: kinds.count(k) for k in FINDING_KINDS}

    def stitched(self) -> int:
        return self.findings.num_rows - self.findings.column("parent_span_id").null_count

    def iter_findings(self):
        """Findings as JSON-document objects, a batch at a time (millions fit in no list)."""
        for batch in self.findings.to_batches(max_chunksize=10_000):
            for row in batch.to_pylist():
                yield finding_dict(row)

    def run_dict(self) -> dict:
        return {
            "id": self.run_id,
            "window_start": self.window_start_ns,
            "window_end": self.window_end_ns,
            "spans": self.spans,
            "traces": self.traces,
            "seconds": round(self.seconds, 3),
            "entrypoints": self.entrypoints,
            "counts": self.counts(),
            "stitched": self.stitched(),
            "roots": self.roots,
            "degraded": self.degraded,
        }

    def document_chunks(self, *, findings: bool = True, extra: dict | None = None, batch: int = 5_000):
        """The result document (docs/audit-json.md) as JSON text, a piece at a time: the findings
        streamed so that millions of them need no list in memory. `extra` adds top-level keys;
        without `findings` the document leaves them out."""
        head = {
            "schema_version": SCHEMA_VERSION,
            "run": self.run_dict(),
            "edges": [e.to_dict() for e in self.edges],
            "sampling": self.sampling,
        } | (extra or {})
        text = dumps(head)
        if not findings:
            yield text + "\n"
            return
        yield text[:-1] + ',\n "findings": ['
        pieces: list[str] = []
        for i, finding in enumerate(self.iter_findings()):
            pieces.append(("\n  " if i == 0 else ",\n  ") + dumps(finding))
            if len(pieces) == batch:
                yield "".join(pieces)
                pieces = []
        yield "".join(pieces) + "\n ]}\n"

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "run": self.run_dict(),
            "findings": list(self.iter_findings()),
            "edges": [e.to_dict() for e in self.edges],
            "sampling": self.sampling,
        }
