"""Faults a long-running server meets: the disk filling up (here: the file-size limit of the
process, RLIMIT_FSIZE, which fails writes the same way, with EFBIG), and kill -9 during its own
audits. Acknowledged spans are never lost; refusals are retryable; writes resume by themselves."""

import os
import random
import resource
import signal
import subprocess
import time

import grpc
import pytest

from audit.read.remote import RemoteReader
from audit.server.process import start_server, stop_server
from audit.store.reader import LocalReader
from tests.otlp_builders import request, spans
from tests.test_lifecycle import EXPORT, Sender, stored_traces

pytestmark = pytest.mark.slow  # server processes killed, out of disk space, a stalled writer

LIMIT = 3 << 20


def _limited_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))  # soft: it can be raised again


def test_disk_full_refuses_retryably_and_recovers_when_space_returns(tmp_path):
    db = str(tmp_path / "full.duckdb")
    proc, port, _ = start_server(
        db,
        "--audit-every",
        "0",
        "--checkpoint-mib",
        "1",
        "--staging-mib",  # the staging log fills up soon once the store cannot take its spans
        "4",
        stderr=subprocess.PIPE,
        preexec_fn=_limited_file_size,
    )
    api = RemoteReader(proc.api_url)
    rng = random.Random(4)
    acked, refusals = set(), []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        export = channel.unary_unary(EXPORT)

        def send() -> bool:
            tid = rng.randbytes(16)
            try:
                export(request(spans(200, rng, tid)).SerializeToString(), timeout=30)
            except grpc.RpcError as e:
                refusals.append((e.code(), e.details()))
                return False
            acked.add(int.from_bytes(tid, "big"))
            return True

        for _ in range(3000):  # until the file cannot grow
            if not send() and len(refusals) >= 5:
                break
        assert refusals, "the size limit was never reached"
        codes = {code for code, _ in refusals}
        assert codes == {grpc.StatusCode.UNAVAILABLE}, codes  # retryable: exporters keep the spans and retry
        assert any("free disk space" in details for _, details in refusals)
        health = api.ingest()  # the read API still answers meanwhile, and every ack is accounted for:
        assert health["committed_spans"] + health["staged_spans"] >= 200 * len(acked) > 0  # stored or staged
        before = len(acked)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        deadline = time.monotonic() + 30
        while not send():  # space is back: writes resume without a restart
            assert time.monotonic() < deadline, refusals[-1]
            time.sleep(0.5)
        for _ in range(10):
            assert send()
        assert len(acked) >= before + 11
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    stderr = proc.stderr.read()
    assert "refusing spans, retryably" in stderr and "resumed after" in stderr
    stored = stored_traces(db)
    assert all(stored.get(t) == 200 for t in acked), "an acknowledged trace was lost"


@pytest.mark.parametrize("rounds", [3])
def test_kill_9_during_audits_loses_nothing_and_keeps_the_runs(tmp_path, rng, rounds):
    db = str(tmp_path / "k.duckdb")
    acked: set[int] = set()
    for _ in range(rounds):
        proc, grpc_port, _ = start_server(db, "--audit-every", "0.5", "--audit-settle", "0")
        api = RemoteReader(proc.api_url)
        with Sender(f"127.0.0.1:{grpc_port}", rng) as sender:
            # the first round's first audit saves a run; later ones find nothing newer (the spans all
            # start at the same instant) and save none, but still run every half second
            deadline = time.monotonic() + 120
            while not api.audit_runs(1):
                assert time.monotonic() < deadline, "no audit run saved after 120 s"
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 1))  # not a wait: where in the next audits the kill lands
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        api.close()
        acked |= sender.acked
    proc, _, _ = start_server(db, "--audit-every", "0")
    assert stop_server(proc) == 0  # the file reopens, after every kill
    stored = stored_traces(db)
    assert acked and all(stored.get(t) == 50 for t in acked), "an acknowledged trace was lost"
    reader = LocalReader(db)
    try:
        runs = reader.audit_runs(1000)
        assert runs, "no audit run was saved before the kills"
        for run in runs:  # every saved run is whole: its edges and findings are there
            assert reader.audit_run(run["run_id"]) is not None
    finally:
        reader.close()


def test_a_slow_writer_gives_backpressure_not_unbounded_memory(make_server):
    """The writer stalls (a slow disk); clients keep sending. The queue and the bytes in flight
    stay within their bounds, memory stays flat, clients are told to retry, and what was
    acknowledged is stored once the writer moves again."""
    import threading

    import psutil

    from bench.payloads import encoded_requests

    server = make_server(queue_spans=10_000, inflight_bytes=16 << 20)
    senders = 32  # more requests than the queue holds: some wait for their commit, the rest are refused
    bodies = encoded_requests(8, 1000)  # about 450 KB each
    me = psutil.Process()
    rss_before = me.memory_info().rss
    server.writer.pause()
    stop, acked, refused, peaks = threading.Event(), [0], [0], {"queued": 0, "inflight": 0, "rss": 0}
    lock = threading.Lock()

    def send(i: int) -> None:
        with grpc.insecure_channel(server.grpc_target) as channel:
            export = channel.unary_unary(EXPORT)
            k = i
            while not stop.is_set():
                try:
                    export(bodies[k % len(bodies)], timeout=60)
                    with lock:
                        acked[0] += 1000
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e.code()
                    with lock:
                        refused[0] += 1
                    time.sleep(0.01)
                k += senders

    threads = [threading.Thread(target=send, args=(i,)) for i in range(senders)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while refused[0] <= 50:  # until the clients have been told, many times, to come back later
        assert time.monotonic() < deadline, f"{refused[0]} refusals after 120 s"
        peaks["queued"] = max(peaks["queued"], server.writer.stats.queued_spans)
        peaks["inflight"] = max(peaks["inflight"], server.ingestor.inflight_bytes)
        peaks["rss"] = max(peaks["rss"], me.memory_info().rss)
        time.sleep(0.01)
    server.writer.resume()
    stop.set()
    for t in threads:
        t.join(60)
    assert refused[0] > 50  # the clients were told, many times, to come back later
    assert peaks["queued"] <= 10_000 + 1000  # the bound (an empty queue takes one batch whatever its size)
    assert peaks["inflight"] <= (16 << 20) + max(map(len, bodies))
    assert peaks["rss"] - rss_before < 300 << 20, (
        peaks["rss"] - rss_before
    ) >> 20  # bounded, whatever was sent
    reader = server.reader()
    try:
        assert reader.stats().spans == acked[0]  # everything acknowledged, and nothing else, was stored
    finally:
        reader.close()
