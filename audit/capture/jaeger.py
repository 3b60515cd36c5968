"""Jaeger's JSON, as its query API (`/api/traces`) and the UI's download return it:
`{"data": [{"traceID", "spans": [...], "processes": {...}}]}` -> OTLP export requests.

The mapping follows the Collector's Jaeger translator: the `span.kind` tag becomes the kind
(absent: UNSPECIFIED, not guessed), `otel.status_code` or `error=true` the status, the first
CHILD_OF reference in the same trace the parent, every other reference a link (with
`opentracing.ref_type`), logs events, a process its resource (`service.name` + its tags).
One addition for the audit: on client and producer spans, OpenTracing's `peer.hostname`,
`peer.ipv4`/`peer.ipv6` and `peer.port` also give `server.address` and `server.port` when
those are absent, since that is where the call went."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from .otlp import ERROR, KIND, STATUS, RequestBuilder, as_int, hex_id, micros, set_typed
from .source import PROTOBUF, BadCapture, Payload, load_json

_PEER = ("peer.hostname", "peer.ipv4", "peer.ipv6", "peer.port")
_SERVER = ("server.address", "net.peer.name", "server.port", "net.peer.port")
_REF_TYPES = {"CHILD_OF": "child_of", "FOLLOWS_FROM": "follows_from"}


class _Bad(ValueError):
    pass


def payloads(stream, batch_spans: int) -> Iterator[Payload]:
    doc = load_json(stream)
    traces = _traces(doc)
    builder, first = RequestBuilder(), 0
    for ti, trace in enumerate(traces):
        try:
            _add_trace(builder, trace)
        except _Bad as e:
            # what came before this trace is fine: hand it over, then stop here
            if ti > first:
                again = RequestBuilder()
                for trace_before in traces[first:ti]:
                    _add_trace(again, trace_before)
                yield Payload(again.body(), PROTOBUF, _span_of(first, ti - 1))
            raise BadCapture(f"data[{ti}]{e.args[1]}", e.args[0]) from None
        if builder.spans >= batch_spans:
            yield Payload(builder.body(), PROTOBUF, _span_of(first, ti))
            builder, first = RequestBuilder(), ti + 1
    if builder.spans:
        yield Payload(builder.body(), PROTOBUF, _span_of(first, len(traces) - 1))


def _span_of(first: int, last: int) -> str:
    return f"data[{first}]" if first == last else f"data[{first}..{last}]"


def _traces(doc) -> list:
    if isinstance(doc, dict) and "data" in doc:
        traces = doc["data"]
        if traces is None:  # the query API's answer when nothing matched
            return []
        if not isinstance(traces, list):
            raise BadCapture("data", f"must be a list of traces, not {type(traces).__name__}")
        return traces
    if isinstance(doc, dict) and "spans" in doc:  # one trace on its own
        return [doc]
    if isinstance(doc, list) and all(isinstance(t, dict) and "spans" in t for t in doc):
        return doc
    raise BadCapture("top level", 'not Jaeger JSON: expected {"data": [traces]} or one trace object')


def _add_trace(builder: RequestBuilder, trace) -> None:
    if not isinstance(trace, dict):
        raise _Bad(f"a trace must be an object, not {type(trace).__name__}", "")
    spans = trace.get("spans")
    if not isinstance(spans, list):
        raise _Bad(f"spans must be a list, not {type(spans).__name__}", "")
    processes = trace.get("processes") or {}
    if not isinstance(processes, dict):
        raise _Bad("processes must be an object", "")
    trace_id = trace.get("traceID")
    resources: dict = {}
    for si, span in enumerate(spans):
        try:
            _add_span(builder, span, trace_id, processes, resources)
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            tid = trace_id if isinstance(trace_id, str) else "?"
            raise _Bad(_message(e), f" (trace {tid:.32}) spans[{si}]") from None
    builder.spans += len(spans)


def _message(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"{e.args[0]} is missing"
    if isinstance(e, AttributeError):
        return "an object was expected"
    return str(e)


def _resource(proc_id, span, processes, resources):
    """(key, fill) for the span's process, once per process id in a trace."""
    got = resources.get(proc_id)
    if got is not None and "process" not in span:
        return got
    proc = span.get("process") or processes.get(proc_id)
    if not isinstance(proc, dict):
        raise ValueError(f"processID {proc_id!r:.40} is not in the trace's processes")
    service = proc.get("serviceName")
    if not isinstance(service, str):
        raise ValueError("the process has no serviceName")
    tags = proc.get("tags") or []
    if not isinstance(tags, list):
        raise ValueError("the process's tags must be a list")
    key = (service, tuple((t.get("key"), t.get("type"), repr(t.get("value"))) for t in tags))

    def fill(resource):
        resource.attributes.add(key="service.name").value.string_value = service
        for t in tags:
            if t.get("key") != "service.name":
                set_typed(
                    resource.attributes.add(key=t["key"]).value, t.get("type"), t.get("value"), t["key"]
                )

    got = resources[proc_id] = (key, fill)
    return got


def _add_span(builder: RequestBuilder, s: dict, trace_id, processes, resources) -> None:
    key, fill = _resource(s.get("processID"), s, processes, resources)
    tags = s.get("tags") or ()
    scope = ("", "")
    kind = 0
    status = message = None
    error = False
    peer = server = None
    plain = []
    for t in tags:
        k = t["key"]
        if k == "span.kind":
            kind = KIND.get(str(t.get("value")).lower(), 0)
            if kind:
                continue
        elif k == "error":
            error = t.get("value") in (True, "true")
            continue
        elif k == "otel.status_code":
            status = STATUS.get(str(t.get("value")).lower())
            continue
        elif k == "otel.status_description":
            message = str(t.get("value"))
            continue
        elif k in ("otel.scope.name", "otel.library.name"):
            scope = (str(t.get("value")), scope[1])
            continue
        elif k in ("otel.scope.version", "otel.library.version"):
            scope = (scope[0], str(t.get("value")))
            continue
        elif k in _PEER:
            peer = peer or {}
            peer[k] = t.get("value")
        elif k in _SERVER:
            server = True
        plain.append(t)

    out = builder.scope_spans(key, fill, scope).spans.add()
    out.trace_id = tid = hex_id(s.get("traceID", trace_id), 32, "traceID")
    out.span_id = hex_id(s["spanID"], 16, "spanID")
    name = s.get("operationName", "")
    if not isinstance(name, str):
        raise ValueError(f"operationName must be a string, not {name!r:.40}")
    out.name = name
    out.kind = kind
    start = micros(s["startTime"], "startTime")
    out.start_time_unix_nano = start
    out.end_time_unix_nano = start + micros(s.get("duration", 0), "duration")
    if as_int(s.get("flags", 1) or 0, "flags") & 1:
        out.flags = 1  # sampled

    attrs = out.attributes
    for t in plain:
        v = t.get("value")
        if t.get("type") == "string" and isinstance(v, str):
            attrs.add(key=t["key"]).value.string_value = v
        else:
            set_typed(attrs.add(key=t["key"]).value, t.get("type"), v, f"tag {t['key']!r:.40}")
    if peer and not server and kind in (3, 4):  # client, producer
        _server_from_peer(attrs, peer)
    if status is not None or error:
        out.status.code = status if status is not None else ERROR
        if message:
            out.status.message = message

    parent = None
    for ri, ref in enumerate(s.get("references") or ()):
        ref_tid = hex_id(ref.get("traceID", trace_id), 32, f"references[{ri}].traceID")
        ref_sid = hex_id(ref["spanID"], 16, f"references[{ri}].spanID")
        ref_type = ref.get("refType", "CHILD_OF")
        if parent is None and ref_type == "CHILD_OF" and ref_tid == tid:
            parent = out.parent_span_id = ref_sid
            continue
        link = out.links.add(trace_id=ref_tid, span_id=ref_sid)
        link.attributes.add(key="opentracing.ref_type").value.string_value = _REF_TYPES.get(
            ref_type, str(ref_type).lower()
        )
    if parent is None and s.get("parentSpanID") not in (None, "", "0", "0000000000000000"):
        out.parent_span_id = hex_id(s["parentSpanID"], 16, "parentSpanID")

    for li, log in enumerate(s.get("logs") or ()):
        ev = out.events.add()
        ev.time_unix_nano = micros(log["timestamp"], f"logs[{li}].timestamp")
        for f in log.get("fields") or ():
            if f["key"] == "event" and not ev.name:
                ev.name = str(f.get("value"))
            else:
                set_typed(ev.attributes.add(key=f["key"]).value, f.get("type"), f.get("value"), f["key"])


def _server_from_peer(attrs, peer: dict) -> None:
    host = peer.get("peer.hostname") or peer.get("peer.ipv4") or peer.get("peer.ipv6")
    if isinstance(host, int) and not isinstance(host, bool):  # OpenTracing allows peer.ipv4 as uint32
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            host = None
    if isinstance(host, str) and host:
        attrs.add(key="server.address").value.string_value = host
    port = peer.get("peer.port")
    try:
        port = int(port) if port is not None else None
    except (TypeError, ValueError):
        port = None
    if port is not None and 0 < port < 65536:
        attrs.add(key="server.port").value.int_value = port
