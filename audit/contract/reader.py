"""What every reader of a store answers: the named queries, declared once.

`Reader` is the protocol; the file reader (audit/store/reader.py) and the reader that goes
through a running server (audit/read/remote.py) implement it, and the server's read API
(audit/server/read_api.py) serves exactly these queries, at /v1/<name>, parsing each one's
parameters with the types of its signature here (`query_model`). Pages, reports and the
`--server` commands depend on the protocol only."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Annotated, Literal, Protocol, get_type_hints, runtime_checkable

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, create_model

from .document import FINDING_KINDS, PROTOCOLS


def _hex(bits: int):
    digits = bits // 4

    def parse(value: object) -> object:
        if isinstance(value, str):
            if len(value) != digits or any(c not in "0123456789abcdefABCDEF" for c in value):
                raise ValueError(f"expected {digits} hex digits, got {value[:64]!r}")
            return int(value, 16)
        return value

    return parse


TraceId = Annotated[
    int, Field(ge=0, lt=1 << 128), BeforeValidator(_hex(128)), PlainSerializer(lambda v: f"{v:032x}")
]
SpanId = Annotated[
    int, Field(ge=0, lt=1 << 64), BeforeValidator(_hex(64)), PlainSerializer(lambda v: f"{v:016x}")
]
RunId = Annotated[int, Field(ge=1, lt=1 << 63, description="run ids start at 1")]
UnixNs = Annotated[int, Field(ge=0, lt=1 << 64)]
Name = Annotated[str, Field(min_length=1, max_length=512)]
Kind = Literal[FINDING_KINDS]
ProtocolName = Literal[PROTOCOLS]


@dataclass
class ServiceCount:
    service: str
    spans: int
    traces: int


@dataclass
class StoreStats:
    spans: int
    traces: int
    services: int
    links: int
    first_span_start_ns: int | None
    last_span_end_ns: int | None
    end_before_start: int
    by_service: list[ServiceCount] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StoreStats:
        return cls(**(d | {"by_service": [ServiceCount(**s) for s in d["by_service"]]}))


@runtime_checkable
class Reader(Protocol):
    """The store's named queries. Readers raise StoreError (audit/store/errors.py) when the
    store cannot answer."""

    path: str  # where the data is, for messages: a file, or a server's URL
    live: bool  # a running server: it also reports ingestion and runs audits

    def stats(self) -> StoreStats:
        """spans, traces, services, links and the time range"""

    def store_counts(self) -> dict:
        """spans, traces (approximate) and services: cheap on a large store"""

    def time_range(self) -> dict:
        """the first and the newest span start"""

    def protocol_summary(self) -> list[dict]:
        """spans and roots per service, protocol and kind"""

    def trace(self, trace_id: TraceId) -> list[dict]:
        """every span of one trace"""

    def links(self, trace_id: TraceId, span_id: SpanId) -> list[dict]:
        """the span links of one span"""

    def audit_run(self, run_id: RunId | None = None) -> dict | None:
        """an audit run (the last by default), its edges"""

    def audit_runs(self, limit: Annotated[int, Field(ge=1, le=10_000)] = 100) -> list[dict]:
        """the newest audit runs, with finding counts per kind"""

    def finding_counts(self, run_id: RunId | None = None) -> list[dict]:
        """a run's findings (the last run by default) counted per kind and cause"""

    def findings(
        self,
        run_id: RunId | None = None,
        *,
        kind: Kind | None = None,
        service: Name | None = None,
        caller: Name | None = None,
        callee: Name | None = None,
        protocol: ProtocolName | None = None,
        cause: Name | None = None,
        trace_id: TraceId | None = None,
        parent_trace_id: TraceId | None = None,
        since_ns: UnixNs | None = None,
        until_ns: UnixNs | None = None,
        limit: Annotated[int, Field(ge=1, le=10_000)] = 100,
        offset: Annotated[int, Field(ge=0, le=10**12)] = 0,
    ) -> dict:
        """one page of a run's findings (the last run by default), filtered; parent_trace_id:
        those whose probable parent is in that trace; since_ns/until_ns bound the span start"""

    def fragmented_requests(
        self, run_id: RunId | None = None, limit: Annotated[int, Field(ge=1, le=1_000)] = 20
    ) -> list[dict]:
        """a run's (the last by default) logical requests split into the most traces: each
        request's top trace (whose root has no probable parent), its fragments (traces joined by
        stitched hops, all levels down), hops, lowest confidence and newest hop start"""

    def close(self) -> None: ...


QUERIES = (
    "stats",
    "store_counts",
    "time_range",
    "protocol_summary",
    "trace",
    "links",
    "audit_run",
    "audit_runs",
    "finding_counts",
    "findings",
    "fragmented_requests",
)


def doc(name: str) -> str:
    """A query's description, from its declaration."""
    return " ".join(inspect.getdoc(getattr(Reader, name)).split())


@cache
def query_model(name: str) -> type[BaseModel]:
    """A model of the query's parameters, from the protocol's signature: validates what the
    read API receives (strings) and serialises what the remote reader sends (`mode="json"`)."""
    method = getattr(Reader, name)
    hints = get_type_hints(method, include_extras=True)
    fields = {}
    for p in list(inspect.signature(method).parameters.values())[1:]:
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (hints[p.name], default)
    return create_model(f"{name}_params", __config__=ConfigDict(extra="forbid"), **fields)
