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
import json
import re
from collections.abc import Iterator

from .otlp import ERROR, KIND, STATUS, RequestBuilder, SpanAttributes, as_int, hex_id, micros, set_typed
from .source import PROTOBUF, BadCapture, Payload

_PEER = ("peer.hostname", "peer.ipv4", "peer.ipv6", "peer.port")
_SERVER = ("server.address", "net.peer.name", "server.port", "net.peer.port")
_REF_TYPES = {"CHILD_OF": "child_of", "FOLLOWS_FROM": "follows_from"}


class _Bad(ValueError):
    pass


def payloads(stream, batch_spans: int) -> Iterator[Payload]:
    cache = SpanAttributes()
    builder, first, batch = RequestBuilder(cache), 0, []
    traces = _traces(stream)
    ti = -1
    while True:
        try:
            trace = next(traces)
        except StopIteration:
            break
        except BadCapture:  # not valid JSON from here on: the whole traces before are fine
            if builder.spans:
                yield Payload(builder.body(), PROTOBUF, _span_of(first, ti))
            raise
        ti += 1
        try:
            _add_trace(builder, trace)
        except _Bad as e:
            if batch:  # the traces before this one are whole: hand them over, then stop here
                again = RequestBuilder(cache)
                for trace_before in batch:
                    _add_trace(again, trace_before)
                yield Payload(again.body(), PROTOBUF, _span_of(first, ti - 1))
            raise BadCapture(f"data[{ti}]{e.args[1]}", e.args[0]) from None
        batch.append(trace)
        if builder.spans >= batch_spans:
            yield Payload(builder.body(), PROTOBUF, _span_of(first, ti))
            builder, first, batch = RequestBuilder(cache), ti + 1, []
    if builder.spans:
        yield Payload(builder.body(), PROTOBUF, _span_of(first, ti))


def _span_of(first: int, last: int) -> str:
    return f"data[{first}]" if first == last else f"data[{first}..{last}]"


_DATA = re.compile(r'\s*\{\s*"data"\s*:\s*\[')
_SPACE = re.compile(r"\s*")


def _traces(stream) -> Iterator:
    """The traces of `{"data": [...]}` one at a time (memory: the text, and one trace as objects),
    or those of any other shape the whole document at once."""
    raw = stream.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadCapture(f"byte {e.start}", "not valid UTF-8 text") from None
    del raw
    m = _DATA.match(text)
    if m is None:
        yield from _whole(text)
        return
    decoder = json.JSONDecoder()
    pos = _SPACE.match(text, m.end()).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            trace, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise BadCapture(f"line {e.lineno} column {e.colno}", f"not valid JSON ({e.msg})") from None
        except RecursionError:
            raise BadCapture("", "not valid JSON (nested too deeply)") from None
        yield trace
        pos = _SPACE.match(text, pos).end()
        sep = text[pos : pos + 1]
        if sep == "]":
            return  # what follows the list (total, limit, errors...) is the API's paging: not read
        if sep != ",":
            lineno = text.count("\n", 0, pos) + 1
            colno = pos - text.rfind("\n", 0, pos)
            found = repr(sep) if sep else "the end of the file"
            raise BadCapture(
                f"line {lineno} column {colno}", f"not valid JSON (expected ',' or ']', found {found})"
            )
        pos = _SPACE.match(text, pos + 1).end()


def _whole(text: str) -> list:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadCapture(f"line {e.lineno} column {e.colno}", f"not valid JSON ({e.msg})") from None
    except RecursionError:
        raise BadCapture("", "not valid JSON (nested too deeply)") from None
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
    ids = _Ids()
    for si, span in enumerate(spans):
        try:
            _add_span(builder, span, trace_id, processes, resources, ids)
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


_SPECIAL = frozenset(
    (
        "span.kind",
        "error",
        "otel.status_code",
        "otel.status_description",
        "otel.scope.name",
        "otel.library.name",
        "otel.scope.version",
        "otel.library.version",
        *_PEER,
        *_SERVER,
    )
)


class _Ids(dict):
    """Hex id -> bytes, per trace: a trace's id, and a span's id again in its children's references."""

    def trace(self, value, what: str) -> bytes:
        raw = self.get(value)
        if raw is None:
            raw = self[value] = hex_id(value, 32, what)
        return raw

    def span(self, value, what: str) -> bytes:
        raw = self.get(("s", value))
        if raw is None:
            raw = self[("s", value)] = hex_id(value, 16, what)
        return raw


def _time(value, what: str) -> int:
    if type(value) is int and value >= 0:  # the usual case, checked first
        return value * 1000
    return micros(value, what)


def _add_span(builder: RequestBuilder, s: dict, trace_id, processes, resources, ids: _Ids) -> None:
    key, fill = _resource(s.get("processID"), s, processes, resources)
    tags = s.get("tags") or ()
    scope = ("", "")
    kind = 0
    status = message = None
    error = False
    peer = server = None
    special = None
    for t in tags:
        if t["key"] in _SPECIAL:
            special = True
            break
    if special:  # the tags the mapping reads; the rest are attributes as they are
        plain = []
        for t in tags:
            k = t["key"]
            if k not in _SPECIAL:
                plain.append(t)
            elif k == "span.kind":
                kind = KIND.get(str(t.get("value")).lower(), 0)
                if not kind:
                    plain.append(t)
            elif k == "error":
                error = t.get("value") in (True, "true")
            elif k == "otel.status_code":
                status = STATUS.get(str(t.get("value")).lower())
            elif k == "otel.status_description":
                message = str(t.get("value"))
            elif k in ("otel.scope.name", "otel.library.name"):
                scope = (str(t.get("value")), scope[1])
            elif k in ("otel.scope.version", "otel.library.version"):
                scope = (scope[0], str(t.get("value")))
            elif k in _PEER:
                peer = peer or {}
                peer[k] = t.get("value")
                plain.append(t)
            else:  # server.address & co.
                server = True
                plain.append(t)
        tags = plain

    out = builder.scope_spans(key, fill, scope).spans.add()
    out.trace_id = tid = ids.trace(s.get("traceID", trace_id), "traceID")
    out.span_id = ids.span(s["spanID"], "spanID")
    name = s.get("operationName", "")
    if type(name) is not str:
        raise ValueError(f"operationName must be a string, not {name!r:.40}")
    out.name = name
    out.kind = kind
    start = _time(s["startTime"], "startTime")
    out.start_time_unix_nano = start
    out.end_time_unix_nano = start + _time(s.get("duration", 0), "duration")
    flags = s.get("flags", 1)
    if flags == 1 or flags and as_int(flags, "flags") & 1:
        out.flags = 1  # sampled

    entry = builder.attributes.entry
    out.MergeFromString(b"".join([entry(t["key"], t.get("type"), t.get("value")) for t in tags]))
    attrs = out.attributes
    if peer and not server and kind in (3, 4):  # client, producer
        _server_from_peer(attrs, peer)
    if status is not None or error:
        out.status.code = status if status is not None else ERROR
        if message:
            out.status.message = message

    parent = None
    refs = s.get("references")
    if refs:
        for ri, ref in enumerate(refs):
            ref_tid = ids.trace(ref.get("traceID", trace_id), f"references[{ri}].traceID")
            ref_sid = ids.span(ref["spanID"], f"references[{ri}].spanID")
            ref_type = ref.get("refType", "CHILD_OF")
            if parent is None and ref_type == "CHILD_OF" and ref_tid == tid:
                parent = out.parent_span_id = ref_sid
                continue
            link = out.links.add(trace_id=ref_tid, span_id=ref_sid)
            link.attributes.add(key="opentracing.ref_type").value.string_value = _REF_TYPES.get(
                ref_type, str(ref_type).lower()
            )
    if parent is None and s.get("parentSpanID") not in (None, "", "0", "0000000000000000"):
        out.parent_span_id = ids.span(s["parentSpanID"], "parentSpanID")

    logs = s.get("logs")
    if logs:
        for li, log in enumerate(logs):
            ev = out.events.add()
            ev.time_unix_nano = _time(log["timestamp"], f"logs[{li}].timestamp")
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
