"""Zipkin v2 JSON (a list of spans, or a list of traces: lists of spans) -> OTLP export requests.

Spans are grouped by trace, so a trace goes into one request. `kind` maps to the OTLP kind
(absent: UNSPECIFIED: Zipkin leaves it out on local spans and on incomplete ones);
`localEndpoint.serviceName` is the resource's `service.name`; the remote endpoint is where a
client or producer call went (`server.address`, `server.port`, `peer.service`) and who called a
server or consumer (`client.address`, `client.port`); a server's own endpoint is its
`server.address`/`server.port`. Tags are string attributes (`http.path` also gives `url.path`),
an `error` tag makes the status ERROR, annotations become events.

Zipkin's shared spans (B3 single-span: the server reports under the client's span id, with
`shared: true`) get an id of their own, derived from the shared one, so both sides are stored;
the server side's parent is the client side, and the server's children (same service, parent =
the shared id) hang under the server side."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from .otlp import ERROR, KIND, RequestBuilder, SpanAttributes, hex_id, micros
from .source import PROTOBUF, BadCapture, Payload, load_json

_ENDPOINT_KEYS = ("serviceName", "ipv4", "ipv6", "port")


class _Bad(ValueError):
    def __init__(self, message: str, position: str):
        super().__init__(message)
        self.position = position


def payloads(stream, batch_spans: int) -> Iterator[Payload]:
    doc = load_json(stream)
    if not isinstance(doc, list):
        raise BadCapture("top level", "not Zipkin v2 JSON: expected a list of spans or of traces")
    traces = _by_trace(doc)
    cache = SpanAttributes()
    builder, first = RequestBuilder(cache), 0
    for ti, (positions, spans) in enumerate(traces):
        try:
            _add_trace(builder, spans, positions)
        except _Bad as e:
            if ti > first:  # the traces before this one are whole: hand them over, then stop here
                again = RequestBuilder(cache)
                for positions_before, spans_before in traces[first:ti]:
                    _add_trace(again, spans_before, positions_before)
                yield Payload(again.body(), PROTOBUF, _where(traces, first, ti - 1))
            raise BadCapture(e.position, str(e)) from None
        if builder.spans >= batch_spans:
            yield Payload(builder.body(), PROTOBUF, _where(traces, first, ti))
            builder, first = RequestBuilder(cache), ti + 1
    if builder.spans:
        yield Payload(builder.body(), PROTOBUF, _where(traces, first, len(traces) - 1))


def _where(traces, first: int, last: int) -> str:
    return f"the traces of spans {traces[first][0][0]} to {traces[last][0][-1]}"


def _by_trace(doc: list) -> list[tuple[list[str], list[dict]]]:
    """(positions, spans) per trace id, in the order traces first appear."""
    groups: dict[str, tuple[list[str], list[dict]]] = {}
    for i, item in enumerate(doc):
        if isinstance(item, list):
            pairs = [(f"[{i}][{j}]", s) for j, s in enumerate(item)]
        else:
            pairs = [(f"[{i}]", item)]
        for position, span in pairs:
            if not isinstance(span, dict):
                raise BadCapture(position, f"a span must be an object, not {type(span).__name__}")
            tid = span.get("traceId")
            if not isinstance(tid, str):
                raise BadCapture(position, "traceId is missing or not a string")
            group = groups.get(tid.lower().rjust(32, "0"))
            if group is None:
                group = groups[tid.lower().rjust(32, "0")] = ([], [])
            group[0].append(position)
            group[1].append(span)
    return list(groups.values())


def _derived_id(span_id: bytes, trace_id: bytes) -> bytes:
    """A stable id for the server side of a shared span (the same input gives the same id, so
    importing a file twice finds it stored)."""
    return hashlib.blake2b(trace_id + span_id, digest_size=8, person=b"ctxaudit-shared").digest()


def _add_trace(builder: RequestBuilder, spans: list[dict], positions: list[str]) -> None:
    # the server sides of shared spans: shared id -> (derived id, service)
    shared: dict[bytes, tuple[bytes, str]] = {}
    for position, s in zip(positions, spans, strict=True):
        if s.get("shared") is True and s.get("kind") == "SERVER":
            try:
                tid, sid = hex_id(s["traceId"], 32, "traceId"), hex_id(s["id"], 16, "id")
            except (ValueError, TypeError, KeyError) as e:
                raise _Bad(_message(e), position) from None
            shared[sid] = (_derived_id(sid, tid), _service(s))
    for position, s in zip(positions, spans, strict=True):
        try:
            _add_span(builder, s, shared)
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            raise _Bad(_message(e), position) from None
    builder.spans += len(spans)


def _message(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"{e.args[0]} is missing"
    if isinstance(e, AttributeError):
        return "an object was expected"
    return str(e)


def _service(s: dict) -> str:
    local = s.get("localEndpoint") or {}
    name = local.get("serviceName") if isinstance(local, dict) else None
    return name if isinstance(name, str) and name else "unknown_service"


def _endpoint(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object")
    return value


def _add_span(builder: RequestBuilder, s: dict, shared: dict) -> None:
    service = _service(s)
    local = _endpoint(s.get("localEndpoint"), "localEndpoint")
    remote = _endpoint(s.get("remoteEndpoint"), "remoteEndpoint")

    def fill(resource):
        resource.attributes.add(key="service.name").value.string_value = service

    out = builder.scope_spans(service, fill).spans.add()
    out.trace_id = hex_id(s["traceId"], 32, "traceId")
    sid = hex_id(s["id"], 16, "id")
    parent = hex_id(s["parentId"], 16, "parentId") if s.get("parentId") else None
    kind_name = s.get("kind")
    if kind_name is not None and not isinstance(kind_name, str):
        raise ValueError(f"kind must be a string, not {kind_name!r:.40}")
    kind = KIND.get((kind_name or "").lower(), 0)
    if kind_name and not kind:
        raise ValueError(f"kind {kind_name!r:.40} is not CLIENT, SERVER, PRODUCER or CONSUMER")
    side = shared.get(sid) if s.get("shared") is True and kind == 2 else None
    if side is not None:
        sid, parent = side[0], sid  # the server side of a shared span, under its client side
    elif parent is not None and parent in shared and shared[parent][1] == service:
        parent = shared[parent][0]  # a child of a shared span's server side
    out.span_id = sid
    if parent is not None:
        out.parent_span_id = parent
    name = s.get("name", "")
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, not {name!r:.40}")
    out.name = name
    out.kind = kind
    start = micros(s["timestamp"], "timestamp")
    out.start_time_unix_nano = start
    out.end_time_unix_nano = start + micros(s.get("duration") or 0, "duration")
    out.flags = 1  # sampled

    tags = s.get("tags") or {}
    if not isinstance(tags, dict):
        raise ValueError("tags must be an object")
    entry = builder.attributes.entry
    out.MergeFromString(b"".join([entry(k, "string", str(v)) for k, v in tags.items() if k != "error"]))
    if "error" in tags:
        out.status.code = ERROR
        if tags["error"]:
            out.status.message = str(tags["error"])
    attrs = out.attributes
    if "http.path" in tags and "url.path" not in tags:
        attrs.add(key="url.path").value.string_value = str(tags["http.path"])
    if kind in (3, 4):  # client, producer: the remote endpoint is where the call went
        _address(attrs, remote, "server", tags)
        peer = remote.get("serviceName")
        if isinstance(peer, str) and peer and "peer.service" not in tags:
            attrs.add(key="peer.service").value.string_value = peer
    elif kind in (2, 5):  # server, consumer: the local endpoint is this server; the remote the caller
        _address(attrs, local, "server", tags)
        _address(attrs, remote, "client", tags)

    for ai, a in enumerate(s.get("annotations") or ()):
        ev = out.events.add()
        ev.time_unix_nano = micros(a["timestamp"], f"annotations[{ai}].timestamp")
        ev.name = str(a.get("value", ""))


def _address(attrs, endpoint: dict, prefix: str, tags: dict) -> None:
    host = endpoint.get("ipv4") or endpoint.get("ipv6")
    if isinstance(host, str) and host and f"{prefix}.address" not in tags:
        attrs.add(key=f"{prefix}.address").value.string_value = host
    port = endpoint.get("port")
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        if f"{prefix}.port" not in tags:
            attrs.add(key=f"{prefix}.port").value.int_value = port
