"""The read API `ctxaudit serve` offers on loopback: named queries with typed parameters,
answered from the server's own connection while it ingests (DuckDB lets one process write,
so readers elsewhere go through here). No arbitrary SQL, nothing that writes.

    GET  /v1/queries                      the names and their parameters
    GET  /v1/<name>?param=value...        one query's result as JSON
    GET  /v1/ingest                       how ingestion is going (spans/s, refusals, queue)
    POST /v1/audit[?findings=true]        run an audit inside the server; the result document

The one thing a request can make the server write is an audit run, which the server itself
computes and saves exactly as its scheduled audits do; spans are never touched.
Errors: 404 for an unknown name (with the known ones), 400 for a bad or missing parameter,
405 for a wrong method, 503 when the store cannot answer. The client is remote.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from ..contract.document import FINDING_KINDS, SCHEMA_VERSION, AuditResult
from ..net.access import OPEN, TOKEN_ENV, Access
from ..net.aio_host import ThreadedAioServer
from ..store.errors import StoreError
from ..store.reader import StoreReader

log = logging.getLogger(__name__)

API_VERSION = "v1"


def _hex_id(bits: int) -> Callable[[str], int]:
    digits = bits // 4

    def parse(value: str) -> int:
        if len(value) != digits or any(c not in "0123456789abcdefABCDEF" for c in value):
            raise ValueError(f"expected {digits} hex digits, got {value!r}")
        return int(value, 16)

    return parse


def _run_id(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError("run ids start at 1")
    return n


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        n = int(value)
        if not low <= n <= high:
            raise ValueError(f"must be between {low} and {high}")
        return n

    return parse


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return parse


def _name(value: str) -> str:
    if not value or len(value) > 512:
        raise ValueError("must be 1 to 512 characters")
    return value


_PROTOCOLS = ("http", "grpc", "rpc", "messaging", "db", "unknown")


@dataclass(frozen=True)
class Query:
    """A named query: the reader method it calls and its parameters (name -> (parser, required))."""

    method: str
    params: dict[str, tuple[Callable[[str], object], bool]]
    doc: str


QUERIES: dict[str, Query] = {
    "stats": Query("stats", {}, "spans, traces, services, links and the time range"),
    "store_counts": Query(
        "store_counts", {}, "spans, traces (approximate) and services: cheap on a large store"
    ),
    "time_range": Query("time_range", {}, "the first and the newest span start"),
    "protocol_summary": Query("protocol_summary", {}, "spans and roots per service, protocol and kind"),
    "trace": Query("span_rows_of_trace", {"trace_id": (_hex_id(128), True)}, "every span of one trace"),
    "links": Query(
        "links_of_span",
        {"trace_id": (_hex_id(128), True), "span_id": (_hex_id(64), True)},
        "the span links of one span",
    ),
    "audit_run": Query(
        "audit_run", {"run_id": (_run_id, False)}, "an audit run (the last by default), its edges"
    ),
    "audit_runs": Query(
        "audit_runs",
        {"limit": (_int_between(1, 10_000), False)},
        "the newest audit runs, with finding counts per kind",
    ),
    "findings": Query(
        "findings",
        {
            "run_id": (_run_id, False),
            "kind": (_one_of(FINDING_KINDS), False),
            "service": (_name, False),
            "caller": (_name, False),
            "callee": (_name, False),
            "protocol": (_one_of(_PROTOCOLS), False),
            "cause": (_name, False),
            "trace_id": (_hex_id(128), False),
            "since_ns": (_int_between(0, 2**64 - 1), False),
            "until_ns": (_int_between(0, 2**64 - 1), False),
            "limit": (_int_between(1, 10_000), False),
            "offset": (_int_between(0, 10**12), False),
        },
        "one page of a run's findings (the last run by default), filtered; since_ns/until_ns bound the span start",
    ),
}


def _to_json(value) -> object:
    return value.to_dict() if hasattr(value, "to_dict") else value


class Auditor(Protocol):
    """Runs audits inside the server (audit/server_audits.py)."""

    def parse_request(self, body: object) -> object: ...  # raises ValueError for a bad request

    def run_request(self, request: object) -> tuple[AuditResult | None, list[str]]: ...


class ReadApi:
    """Serves `reader` over HTTP on host:port (port 0 picks a free one); with `ingest_health`
    (a snapshot function) and `auditor`, also the live server's ingest figures and audits."""

    def __init__(
        self,
        reader: StoreReader,
        host: str,
        port: int,
        *,
        ingest_health: Callable[[], dict] | None = None,
        auditor: Auditor | None = None,
        access: Access = OPEN,
        threads: int = 4,
    ):
        self.reader, self.ingest_health, self.auditor, self.access = reader, ingest_health, auditor, access
        self._server = ThreadedAioServer("read-api", host, port, threads=threads)

    @property
    def url(self) -> str:
        host = self._server.host
        scheme = "https" if self.access.tls else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{self._server.port}"

    def start(self) -> str:
        app = web.Application(middlewares=[self._authenticate] if self.access.auth else [])
        app.router.add_route("*", "/{version}/{name}", self._handle)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._server.start(
            app, "the read API", ssl_context=self.access.tls.ssl_context() if self.access.tls else None
        )
        return self.url

    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        if not self.access.auth.allows(request.headers.items()):  # every path, before anything is looked at
            return _error(
                401,
                f"missing or wrong token: send Authorization: Bearer <token> (clients read ${TOKEN_ENV})",
                {"WWW-Authenticate": 'Bearer realm="ctxaudit"'},
            )
        return await handler(request)

    def stop(self) -> None:
        self._server.stop()

    async def _not_found(self, request: web.Request) -> web.Response:
        return _error(404, f"no such path {request.path!r}: use /{API_VERSION}/queries")

    async def _handle(self, request: web.Request) -> web.Response:
        version, name = request.match_info["version"], request.match_info["name"]
        if version != API_VERSION:
            return _error(404, f"unknown API version {version!r}: this server speaks {API_VERSION}")
        if name == "audit" and self.auditor:
            if request.method != "POST":
                return _error(405, "an audit is requested with POST", {"Allow": "POST"})
            return await self._audit(request)
        if request.method != "GET":
            return _error(
                405, "the read API answers GET (and POST /v1/audit): it never writes spans", {"Allow": "GET"}
            )
        if name == "queries":
            listing = {
                n: {
                    "params": {p: ("required" if req else "optional") for p, (_, req) in q.params.items()},
                    "doc": q.doc,
                }
                for n, q in QUERIES.items()
            }
            if self.ingest_health:
                listing["ingest"] = {
                    "params": {},
                    "doc": "how ingestion is going: spans/s, refusals, queue depth",
                }
            if self.auditor:
                listing["audit"] = {
                    "method": "POST",
                    "params": {"findings": "optional"},
                    "doc": "run an audit in the server (JSON body: settings, since_ns, until_ns, "
                    "all, save); the result document with a text summary",
                }
            return web.json_response(listing)
        if name == "ingest" and self.ingest_health:
            return web.json_response(self.ingest_health())
        query = QUERIES.get(name)
        if query is None:
            return _error(404, f"unknown query {name!r}; known: {', '.join(sorted(QUERIES))}")
        try:
            kwargs = _parse(query, dict(request.query))
        except ValueError as e:
            return _error(400, f"{name}: {e}")
        try:
            result = await self._server.run_blocking(lambda: getattr(self.reader, query.method)(**kwargs))
        except StoreError as e:
            return _error(503, str(e))
        except Exception:
            log.exception("read API query %s failed", name)
            return _error(500, "internal error; see the server log")
        return web.Response(text=json.dumps(_to_json(result)), content_type="application/json")

    async def _audit(self, request: web.Request) -> web.StreamResponse:
        unknown = set(request.query) - {"findings"}
        if unknown:
            return _error(400, f"audit: unknown parameter(s) {sorted(unknown)}; known: ['findings']")
        findings = request.query.get("findings", "false")
        if findings not in ("true", "false"):
            return _error(400, "audit: parameter 'findings' must be true or false")
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return _error(400, "audit: the body is not JSON")
        try:
            audit = self.auditor.parse_request(body)
        except ValueError as e:
            return _error(400, f"audit: {e}")
        try:
            result, summary = await self._server.run_blocking(self.auditor.run_request, audit)
        except StoreError as e:
            return _error(503, str(e))
        except Exception:
            log.exception("requested audit failed")
            return _error(500, "the audit failed; see the server log")
        if result is None:
            return web.json_response(
                {
                    "schema_version": SCHEMA_VERSION,
                    "run": None,
                    "edges": [],
                    "sampling": {},
                    "summary": [],
                    "findings": [],
                }
            )
        # millions of findings go out a piece at a time, rendered on the pool
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunks = result.document_chunks(findings=findings == "true", extra={"summary": summary})
        try:
            while (chunk := await self._server.run_blocking(next, chunks, None)) is not None:
                await response.write(chunk.encode())
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client went away
        except Exception:  # too late for a status: cut the response off, so the client sees it incomplete
            log.exception("rendering the audit document failed")
            request.transport.close()
            return response
        await response.write_eof()
        return response


def _parse(query: Query, given: dict[str, str]) -> dict:
    unknown = set(given) - set(query.params)
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)}; known: {sorted(query.params) or 'none'}")
    kwargs = {}
    for name, (parse, required) in query.params.items():
        if name not in given:
            if required:
                raise ValueError(f"missing parameter {name!r}")
            continue
        try:
            kwargs[name] = parse(given[name])
        except ValueError as e:
            raise ValueError(f"parameter {name!r}: {e}") from None
    return kwargs


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
