"""Audit accuracy on public captures of real systems: cut a share of the cross-service hops at
random (keeping the truth: the cut span's real parent), import, audit, score.

    python -m bench.realdata PATH... [--format trastrainer-csv|jaeger] [--shape as-is|raw|kinds|attrs]
                             [--cut 0.3] [--seed 1] [--compress 5] [--drop-parents 0.2]
                             [--max-traces N] [--min-confidence 0.5] [--keep DIR] [--json OUT]

PATH: files, directories (every *.csv / *.json inside) or globs. How to fetch the public captures
and what each holds: docs/accuracy.md, "Real captures".

A cut makes the callee-side span of a hop (a span whose parent is in another service) the root
of a new trace, together with its whole subtree; its real parent is the truth. --drop-parents
removes, for that share of the cut hops, the caller's whole fragment (as if it had not been
sampled): those orphans' right answer is to abstain. --compress F moves every request's start
F times closer to the first one (timings within a request are kept), which raises the number
of calls in flight on every hop.

Shapes (what the spans carry besides names, services, times and parent links):
- raw: nothing else, as the CSV captures hold them (no span.kind, no attributes);
- kinds: span.kind inferred from the structure (a span whose parent is in another service is
  that call's server side, a span with a child in another service its client side; "X send" /
  "X process" are producer / consumer);
- attrs: kinds, plus what the names say: gRPC full method names -> rpc.system/service/method on
  both sides, HTTP server names starting with "/" -> http.route, "HTTP GET" -> the method,
  send/process -> messaging.system and destination;
- as-is (Jaeger input only, its default): the capture's own tags.

Scores: detection (which roots are orphans), stitching (parent named == truth; abstention where
the parent was dropped), per protocol, per calls in flight on the hop at the orphan's start
(from the capture, after compression), a reliability table by confidence bin, and concrete
examples of misses and wrong links.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from audit.scenarios.score import Rate

_CTXAUDIT = str(Path(sys.executable).with_name("ctxaudit"))
_POD_SUFFIX = re.compile(r"-[0-9a-f]{6,10}-[0-9a-z]{5}$")
_GRPC_NAME = re.compile(r"^/?(?:grpc\.)?((?:[\w-]+\.)+[\w-]+)/([\w-]+)$")
_HTTP_CLIENT_NAME = re.compile(r"^HTTP (GET|POST|PUT|DELETE|PATCH|HEAD|OPTIONS)$")
_MESSAGING_NAME = re.compile(r"^(.+) (send|process|receive)$")
BUCKETS = ((1, 1), (2, 5), (6, 20), (21, 50), (51, 200), (201, 1000), (1001, 10**12))
DEFAULT_MIN_CONFIDENCE = 0.6  # `ctxaudit audit`'s default: the figures a user sees
BINS = tuple(round(0.5 + 0.1 * i, 1) for i in range(5))  # lower edges: 0.5 .. 0.9


@dataclass
class Span:
    trace_id: str  # 32 hex
    span_id: str  # 16 hex
    parent_id: str | None
    service: str
    name: str
    start_ns: int
    end_ns: int
    kind: str | None = None  # "server", "client", ... as Jaeger's span.kind tag; None: not recorded
    tags: dict = field(default_factory=dict)


# -- reading captures -------------------------------------------------------------------------


def expand(paths: list[str], suffix: str) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(str(f) for f in Path(p).rglob(f"*{suffix}"))
        else:
            out += sorted(glob.glob(p)) or [p]
    return out


def read_trastrainer_csv(files: list[str]) -> list[Span]:
    """TraStrainer's CSV: TraceID,SpanID,ParentID,PodName,OperationName,StartTimeUnixNano,
    EndTimeUnixNano,Duration; ParentID "root" for roots; the service is the pod name without
    its ReplicaSet and pod suffixes."""
    spans = []
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                parent = row["ParentID"]
                spans.append(
                    Span(
                        row["TraceID"].lower().rjust(32, "0"),
                        row["SpanID"].lower().rjust(16, "0"),
                        None if parent in ("root", "", None) else parent.lower().rjust(16, "0"),
                        _POD_SUFFIX.sub("", row["PodName"]),
                        row["OperationName"],
                        int(row["StartTimeUnixNano"]),
                        int(row["EndTimeUnixNano"]),
                    )
                )
    return spans


def read_jaeger(files: list[str]) -> list[Span]:
    """Jaeger's query API JSON ({"data": [{traceID, spans, processes}]}), times in µs."""
    spans = []
    for path in files:
        with open(path) as f:
            doc = json.load(f)
        traces = doc["data"] if isinstance(doc, dict) and "data" in doc else doc
        for trace in traces if isinstance(traces, list) else [traces]:
            processes = trace.get("processes", {})
            for s in trace["spans"]:
                parent = next(
                    (r["spanID"] for r in s.get("references") or [] if r.get("refType") == "CHILD_OF"),
                    None,
                )
                tags = {t["key"]: t.get("value") for t in s.get("tags") or []}
                kind = tags.pop("span.kind", None)
                proc = s.get("process") or processes.get(s.get("processID"), {})
                start = int(s["startTime"]) * 1000
                spans.append(
                    Span(
                        s["traceID"].lower().rjust(32, "0"),
                        s["spanID"].lower().rjust(16, "0"),
                        parent.lower().rjust(16, "0") if parent else None,
                        proc.get("serviceName", "unknown"),
                        s.get("operationName", ""),
                        start,
                        start + int(s.get("duration", 0)) * 1000,
                        kind,
                        tags,
                    )
                )
    return spans


def dedupe(spans: list[Span]) -> list[Span]:
    """One span per (trace id, span id): minute files of a capture can repeat a span."""
    seen: set[tuple[str, str]] = set()
    out = []
    for s in spans:
        if (s.trace_id, s.span_id) not in seen:
            seen.add((s.trace_id, s.span_id))
            out.append(s)
    return out


def limit_traces(spans: list[Span], n: int | None) -> list[Span]:
    """The first n traces by start time (a contiguous stretch of traffic)."""
    if not n:
        return spans
    first: dict[str, int] = {}
    for s in spans:
        first[s.trace_id] = min(first.get(s.trace_id, s.start_ns), s.start_ns)
    keep = set(sorted(first, key=first.get)[:n])
    return [s for s in spans if s.trace_id in keep]


# -- the capture's structure, inferred kinds and protocols ------------------------------------


def index(spans: list[Span]) -> dict[tuple[str, str], Span]:
    return {(s.trace_id, s.span_id): s for s in spans}


def hop_protocol(caller: Span, callee: Span) -> str:
    """The protocol of a call as its names say (for grouping the scores, whatever the shape)."""
    for s in (callee, caller):
        if s.tags.get("messaging.system") or _MESSAGING_NAME.match(s.name):
            return "messaging"
        if s.tags.get("rpc.system") == "grpc" or _GRPC_NAME.match(s.name):
            return "grpc"
        if s.tags.get("rpc.system"):
            return "rpc"
    if any(k.startswith("http.") or k.startswith("url.") for k in {**caller.tags, **callee.tags}):
        return "http"
    if callee.name.startswith("/") or _HTTP_CLIENT_NAME.match(caller.name):
        return "http"
    return "unknown"


def reshape(spans: list[Span], by_key: dict, shape: str) -> None:
    """Set kinds and attributes for the shape, on the whole capture (before any cut: they are
    what each side's instrumentation knows about its own span)."""
    if shape == "as-is":
        return
    remote_parent, remote_child = set(), set()
    for s in spans:
        p = by_key.get((s.trace_id, s.parent_id)) if s.parent_id else None
        if p is not None and p.service != s.service:
            remote_parent.add((s.trace_id, s.span_id))
            remote_child.add((p.trace_id, p.span_id))
    for s in spans:
        s.kind, s.tags = None, {}
        if shape == "raw":
            continue
        key = (s.trace_id, s.span_id)
        m = _MESSAGING_NAME.match(s.name)
        if m and m.group(2) == "send":
            s.kind = "producer"
        elif m:
            s.kind = "consumer"
        elif key in remote_parent or s.parent_id is None:
            s.kind = "server"
        elif key in remote_child:
            s.kind = "client"
        else:
            s.kind = "internal"
        if shape != "attrs":
            continue
        g = _GRPC_NAME.match(s.name)
        if m:
            s.tags = {"messaging.system": "rabbitmq", "messaging.destination.name": m.group(1)}
        elif g and s.kind in ("server", "client"):
            s.tags = {"rpc.system": "grpc", "rpc.service": g.group(1), "rpc.method": g.group(2)}
        elif s.kind == "server" and s.name.startswith("/"):
            s.tags = {"http.route": s.name}
        elif s.kind == "client" and _HTTP_CLIENT_NAME.match(s.name):
            s.tags = {"http.request.method": s.name.split()[1]}


def compress(spans: list[Span], factor: float) -> None:
    """Move each trace's start `factor` times closer to the first trace's; keep its inner timings."""
    if factor == 1:
        return
    first: dict[str, int] = {}
    for s in spans:
        first[s.trace_id] = min(first.get(s.trace_id, s.start_ns), s.start_ns)
    t0 = min(first.values())
    for s in spans:
        shift = int((first[s.trace_id] - t0) * (1 - 1 / factor))
        s.start_ns -= shift
        s.end_ns -= shift


# -- cutting hops -------------------------------------------------------------------------------


@dataclass
class Orphan:
    key: tuple[str, str]  # (trace id, span id) after the cut
    parent: tuple[str, str]  # its real parent, after the cut (the parent may itself have moved)
    caller: str
    callee: str
    protocol: str
    in_flight: int
    parent_stored: bool = True


def cut(spans: list[Span], by_key: dict, share: float, drop_share: float, rng: random.Random) -> list[Orphan]:
    """Cut `share` of the cross-service hops; return the truth. Rewrites trace ids in place and
    removes dropped fragments from `spans`."""
    hops = [
        s
        for s in spans
        if s.parent_id and (p := by_key.get((s.trace_id, s.parent_id))) is not None and p.service != s.service
    ]
    in_flight = _in_flight(hops, by_key)
    chosen = {id(s) for s in hops if rng.random() < share}
    children: dict[tuple[str, str], list[Span]] = defaultdict(list)
    roots = []
    for s in spans:
        if s.parent_id and (s.trace_id, s.parent_id) in by_key:
            children[(s.trace_id, s.parent_id)].append(s)
        else:
            roots.append(s)
    new_trace: dict[int, str] = {}
    truth: list[tuple[Span, Span]] = []
    stack = [(r, r.trace_id) for r in roots]
    while stack:  # every span's trace id after the cuts: a cut span starts a new one
        s, trace = stack.pop()
        if id(s) in chosen:
            trace = f"{rng.getrandbits(128):032x}"
            truth.append((s, by_key[(s.trace_id, s.parent_id)]))
        new_trace[id(s)] = trace
        stack.extend((c, trace) for c in children[(s.trace_id, s.span_id)])
    dropped: set[str] = set()
    if drop_share:  # whole caller fragments, until about that share of the cut hops lost their caller
        parents_in: Counter = Counter(new_trace[id(p)] for _, p in truth)
        fragments = sorted(parents_in)
        rng.shuffle(fragments)
        lost = 0
        for fragment in fragments:
            if lost >= drop_share * len(truth):
                break
            dropped.add(fragment)
            lost += parents_in[fragment]
    orphans = []
    for s, p in truth:
        if new_trace[id(s)] in dropped:
            continue  # the orphan itself sat in a dropped fragment: never exported
        orphans.append(
            Orphan(
                (new_trace[id(s)], s.span_id),
                (new_trace[id(p)], p.span_id),
                p.service,
                s.service,
                hop_protocol(p, s),
                in_flight[id(s)],
                new_trace[id(p)] not in dropped,
            )
        )
    cut_ids = {id(s) for s, _ in truth}
    kept = []
    for s in spans:
        if new_trace[id(s)] in dropped:
            continue
        s.trace_id = new_trace[id(s)]
        if id(s) in cut_ids:
            s.parent_id = None
        kept.append(s)
    spans[:] = kept
    return orphans


def _in_flight(hops: list[Span], by_key: dict) -> dict[int, int]:
    """For each call, the calls on the same hop (caller service -> callee service) in flight at
    its start: distinct caller-side spans (the exit span, or the caller's own span when it has no
    client span) that are running then, its own included. These are the candidates a matcher
    working from timing alone has to tell apart."""
    per_hop: dict[tuple[str, str], dict[int, Span]] = defaultdict(dict)
    for s in hops:
        p = by_key[(s.trace_id, s.parent_id)]
        per_hop[(p.service, s.service)][id(p)] = p
    out = {}
    for s in hops:
        p = by_key[(s.trace_id, s.parent_id)]
        out[id(s)] = (p.service, s.service)
    counts = {}
    for hop, parents in per_hop.items():
        starts = sorted(p.start_ns for p in parents.values())
        ends = sorted(max(p.end_ns, p.start_ns + 1) for p in parents.values())
        counts[hop] = (starts, ends)
    for s in hops:
        starts, ends = counts[out[id(s)]]
        t = s.start_ns
        out[id(s)] = max(1, bisect.bisect_right(starts, t) - bisect.bisect_right(ends, t))
    return out


# -- writing, importing, auditing -------------------------------------------------------------


def write_jaeger(spans: list[Span], path: str, traces_per_file: int = 2000) -> list[str]:
    """Jaeger query API JSON, one file per `traces_per_file` traces; returns the files."""
    by_trace: dict[str, list[Span]] = defaultdict(list)
    for s in spans:
        by_trace[s.trace_id].append(s)
    ids = sorted(by_trace, key=lambda t: min(s.start_ns for s in by_trace[t]))
    files = []
    for i in range(0, len(ids), traces_per_file):
        data = []
        for t in ids[i : i + traces_per_file]:
            procs: dict[str, str] = {}
            out = []
            for s in by_trace[t]:
                pid = procs.setdefault(s.service, f"p{len(procs) + 1}")
                tags = [{"key": "span.kind", "type": "string", "value": s.kind}] if s.kind else []
                tags += [{"key": k, "type": "string", "value": str(v)} for k, v in s.tags.items()]
                refs = [{"refType": "CHILD_OF", "traceID": t, "spanID": s.parent_id}] if s.parent_id else []
                start_us = s.start_ns // 1000
                out.append(
                    {
                        "traceID": t,
                        "spanID": s.span_id,
                        "operationName": s.name,
                        "references": refs,
                        "startTime": start_us,
                        "duration": max(0, -(-s.end_ns // 1000) - start_us),
                        "tags": tags,
                        "logs": [],
                        "processID": pid,
                    }
                )
            data.append(
                {"traceID": t, "spans": out, "processes": {p: {"serviceName": n} for n, p in procs.items()}}
            )
        name = os.path.join(path, f"capture-{i // traces_per_file:05d}.json")
        with open(name, "w") as f:
            json.dump({"data": data}, f)
        files.append(name)
    return files


def import_capture(db: str, files: list[str]) -> str:
    """Store Jaeger JSON files in `db`: with `ctxaudit import` when this build has it, else
    through the receivers' conversion (DbSink) after a plain Jaeger -> OTLP mapping."""
    probe = subprocess.run([_CTXAUDIT, "import", "--help"], capture_output=True)
    if probe.returncode == 0:
        subprocess.run([_CTXAUDIT, "import", "--db", db, "--format", "jaeger", *files], check=True)
        return "ctxaudit import"
    _import_via_sink(db, files)
    return "DbSink (ctxaudit import not available)"


_KINDS = {"internal": 1, "server": 2, "client": 3, "producer": 4, "consumer": 5}


def _import_via_sink(db: str, files: list[str]) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from audit.cli import DbSink

    sink = DbSink(db)
    try:
        for path in files:
            with open(path) as f:
                data = json.load(f)["data"]
            for i in range(0, len(data), 200):
                req = ExportTraceServiceRequest()
                rs_of: dict[str, object] = {}
                for trace in data[i : i + 200]:
                    for s in trace["spans"]:
                        service = trace["processes"][s["processID"]]["serviceName"]
                        if service not in rs_of:
                            rs = req.resource_spans.add()
                            a = rs.resource.attributes.add()
                            a.key, a.value.string_value = "service.name", service
                            rs_of[service] = rs.scope_spans.add()
                        o = rs_of[service].spans.add()
                        o.trace_id = bytes.fromhex(s["traceID"])
                        o.span_id = bytes.fromhex(s["spanID"])
                        if s["references"]:
                            o.parent_span_id = bytes.fromhex(s["references"][0]["spanID"])
                        o.name = s["operationName"]
                        o.start_time_unix_nano = s["startTime"] * 1000
                        o.end_time_unix_nano = (s["startTime"] + s["duration"]) * 1000
                        for t in s["tags"]:
                            if t["key"] == "span.kind":
                                o.kind = _KINDS.get(t["value"], 0)
                            else:
                                a = o.attributes.add()
                                a.key, a.value.string_value = t["key"], str(t["value"])
                sink.send(req.SerializeToString())
    finally:
        sink.close()


def run_audit(db: str, min_confidence: float, memory_limit: str, out: str) -> dict:
    cmd = [_CTXAUDIT, "audit", "--db", db, "--all", "--settle", "0", "--json"]
    cmd += ["--min-confidence", str(min_confidence), "--memory-limit", memory_limit, "--no-save"]
    with open(out, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"audit failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    with open(out) as f:
        return json.load(f)


# -- scoring --------------------------------------------------------------------------------------


@dataclass
class Group:
    orphans: int = 0
    detected: int = 0
    precision: Rate = field(default_factory=Rate)
    recall: Rate = field(default_factory=Rate)
    abstention: Rate = field(default_factory=Rate)

    def row(self) -> dict:
        return {
            "orphans": self.orphans,
            "detection_recall": self.detected / self.orphans if self.orphans else None,
            "stitch_precision": self.precision.value,
            "links": self.precision.total,
            "stitch_recall": self.recall.value,
            "parent_stored": self.recall.total,
            "abstention": self.abstention.value,
            "parent_not_stored": self.abstention.total,
        }


def bucket(n: int) -> str:
    for lo, hi in BUCKETS:
        if lo <= n <= hi:
            return f"{lo}" if lo == hi else (f"{lo}-{hi}" if hi < 10**12 else f">{lo - 1}")
    return "?"


def score(orphans: list[Orphan], result: dict, by_key: dict, capture_roots: set) -> dict:
    findings = {
        (f["trace_id"], f["span_id"]): f
        for f in result["findings"]
        if f["kind"] in ("orphan_root", "in_process_break")
    }
    truth = {o.key: o for o in orphans}
    found = set(findings)
    detection = {
        "precision": Rate(len(found & truth.keys()), len(found)).value,
        "recall": Rate(len(found & truth.keys()), len(truth)).value,
        "orphans": len(truth),
        "findings": len(found),
        "false_on_capture_roots": len(found & capture_roots),
        "false_other": len(found - truth.keys() - capture_roots),
        "kinds_on_orphans": dict(Counter(findings[k]["kind"] for k in found & truth.keys())),
    }
    groups: dict[str, dict[str, Group]] = {"all": defaultdict(Group), "protocol": defaultdict(Group)}
    groups |= {"in_flight": defaultdict(Group), "hop": defaultdict(Group)}
    bins = {b: Rate() for b in BINS}
    examples: dict[str, list] = {"missed": [], "wrong": [], "abstained": [], "false": []}
    for key, o in truth.items():
        f = findings.get(key)
        named = f and f.get("probable_parent")
        right = bool(named) and (named["trace_id"], named["span_id"]) == o.parent
        labels = {
            "all": "all",
            "protocol": o.protocol,
            "in_flight": bucket(o.in_flight),
            "hop": f"{o.caller} -> {o.callee}",
        }
        for g, label in labels.items():
            _tally(groups[g][label], f is not None, named, right, o.parent_stored)
        named_at_default = named if named and named["confidence"] >= DEFAULT_MIN_CONFIDENCE else None
        _tally(
            groups["all"]["at default confidence"], f is not None, named_at_default, right, o.parent_stored
        )
        if named:
            b = max(x for x in BINS if x <= max(0.5, min(named["confidence"], 0.999)))
            bins[b].total += 1
            bins[b].hits += right
        if f is None:
            _example(examples["missed"], o, by_key, None)
        elif named and not right:
            _example(examples["wrong"], o, by_key, named)
        elif not named and o.parent_stored:
            _example(examples["abstained"], o, by_key, None, f)
    for key in found - truth.keys():  # findings on spans that were not cut
        f = findings[key]
        named = f.get("probable_parent")
        if named:
            groups["all"]["all"].precision.total += 1
            if named["confidence"] >= DEFAULT_MIN_CONFIDENCE:
                groups["all"]["at default confidence"].precision.total += 1
            b = max(x for x in BINS if x <= max(0.5, min(named["confidence"], 0.999)))
            bins[b].total += 1
        if len(examples["false"]) < 5:
            examples["false"].append({k: f.get(k) for k in ("service", "span_name", "span_kind", "cause")})
    return {
        "detection": detection,
        "stitching": {g: {k: v.row() for k, v in sorted(d.items())} for g, d in groups.items()},
        "reliability": [
            {"bin": f"{b:.1f}-{b + 0.1:.1f}", "links": r.total, "precision": r.value} for b, r in bins.items()
        ],
        "examples": examples,
    }


def _tally(s: Group, detected: bool, named: dict | None, right: bool, parent_stored: bool) -> None:
    s.orphans += 1
    s.detected += detected
    if named:
        s.precision.total += 1
        s.precision.hits += right
    if parent_stored:
        s.recall.total += 1
        s.recall.hits += bool(named) and right
    else:
        s.abstention.total += 1
        s.abstention.hits += not named


def _example(out: list, o: Orphan, by_key: dict, named: dict | None, finding: dict | None = None) -> None:
    if len(out) >= 5:
        return
    s, p = by_key.get(o.key), by_key.get(o.parent)
    ex = {
        "orphan": {"service": s.service, "name": s.name, "kind": s.kind, "tags": s.tags} if s else None,
        "true_parent": {"service": p.service, "name": p.name, "kind": p.kind} if p else None,
        "in_flight": o.in_flight,
    }
    if named:
        n = by_key.get((named["trace_id"], named["span_id"]))
        ex["named"] = {
            "service": named["service"],
            "name": n.name if n else None,
            "kind": n.kind if n else None,
            "confidence": named["confidence"],
            "same_trace_as_truth": named["trace_id"] == o.parent[0],
            "starts_us_after_orphan": (n.start_ns - s.start_ns) / 1000 if n and s else None,
            "true_parent_starts_us_after_orphan": (p.start_ns - s.start_ns) / 1000 if p and s else None,
        }
    if finding:
        ex["evidence"] = finding.get("evidence")
    out.append(ex)


# -- report ---------------------------------------------------------------------------------------


def _f(x) -> str:
    return "  n/a" if x is None else f"{x:.3f}"


def report(label: str, info: dict, s: dict) -> None:
    d = s["detection"]
    print(f"\n== {label}")
    print("   " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(
        f"   detection: precision {_f(d['precision'])} recall {_f(d['recall'])} "
        f"({d['findings']:,} findings, {d['orphans']:,} orphans; false: {d['false_on_capture_roots']:,} on "
        f"the capture's own roots, {d['false_other']:,} other; kinds on orphans {d['kinds_on_orphans']})"
    )
    for g in ("all", "protocol", "in_flight", "hop"):
        for label_, r in s["stitching"][g].items():
            print(
                f"   {g:<9} {label_:<48} orphans {r['orphans']:>7,} detected {_f(r['detection_recall'])} "
                f"stitch P {_f(r['stitch_precision'])} ({r['links']:,}) R {_f(r['stitch_recall'])} "
                f"({r['parent_stored']:,}) abstain {_f(r['abstention'])} ({r['parent_not_stored']:,})"
            )
    print(
        "   reliability: "
        + "; ".join(f"{r['bin']} {_f(r['precision'])} ({r['links']:,})" for r in s["reliability"])
    )
    for kind, exs in s["examples"].items():
        for ex in exs[:3]:
            print(f"   example {kind}: {json.dumps(ex, default=str)[:400]}")


def _engine_version() -> str:
    """The commit the audit ran at, and whether audit/engine had changes not committed yet."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "audit/engine"], capture_output=True, text=True
    ).stdout
    return head.strip() + (" + uncommitted engine changes" if dirty.strip() else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--format", choices=("trastrainer-csv", "jaeger"), default="trastrainer-csv")
    ap.add_argument("--shape", choices=("as-is", "raw", "kinds", "attrs"))
    ap.add_argument("--cut", type=float, default=0.3, help="share of cross-service hops to cut")
    ap.add_argument(
        "--drop-parents", type=float, default=0.0, help="share of cut hops whose caller is dropped"
    )
    ap.add_argument("--compress", type=float, default=1.0, help="bring request starts F times closer")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-traces", type=int, help="the first N traces by start time")
    ap.add_argument("--min-confidence", type=float, default=0.5)
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--keep", help="keep the Jaeger files, the store and the audit document here")
    ap.add_argument("--label", help="a name for the data set in the report")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    shape = args.shape or ("as-is" if args.format == "jaeger" else "raw")
    rng = random.Random(args.seed)
    t = time.perf_counter()
    if args.format == "jaeger":
        spans = read_jaeger(expand(args.paths, ".json"))
    else:
        spans = read_trastrainer_csv(expand(args.paths, ".csv"))
    spans = limit_traces(dedupe(spans), args.max_traces)
    by_key = index(spans)
    capture_roots_before = {(s.trace_id, s.span_id) for s in spans if s.parent_id is None}
    n_traces = len({s.trace_id for s in spans})
    services = len({s.service for s in spans})
    reshape(spans, by_key, shape)
    compress(spans, args.compress)
    orphans = cut(spans, by_key, args.cut, args.drop_parents, rng)
    moved = {(s.trace_id, s.span_id): s for s in spans}  # keys after the cut
    capture_roots = {k for k in moved if (k[0], k[1]) in capture_roots_before}
    work = args.keep or tempfile.mkdtemp(prefix="realdata-")
    os.makedirs(work, exist_ok=True)
    db = os.path.join(work, "store.duckdb")
    for p in (db, db + ".wal"):
        if os.path.exists(p):
            os.remove(p)
    files = write_jaeger(spans, work)
    prep = time.perf_counter() - t
    t = time.perf_counter()
    how = import_capture(db, files)
    imported = time.perf_counter() - t
    t = time.perf_counter()
    result = run_audit(db, args.min_confidence, args.memory_limit, os.path.join(work, "audit.json"))
    audited = time.perf_counter() - t
    summary = score(orphans, result, moved, capture_roots)
    info = {
        "spans": f"{len(spans):,}",
        "traces before cuts": f"{n_traces:,}",
        "services": services,
        "shape": shape,
        "cut": args.cut,
        "drop_parents": args.drop_parents,
        "compress": args.compress,
        "seed": args.seed,
        "import": how,
        "seconds (prepare/import/audit)": f"{prep:.0f}/{imported:.0f}/{audited:.0f}",
        "engine": _engine_version(),
    }
    report(args.label or ", ".join(args.paths), info, summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, **summary}, f, indent=1, default=str)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
