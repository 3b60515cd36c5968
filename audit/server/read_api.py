"""The read API `ctxaudit serve` offers on loopback: named queries with typed parameters,
answered from the server's own connection while it ingests (DuckDB lets one process write,
so readers elsewhere go through here). No arbitrary SQL, nothing that writes.

    GET  /v1/queries                      the names and their parameters
    GET  /v1/<name>?param=value...        one query's result as JSON
    GET  /v1/ingest                       how ingestion is going (spans/s, refusals, queue)
    GET  /metrics                         Prometheus text exposition (audit/server/metrics.py)
    POST /v1/audit[?findings=true]        run an audit inside the server; the result document
    GET  /v1/export?kind=&from_ns=&until_ns=   the rows `ctxaudit export` writes for spans or links
                                          starting in [from_ns, until_ns), as an Arrow IPC stream

The one thing a request can make the server write is an audit run, which the server itself
computes and saves exactly as its scheduled audits do; spans are never touched.
Errors: 404 for an unknown name (with the known ones), 400 for a bad or missing parameter,
405 for a wrong method, 503 when the store cannot answer. The client is audit/read/remote.py; the queries
and their parameters are declared once, in audit/contract/reader.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from aiohttp import web
from pydantic import ValidationError

from ..contract.document import SCHEMA_VERSION, AuditResult, dumps
from ..contract.reader import QUERIES, Reader, doc, query_model
from ..net.access import OPEN, TOKEN_ENV, Access
from ..net.aio_host import ThreadedAioServer
from ..net.connections import ConnectionLimits
from ..settings import explain
from ..store.errors import StoreError
from .audits import AuditBusy, AuditTooLarge, ClientGone
from .metrics import ServerMetrics

log = logging.getLogger(__name__)

API_VERSION = "v1"
BUSY_RETRY_AFTER_S = 10  # when an audit runs and another waits
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format every Prometheus reads


def _to_json(value) -> object:
    return value.to_dict() if hasattr(value, "to_dict") else value


class Auditor(Protocol):
    """Runs audits inside the server (audits.py)."""

    def parse_request(self, body: object) -> object: ...  # raises ValueError for a bad request

    def run_request(
        self, request: object, still_wanted: Callable[[], bool]
    ) -> tuple[AuditResult | None, list[str]]: ...  # AuditBusy, ClientGone, StoreError


class ReadApi:
    """Serves `reader` over HTTP on host:port (port 0 picks a free one); with `ingest_health`
    (a snapshot function) and `auditor`, also the live server's ingest figures and audits."""

    def __init__(
        self,
        reader: Reader,
        host: str,
        port: int,
        *,
        ingest_health: Callable[[], dict] | None = None,
        auditor: Auditor | None = None,
        access: Access = OPEN,
        threads: int = 4,
        limits: ConnectionLimits | None = None,
        metrics: ServerMetrics | None = None,
        metrics_public: bool = False,
        span_export: Callable[[str, int, int], Iterator[bytes]] | None = None,
    ):
        self.reader, self.ingest_health, self.auditor, self.access = reader, ingest_health, auditor, access
        self.span_export = span_export  # (kind, from_ns, until_ns) -> Arrow IPC chunks (parquet_export.py)
        # /metrics: the given collector, else one over the reader alone (the latest saved run)
        self.metrics, self.metrics_public = metrics or ServerMetrics(reader), metrics_public
        self._server = ThreadedAioServer("read-api", host, port, threads=threads, limits=limits)

    @property
    def url(self) -> str:
        host = self._server.host
        scheme = "https" if self.access.tls else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{self._server.port}"

    def start(self) -> str:
        app = web.Application(middlewares=[self._authenticate] if self.access.auth else [])
        app.router.add_route("*", "/metrics", self._metrics)
        app.router.add_route("*", "/{version}/{name}", self._handle)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._server.start(
            app, "the read API", ssl_context=self.access.tls.ssl_context() if self.access.tls else None
        )
        return self.url

    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        if self.metrics_public and request.path == "/metrics":  # serve --metrics-public
            return await handler(request)
        if not self.access.auth.allows(request.headers.items()):  # every path, before anything is looked at
            return _error(
                401,
                f"missing or wrong token: send Authorization: Bearer <token> (clients read ${TOKEN_ENV})",
                {"WWW-Authenticate": 'Bearer realm="ctxaudit"'},
            )
        return await handler(request)

    def stop(self) -> None:
        self._server.stop()

    async def _metrics(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return _error(405, "/metrics answers GET", {"Allow": "GET"})
        try:
            body = await self._server.run_blocking(self.metrics.render)
        except Exception:
            log.exception("rendering /metrics failed")
            return _error(500, "internal error; see the server log")
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

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
        if name == "export" and self.span_export and request.method == "GET":
            return await self._export(request)
        if request.method != "GET":
            return _error(
                405, "the read API answers GET (and POST /v1/audit): it never writes spans", {"Allow": "GET"}
            )
        if name == "queries":
            listing = {
                n: {
                    "params": {p: ("required" if f.is_required() else "optional") for p, f in params.items()},
                    "doc": doc(n),
                }
                for n in QUERIES
                for params in [query_model(n).model_fields]
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
            if self.span_export:
                listing["export"] = {
                    "params": {"kind": "required", "from_ns": "required", "until_ns": "required"},
                    "doc": "the rows `ctxaudit export --parquet` writes for spans or links starting in "
                    "[from_ns, until_ns), as an Arrow IPC stream",
                }
            return _json(listing)
        if name == "ingest" and self.ingest_health:
            return _json(self.ingest_health())
        if name not in QUERIES:
            return _error(404, f"unknown query {name!r}; known: {', '.join(sorted(QUERIES))}")
        model = query_model(name)
        try:
            kwargs = dict(model.model_validate(dict(request.query)))
        except ValidationError as e:
            return _error(400, f"{name}: {explain(e, model, noun='parameter')}")
        try:
            result = await self._server.run_blocking(lambda: getattr(self.reader, name)(**kwargs))
        except StoreError as e:
            return _store_error(e)
        except Exception:
            log.exception("read API query %s failed", name)
            return _error(500, "internal error; see the server log")
        return _json(_to_json(result))

    async def _export(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        unknown = set(query) - {"kind", "from_ns", "until_ns"}
        if unknown:
            return _error(
                400, f"export: unknown parameter(s) {sorted(unknown)}; known: kind, from_ns, until_ns"
            )
        try:
            kind, lo, hi = query["kind"], int(query["from_ns"]), int(query["until_ns"])
        except (KeyError, ValueError):
            return _error(400, "export: give kind (spans or links), from_ns and until_ns (integers)")
        if kind not in ("spans", "links") or not 0 <= lo < hi < 1 << 63:
            return _error(400, "export: kind is spans or links, and 0 <= from_ns < until_ns < 2^63")
        chunks = self.span_export(kind, lo, hi)
        try:
            try:  # the query runs before the first chunk: its failure can still be a status
                first = await self._server.run_blocking(next, chunks)
            except StoreError as e:
                return _store_error(e)
            except Exception:
                log.exception("export of %s failed", kind)
                return _error(500, "the export failed; see the server log")
            response = web.StreamResponse(headers={"Content-Type": "application/vnd.apache.arrow.stream"})
            await response.prepare(request)
            await response.write(first)
            try:
                while (chunk := await self._server.run_blocking(next, chunks, None)) is not None:
                    await response.write(chunk)
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception:  # too late for a status: cut it off, the client sees the stream incomplete
                log.exception("export of %s failed while streaming", kind)
                request.transport.close()
                return response
            await response.write_eof()
            return response
        finally:
            await self._server.run_blocking(chunks.close)  # its cursor closes with it

    async def _audit(self, request: web.Request) -> web.StreamResponse:
        unknown = set(request.query) - {"findings"}
        if unknown:
            return _error(400, f"audit: unknown parameter(s) {sorted(unknown)}; known: ['findings']")
        findings = request.query.get("findings", "false")
        if findings not in ("true", "false"):
            return _error(400, "audit: parameter 'findings' must be true or false")
        try:
            text = await request.text() if request.can_read_body else "{}"
            body = json.loads(text, parse_constant=_not_json)
        except (ValueError, RecursionError) as e:  # RecursionError: thousands of nested brackets
            return _error(400, f"audit: the body is not JSON ({str(e)[:200]})")
        try:
            audit = self.auditor.parse_request(body)
        except ValueError as e:
            return _error(400, f"audit: {e}")

        def still_wanted() -> bool:  # a client that hung up while waiting is not audited for
            return request.transport is not None and not request.transport.is_closing()

        try:
            result, summary = await self._server.run_blocking(self.auditor.run_request, audit, still_wanted)
        except AuditBusy as e:
            return _error(429, f"audit: {e}", {"Retry-After": str(BUSY_RETRY_AFTER_S)})
        except ClientGone:
            return _error(499, "audit: the client went away before it started")  # nobody reads this
        except StoreError as e:
            return _store_error(e)
        except Exception:
            log.exception("requested audit failed")
            return _error(500, "the audit failed; see the server log")
        if result is None:
            return _json(
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


def _json(value: object, status: int = 200, headers: dict | None = None) -> web.Response:
    """Strict JSON: no NaN or Infinity, whatever a stored value holds."""
    return web.Response(text=dumps(value), status=status, headers=headers, content_type="application/json")


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return _json({"error": message}, status, headers)


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")


def _store_error(e: StoreError) -> web.Response:
    """503 (retry later) only when the store is overloaded or out of disk; else 500."""
    if isinstance(e, AuditTooLarge):
        return _error(503, f"audit: {e}")
    if e.transient:
        return _error(503, str(e), {"Retry-After": "5"})
    log.error("read API: the store failed: %s", e)
    return _error(500, f"the store failed: {e}")
