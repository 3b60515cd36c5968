"""OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export` over `Ingestor.export`.

The handler takes the raw request bytes (no deserializer), so protobuf parsing happens
once, in a decode worker. Two things keep an unauthenticated or hostile call cheap:

- the method is registered as client-streaming (the wire format of a unary call is the same),
  so the handler runs before the message is read: the token is checked from the metadata and a
  call without it is refused before its body is received or inflated;
- gRPC's core does not decompress (`grpc.per_message_decompression` 0): a gzip message reaches
  the handler as it came and is inflated in the decode worker, under the same limit as HTTP's
  `Content-Encoding: gzip` (`decode.gunzip`: bad gzip is INVALID_ARGUMENT, a bomb
  RESOURCE_EXHAUSTED). The core does not tell the application whether a message was compressed,
  so gzip is recognised by its magic bytes, which no protobuf message can start with (0x1f
  would be field 3 with the invalid wire type 7). Only identity and gzip are enabled; a call
  in another encoding (deflate) is refused by the core with UNIMPLEMENTED.

The content-type is not checked: grpcio's core accepts any (or none) and does not pass it on.
The message is read as protobuf whatever it says; JSON fails to decode (INVALID_ARGUMENT).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo

from audit.net.access import OPEN, UNAUTHENTICATED, Access
from audit.net.connections import ConnectionLimits, grpc_connection_options

from .addresses import parse_hostport
from .decode import PROTOBUF, encode_response, response_for
from .ingest import Ingestor, Refused

log = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
GZIP_MAGIC = b"\x1f\x8b"
_IDENTITY, _GZIP = 1 << 0, 1 << 2  # grpc_compression_algorithm: NONE 0, DEFLATE 1, GZIP 2


class GrpcReceiver:
    def __init__(
        self,
        ingestor: Ingestor,
        address: str,
        *,
        threads: int = 16,
        access: Access = OPEN,
        limits: ConnectionLimits | None = None,
    ):
        self.ingestor = ingestor
        self.address = address
        self.access = access
        max_bytes = ingestor.max_body_bytes
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="otlp-grpc"),
            options=[
                ("grpc.max_receive_message_length", max_bytes),  # compressed bytes: see the docstring
                ("grpc.per_message_decompression", 0),
                ("grpc.compression_enabled_algorithms_bitset", _IDENTITY | _GZIP),
                ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
                *grpc_connection_options(limits or ConnectionLimits()),
            ],
            maximum_concurrent_rpcs=threads * 4,  # beyond this gRPC answers RESOURCE_EXHAUSTED
        )
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {"Export": grpc.stream_unary_rpc_method_handler(self._export)},  # raw bytes in and out
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.port: int | None = None

    def start(self) -> int:
        host, port = parse_hostport(self.address)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if self.access.tls:
                self.port = self._server.add_secure_port(target, self.access.tls.grpc_credentials())
            else:
                self.port = self._server.add_insecure_port(target)
        except RuntimeError as e:
            raise OSError(f"cannot listen for OTLP/gRPC on {self.address}: {e}") from None
        self._server.start()
        return self.port

    def stop(self, grace: float) -> threading.Event:
        """Refuse new calls at once; the event is set when calls in flight have finished."""
        return self._server.stop(grace)

    def _export(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        if self.access.auth and not self.access.auth.allows(context.invocation_metadata()):
            self.ingestor.count_unauthenticated()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        request = next(requests, None)  # the one message of a unary call; read only now
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
        try:
            result = self.ingestor.export(request, PROTOBUF, gzipped=request[:2] == GZIP_MAGIC)
        except Refused as e:
            if e.retry_after is not None:
                info = RetryInfo(retry_delay=Duration(seconds=e.retry_after))
                context.set_trailing_metadata((("google.rpc.retryinfo-bin", info.SerializeToString()),))
            context.abort(getattr(grpc.StatusCode, e.grpc_status), str(e))
        except Exception:  # never let a bug take the connection down without an answer
            log.exception("unexpected error in OTLP/gRPC export")
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        return encode_response(response_for(result.rejected, result.message), PROTOBUF)
