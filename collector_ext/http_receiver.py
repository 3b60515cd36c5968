"""OTLP/HTTP: `POST /v1/traces` over `Ingestor.export`.

The handler does what the Collector's does: check the content type (415), read the
body within the size limit (413), and encode the answer in the request's content
type, errors included (a `google.rpc.Status`, per the OTLP/HTTP spec). Decompression
happens in the decode worker, bounded by the same limit.
"""

from __future__ import annotations

import logging

import grpc
from aiohttp import web
from google.rpc.status_pb2 import Status

from audit.net.access import OPEN, UNAUTHENTICATED, Access
from audit.net.aio_host import ThreadedAioServer
from audit.net.connections import ConnectionLimits

from .addresses import parse_hostport
from .decode import JSON, PROTOBUF, encode_response, response_for
from .ingest import CONTENT_TYPES, Ingestor, PayloadTooLarge, Refused, Unauthenticated, UnsupportedMediaType

log = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"


def _status_body(e: Refused, content_type: str) -> bytes:
    status = Status(code=grpc.StatusCode[e.grpc_status].value[0], message=str(e))
    return encode_response(status, content_type)


class HttpReceiver:
    def __init__(
        self,
        ingestor: Ingestor,
        address: str,
        *,
        threads: int = 16,
        drain_timeout: float = 30.0,
        access: Access = OPEN,
        limits: ConnectionLimits | None = None,
    ):
        self.ingestor = ingestor
        self.access = access
        self.drain_timeout = drain_timeout
        self.address = address
        self.port: int | None = None
        host, port = parse_hostport(address)
        self._server = ThreadedAioServer("otlp-http", host, port, threads=threads, limits=limits)

    def start(self) -> int:
        app = web.Application(client_max_size=self.ingestor.max_body_bytes)
        app.router.add_post(TRACES_PATH, self._handle)
        self.port = self._server.start(
            app,
            "OTLP/HTTP",
            ssl_context=self.access.tls.ssl_context() if self.access.tls else None,
            auto_decompress=False,
            shutdown_timeout=self.drain_timeout,
        )
        return self.port

    def stop(self) -> None:
        """Stop accepting; requests in flight finish (up to `drain_timeout` seconds)."""
        self._server.stop()

    async def _handle(self, request: web.Request) -> web.Response:
        content_type = request.content_type
        answer_type = content_type if content_type in CONTENT_TYPES else PROTOBUF
        try:
            if self.access.auth and not self.access.auth.allows(request.headers.items()):
                self.ingestor.count_unauthenticated()
                raise Unauthenticated(UNAUTHENTICATED)  # before the body is read
            if content_type not in CONTENT_TYPES:
                raise UnsupportedMediaType(
                    f"unsupported Content-Type {content_type!r}: use {PROTOBUF} or {JSON}"
                )
            encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("gzip", "identity", ""):
                raise UnsupportedMediaType(f"unsupported Content-Encoding {encoding!r}: use gzip or none")
            body = await self._read_body(request)
            result = await self._server.run_blocking(
                self.ingestor.export, body, content_type, encoding == "gzip"
            )
        except Refused as e:
            headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else {}
            if isinstance(e, Unauthenticated):
                headers["WWW-Authenticate"] = 'Bearer realm="ctxaudit"'
            return web.Response(
                status=e.http_status,
                body=_status_body(e, answer_type),
                content_type=answer_type,
                headers=headers,
            )
        except ConnectionResetError:
            raise  # the client left mid-body, or stalled and was closed (audit/net/connections.py)
        except Exception:
            log.exception("unexpected error in OTLP/HTTP export")
            return web.Response(status=500, text="internal error; see the server log")
        body = encode_response(response_for(result.rejected, result.message), answer_type)
        return web.Response(status=200, body=body, content_type=answer_type)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.ingestor.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"body of {request.content_length} bytes exceeds the maximum of {limit}")
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body exceeds the maximum of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
