"""Backpressure: a full queue refuses with a retryable answer, and real exporters retry until stored."""

import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.otlp_builders import request, spans

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def refused(target: str, body: bytes, timeout: float = 10) -> grpc.RpcError:
    """Export `body` over gRPC and return the error it must get."""
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary(EXPORT)(body, timeout=timeout)
    return err.value


def sdk_spans(service: str, n: int):
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("overload")
    for i in range(n):
        with tracer.start_as_current_span(f"op{i}"):
            pass
    return memory.get_finished_spans()


def fill_queue(server, rng, n):
    """Occupy the whole write queue with one request whose commit is held back.
    The returned thread's `outcome` says how that request was answered."""
    body = request(spans(n, rng)).SerializeToString()
    outcome: dict = {}

    def send():
        try:
            with grpc.insecure_channel(server.grpc_target) as channel:
                channel.unary_unary(EXPORT)(body, timeout=60)
            outcome["code"] = "OK"
        except grpc.RpcError as e:
            outcome["code"] = e.code().name

    done = threading.Thread(target=send)
    done.outcome = outcome
    done.start()
    wait_for(lambda: server.writer.stats.queued_spans == n)
    return done


def test_full_queue_answers_unavailable_and_503_with_retry_hints(make_server, rng):
    server = make_server(queue_spans=5)
    server.writer.pause()
    holder = fill_queue(server, rng, 5)

    e = refused(server.grpc_target, request(spans(2, rng)).SerializeToString())
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    retry = dict(e.trailing_metadata())["google.rpc.retryinfo-bin"]
    assert RetryInfo.FromString(retry).retry_delay.seconds == 1

    req = urllib.request.Request(
        server.http_url,
        data=request(spans(2, rng)).SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
    )
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("a full queue accepted a request")
    except urllib.error.HTTPError as e:
        assert e.code == 503 and e.headers["Retry-After"] == "1"

    server.writer.resume()
    holder.join()
    assert holder.outcome == {"code": "OK"}
    assert server.reader().stats().spans == 5  # only what was acknowledged


@pytest.mark.slow
def test_overload_causes_retries_not_loss(make_server, rng):
    server = make_server(queue_spans=5, decoders=1)
    server.writer.pause()
    holder = fill_queue(server, rng, 5)

    results = {}
    exporters = {
        "grpc": GrpcExporter(endpoint=server.grpc_target, insecure=True, timeout=30),
        "http": HttpExporter(endpoint=server.http_url, timeout=30),
    }
    batches = {name: sdk_spans(f"svc-{name}", 3) for name in exporters}
    threads = [
        threading.Thread(target=lambda n=name: results.__setitem__(n, exporters[n].export(batches[n])))
        for name in exporters
    ]
    for t in threads:
        t.start()
    wait_for(lambda: server.ingestor.stats.refused_requests >= 2)  # both were refused at least once
    server.writer.resume()
    for t in threads:
        t.join()
    holder.join()
    assert holder.outcome == {"code": "OK"}

    assert results == {"grpc": SpanExportResult.SUCCESS, "http": SpanExportResult.SUCCESS}
    stats = server.reader().stats()
    assert stats.spans == 11
    assert {s.service: s.spans for s in stats.by_service} == {"svc": 5, "svc-grpc": 3, "svc-http": 3}


def test_inflight_byte_budget_refuses_before_decoding(make_server, rng):
    small = request(spans(1, rng)).SerializeToString()
    server = make_server(inflight_bytes=len(small) + 1)
    server.writer.pause()
    holder = fill_queue(server, rng, 1)  # holds its bytes in flight until committed
    e = refused(server.grpc_target, small)
    assert e.code() == grpc.StatusCode.UNAVAILABLE and "in flight" in e.details()
    server.writer.resume()
    holder.join()


@pytest.mark.slow
def test_a_dead_decode_worker_is_replaced(make_server, rng):
    import os
    import signal

    import psutil

    server = make_server(decoders=1)
    export = grpc.insecure_channel(server.grpc_target).unary_unary(EXPORT)
    export(request(spans(2, rng)).SerializeToString(), timeout=10)
    workers = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGKILL)
    workers[0].wait(10)
    outcomes = []
    for _ in range(3):  # the first request may meet the dead pool: retryable; then it works again
        try:
            export(request(spans(2, rng)).SerializeToString(), timeout=30)
            outcomes.append("ok")
        except grpc.RpcError as e:
            outcomes.append(e.code().name)
    assert outcomes[-1] == "ok" and set(outcomes) <= {"ok", "UNAVAILABLE"}
    assert server.reader().stats().spans == 2 + 2 * outcomes.count("ok")


def test_stop_lets_requests_in_flight_finish(make_server, rng):
    """Shutdown refuses new calls at once but answers the one already in flight, after its commit."""
    server = make_server()
    server.writer.pause()
    holder = fill_queue(server, rng, 3)  # in flight: decoded, waiting for its commit
    stopper = threading.Thread(target=server.receivers.stop)
    stopper.start()
    with grpc.insecure_channel(server.grpc_target) as channel:
        probe = channel.unary_unary(EXPORT)

        def draining() -> bool:  # an empty request needs no commit: answered at once until the stop
            try:
                probe(b"", timeout=5)
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.UNAVAILABLE
            return False

        wait_for(draining)
    assert refused(server.grpc_target, request(spans(1, rng)).SerializeToString(), 5).code() == (
        grpc.StatusCode.UNAVAILABLE
    )
    assert stopper.is_alive() and holder.is_alive()  # still waiting for the in-flight request
    server.writer.resume()
    holder.join(10)
    stopper.join(10)
    assert not holder.is_alive() and not stopper.is_alive()
    assert holder.outcome == {"code": "OK"}  # answered after its commit, not cut off
    server.writer.close()
    server.stopped = True
    from audit.store.reader import LocalReader

    assert LocalReader(server.db).stats().spans == 3
