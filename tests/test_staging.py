"""The staging log (audit/store/staging.py): requests are acknowledged once their spans are
fsync'd there, a loader moves them into DuckDB, and every acknowledged span is stored exactly
once, whatever a crash interrupts: the append, the fsync, the load's commit, the deletion of
loaded segments. Real DuckDB files, real segment files, real `ctxaudit serve` processes killed
with SIGKILL at chosen points (CTXAUDIT_STAGING_CRASH) and at random moments."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from audit.read.remote import RemoteReader
from audit.server.process import start_server, stop_server
from audit.store.reader import LocalReader
from audit.store.staging import StagingFull, StagingLoader, StagingLog, encode_frame, read_segment
from audit.store.writer import SpanStore, SpanWriter
from collector_ext.decode import PROTOBUF
from collector_ext.ingest import decode_batch
from tests.otlp_builders import request, spans
from tests.test_lifecycle import EXPORT, stored_traces

N = 20  # spans per request


def batch(rng, n: int = N):
    """A decoded request of `n` spans in a trace of its own; returns (trace id, batch)."""
    tid = rng.randbytes(16)
    return int.from_bytes(tid, "big"), decode_batch(
        request(spans(n, rng, tid)).SerializeToString(), PROTOBUF, False, 1 << 30
    )


def segment_files(db: str) -> list[str]:
    d = db + ".staging"
    return sorted(f for f in os.listdir(d) if f.endswith(".seg")) if os.path.isdir(d) else []


def recorded_segments(db: str) -> list[int]:
    reader = LocalReader(db)
    try:
        return [r[0] for r in reader._query("SELECT segment FROM staging_segments ORDER BY 1")]
    finally:
        reader.close()


class Store:
    """A store with its writer, staging log and (optionally) loader, as serve composes them."""

    def __init__(self, db: str, *, load: bool = True, max_bytes: int = 1 << 30, **log_args):
        self.store = SpanStore(db)
        self.writer = SpanWriter(self.store)
        self.log = StagingLog(
            db + ".staging", max_bytes=max_bytes, loaded=self.store.loaded_segments(), **log_args
        )
        self.loader = StagingLoader(self.log, self.writer, interval_s=0.1) if load else None
        if self.loader:
            self.loader.start()

    def close(self) -> int:
        left = self.loader.close() if self.loader else self.log.spans
        self.log.close()
        self.writer.close()
        return left


def test_acknowledged_spans_are_loaded_and_their_segments_deleted(tmp_path, rng):
    db = str(tmp_path / "s.duckdb")
    s = Store(db, segment_spans=3 * N)  # several segments, sealed by size
    sent = [batch(rng) for _ in range(10)]
    for f in [s.log.submit(b) for _, b in sent]:
        f.result(10)  # acknowledged: fsync'd
    assert s.log.stats.appended_spans == 10 * N
    deadline = time.monotonic() + 30
    while s.log.spans:  # the loader moves them within its interval
        assert time.monotonic() < deadline, s.log.spans
        time.sleep(0.02)
    assert s.writer.stats.committed_spans == 10 * N and s.log.stats.loads >= 1
    assert s.close() == 0
    assert segment_files(db) == []
    stored = stored_traces(db)
    assert stored == {t: N for t, _ in sent}
    # the table keeps the rows of the last load only: older segments' files are gone
    assert 1 <= len(recorded_segments(db)) <= 4


def test_a_restart_loads_what_was_staged_exactly_once(tmp_path, rng):
    db = str(tmp_path / "r.duckdb")
    s = Store(db, load=False, segment_spans=4 * N)
    sent = [batch(rng) for _ in range(9)]
    for _, b in sent:  # one at a time: segments of 4, 4 and 1 requests
        s.log.submit(b).result(10)
    assert s.close() == 9 * N  # nothing loaded: the segments stay on disk
    assert len(segment_files(db)) == 3 and stored_traces(db) == {}
    for _ in range(2):  # the second start finds nothing left to load
        s = Store(db)
        assert s.close() == 0
        assert segment_files(db) == []
        assert stored_traces(db) == {t: N for t, _ in sent}


def test_a_segment_loaded_but_not_deleted_is_not_loaded_again(tmp_path, rng):
    """The crash between the load's commit and the deletion of its files."""
    db = str(tmp_path / "d.duckdb")
    s = Store(db, load=False)
    sent = [batch(rng) for _ in range(3)]
    for f in [s.log.submit(b) for _, b in sent]:
        f.result(10)
    s.log.seal()
    loader = StagingLoader(s.log, s.writer)
    assert loader._load(s.log.sealed())  # committed and deleted ...
    s.close()
    assert stored_traces(db) == {t: N for t, _ in sent}
    # ... now the same again, with the files put back as a crash before the deletion leaves them
    s = Store(db, load=False)
    more = [batch(rng) for _ in range(3)]
    for f in [s.log.submit(b) for _, b in more]:
        f.result(10)
    s.log.seal()
    segments = s.log.sealed()
    kept = {seg.path: open(seg.path, "rb").read() for seg in segments}
    assert StagingLoader(s.log, s.writer)._load(segments)
    s.close()
    for path, data in kept.items():
        with open(path, "wb") as f:
            f.write(data)
    s = Store(db)  # finds them recorded: deletes them, loads nothing
    assert s.log.stats.replayed_segments == 0
    s.close()
    assert segment_files(db) == []
    assert stored_traces(db) == {t: N for t, _ in sent + more}


def test_a_frame_cut_short_or_damaged_ends_its_segment(tmp_path, rng):
    db = str(tmp_path / "t.duckdb")
    s = Store(db, load=False)
    sent = [batch(rng) for _ in range(4)]
    for _, b in sent:  # one fsync each: four frames in one segment
        s.log.submit(b).result(10)
    s.close()
    (name,) = segment_files(db)
    path = os.path.join(db + ".staging", name)
    _, spans_read, whole, size = read_segment(path)
    assert (spans_read, whole) == (4 * N, size)
    data = bytearray(open(path, "rb").read())
    # the fourth frame cut short (a crash mid-write) and a byte of the third flipped (damage)
    starts = [0]
    for _, b in sent:
        starts.append(starts[-1] + sum(len(x) for x in encode_frame(b)))
    assert starts[-1] == size
    data = data[: starts[3] + 100]
    data[starts[2] + 200] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)
    batches, spans_read, whole, _ = read_segment(path)
    assert spans_read == 2 * N and whole == starts[2] and len(batches) == 2
    s = Store(db)
    s.close()
    assert s.log.stats.damaged_bytes == len(data) - starts[2]
    assert stored_traces(db) == {t: N for t, _ in sent[:2]}


def test_a_full_log_refuses_until_the_loader_frees_space(tmp_path, rng):
    db = str(tmp_path / "f.duckdb")
    s = Store(db, max_bytes=1)  # every batch is larger: only an empty log takes one
    s.writer.pause()  # the loader's commit waits: the log stays full
    _, first = batch(rng)
    s.log.submit(first).result(10)  # an empty log takes one batch, whatever its size
    with pytest.raises(StagingFull, match="staging log is full"):
        s.log.submit(batch(rng)[1])
    assert s.log.stats.refused_batches == 1
    s.writer.resume()
    deadline = time.monotonic() + 30
    while True:  # once loaded, the space is free again
        try:
            s.log.submit(batch(rng)[1]).result(10)
            break
        except StagingFull:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert s.close() == 0
    assert sum(stored_traces(db).values()) == 2 * N


def test_over_the_wire_a_full_log_answers_503_and_unavailable_and_ack_means_durable(make_server, rng):
    server = make_server(staging_bytes=1)
    server.writer.pause()  # nothing is loaded: acknowledgements do not wait for DuckDB any more
    export = grpc.insecure_channel(server.grpc_target).unary_unary(EXPORT)
    export(request(spans(N, rng)).SerializeToString(), timeout=10)  # acknowledged while paused
    assert server.loader.staging.spans == N and server.writer.stats.committed_spans == 0
    with pytest.raises(grpc.RpcError) as e:
        export(request(spans(N, rng)).SerializeToString(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "staging log is full" in e.value.details()
    req = urllib.request.Request(
        server.http_url,
        data=request(spans(N, rng)).SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
    )
    with pytest.raises(urllib.error.HTTPError) as h:
        urllib.request.urlopen(req, timeout=10)
    assert h.value.code == 503 and h.value.headers["Retry-After"] == "1"
    server.writer.resume()
    assert server.reader().stats().spans == N  # the stop loaded what was acknowledged


# --- kill -9, many rounds


POINTS = [
    "append.write",  # frames queued, nothing written
    "append.torn",  # half of a group's bytes written
    "append.fsync",  # written, not yet fsync'd
    "append.ack",  # fsync'd, not yet acknowledged
    "segment.create",  # a new segment file, its directory entry not yet synced
    "load.commit",  # segments read, the transaction not yet committed
    "load.committed",  # committed, the files not yet deleted
    "delete",  # between the deletions of a load's segments
    "random",  # killed by the test at a random moment
]


class Load:
    """Threads exporting traces of N spans until the server goes away; records what was acked."""

    def __init__(self, port: int, rng: random.Random, threads: int = 4):
        self.port, self.rng = port, rng
        self.acked: set[int] = set()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            export = channel.unary_unary(EXPORT)
            while True:
                with self.lock:
                    tid = self.rng.randbytes(16)
                    body = request(spans(N, self.rng, tid)).SerializeToString()
                try:
                    export(body, timeout=30)
                except grpc.RpcError as e:
                    if "retry" in (e.details() or ""):  # refused by the server, retryably
                        time.sleep(0.05)
                        continue
                    return  # the server is gone: whatever was not acknowledged may be lost
                with self.lock:
                    self.acked.add(int.from_bytes(tid, "big"))

    def join(self) -> set[int]:
        for t in self.threads:
            t.join(60)
        return self.acked


def _serve_until_killed(db: str, point: str, n: int, rng: random.Random) -> set[int]:
    env = (os.environ | {"CTXAUDIT_STAGING_CRASH": f"{point}:{n}"}) if point != "random" else None
    proc, port, _ = start_server(db, "--decoders", "0", "--audit-every", "0", env=env)
    load = Load(port, rng)
    try:
        proc.wait(rng.uniform(0.5, 3.0) if point == "random" else 60)
    except subprocess.TimeoutExpired:  # random, or the point was not reached n times: a kill now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return load.join()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_anywhere_in_the_staging_log_stores_every_ack_exactly_once(tmp_path, seed):
    """Rounds on one file: each kills the server at a point of the log (the n-th time it passes
    it) or at a random moment; the next start loads what the last one left. In the end every
    acknowledged trace is stored, none twice, and no segment is left."""
    rng = random.Random(seed)
    db = str(tmp_path / "k.duckdb")
    acked: set[int] = set()
    for point in rng.sample(POINTS, len(POINTS)):
        n = rng.randint(1, 40) if point.startswith("append") else rng.randint(1, 3)
        acked |= _serve_until_killed(db, point, n, rng)
    proc, _, _ = start_server(db, "--decoders", "0", "--audit-every", "0")
    assert stop_server(proc) == 0  # SIGTERM: loads everything staged before it exits
    assert segment_files(db) == []
    stored = stored_traces(db)
    assert acked, "nothing was acknowledged"
    missing = [t for t in acked if t not in stored]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged traces lost"
    twice = {t: c for t, c in stored.items() if c != N}
    assert not twice, f"{len(twice)} traces stored more than once (or in part): {list(twice.values())[:5]}"


@pytest.mark.slow
def test_sigterm_drains_the_log_and_a_crash_left_log_loads_at_start(tmp_path, rng):
    """serve's stop loads every staged span before it exits; a start loads what a kill left
    before anything new, and readers see them once loaded (polled, never assumed)."""
    db = str(tmp_path / "t.duckdb")
    env = os.environ | {"CTXAUDIT_STAGING_CRASH": "load.commit:1"}  # nothing is ever loaded
    proc, port, _ = start_server(db, "--decoders", "0", "--audit-every", "0", env=env)
    export = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(EXPORT)
    sent = {}
    for _ in range(5):
        tid = rng.randbytes(16)
        export(request(spans(N, rng, tid)).SerializeToString(), timeout=30)
        sent[int.from_bytes(tid, "big")] = N
    proc.wait(60)  # the first load killed it
    assert stored_traces(db) == {} and segment_files(db)
    proc, _, _ = start_server(db, "--decoders", "0", "--audit-every", "0")
    api = RemoteReader(proc.api_url)
    deadline = time.monotonic() + 60
    while api.store_counts()["spans"] < 5 * N:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    api.close()
    assert stop_server(proc) == 0
    assert stored_traces(db) == sent and segment_files(db) == []


def test_serve_help_lists_staging_mib():
    r = subprocess.run([sys.executable, "-m", "audit", "serve", "--help"], capture_output=True, text=True)
    assert "--staging-mib" in r.stdout


def test_ingest_figures_show_the_staging_log(tmp_path, rng):
    from collector_ext.ingest import Ingestor
    from collector_ext.ingest_health import IngestHealth

    db = str(tmp_path / "h.duckdb")
    s = Store(db, load=False, max_bytes=64 << 20)
    sent = [batch(rng) for _ in range(3)]
    for _, b in sent:
        s.log.submit(b).result(10)
    ingestor = Ingestor(s.writer, staging=s.log, decoders=0)
    loader = StagingLoader(s.log, s.writer)
    snap = IngestHealth(ingestor, s.writer, loader=loader).snapshot()
    assert snap["staged_spans"] == 3 * N and snap["committed_spans"] == 0
    assert snap["staging_segments"] == 1 and 0 < snap["staging_bytes"] <= snap["staging_capacity_bytes"]
    assert snap["staging_lag_s"] >= 0 and snap["loads"] == 0
    s.log.seal()
    assert loader._load(s.log.sealed())
    snap = IngestHealth(ingestor, s.writer, loader=loader).snapshot()
    assert (snap["staged_spans"], snap["staging_bytes"], snap["staging_segments"]) == (0, 0, 0)
    assert snap["committed_spans"] == 3 * N and snap["loads"] == 1 and snap["staging_lag_s"] == 0
    s.close()


@pytest.mark.parametrize("shm", [True, False])
def test_a_batch_from_a_decode_worker_is_staged_as_its_ipc_streams(tmp_path, rng, shm):
    """The worker's IPC streams go into the frame as they are, and read back as the same tables."""
    from collector_ext.worker import SHM_DIR, receive, ship

    _, original = batch(rng)
    links = request(spans(3, rng))
    for s in links.resource_spans[0].scope_spans[0].spans:  # some links too
        s.links.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8))
    with_links = decode_batch(links.SerializeToString(), PROTOBUF, False, 1 << 30)
    for b in (original, with_links):
        received = receive(ship(b, SHM_DIR if shm else None))
        assert received.ipc is not None
        frame = encode_frame(received)
        assert frame[1] is received.ipc[0]  # not encoded again
        path = str(tmp_path / f"{id(b)}.seg")
        with open(path, "wb") as f:
            for buf in frame:
                f.write(memoryview(buf))
        (back,), n, _, _ = read_segment(path)
        assert n == b.accepted and back.spans.equals(b.spans) and back.links.equals(b.links)


_FULL_DISK = """
import random, resource, sys
from audit.store.errors import StoreUnavailable
from audit.store.staging import StagingLog, read_segment
from tests.test_staging import batch
rng = random.Random(5)
log = StagingLog(sys.argv[1], max_bytes=1 << 30)
done = [b for _, b in [batch(rng) for _ in range(3)]]
for b in done:
    log.submit(b).result(10)
size = log.bytes
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, resource.RLIM_INFINITY))  # the file cannot grow
try:
    log.submit(batch(rng)[1]).result(10)
    print("accepted")
except StoreUnavailable as e:
    print("refused:", e)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
log.submit(batch(rng)[1]).result(10)  # space is back: a new segment takes it
print("segments", log.segments, "spans", log.spans)
log.close()
"""


def test_a_failed_append_refuses_retryably_and_appends_resume(tmp_path):
    """The disk fills up (here: the process's file size limit, which fails writes with EFBIG):
    the request is refused with a retryable error, nothing it half-wrote is loaded, and the
    next append, in a new segment, succeeds."""
    staging = str(tmp_path / "x.duckdb.staging")
    r = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, staging],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.getcwd(),
    )
    assert r.returncode == 0, r.stderr
    assert "refused: cannot write the staging log" in r.stdout and "free disk space" in r.stdout, r.stdout
    assert "refusing spans, retryably" in r.stderr and "resumed after" in r.stderr
    assert f"segments 2 spans {4 * N}" in r.stdout  # the refused request is not in the log
    total = sum(read_segment(os.path.join(staging, f))[1] for f in sorted(os.listdir(staging)))
    assert total == 4 * N
