"""The Parquet export beside a running server: `ctxaudit export --server URL --parquet DIR`
(the read API streams the rows) and `serve --export-parquet DIR` (settled hours, on a thread of
the server) write the same files as `ctxaudit export --db`, replace re-exported hours the same
way, and a failing export is reported without taking the server down."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from audit.cli import main
from audit.read.remote import RemoteReader
from audit.server.parquet_export import ScheduledParquetExport
from audit.server.process import start_server, stop_server
from audit.store.errors import StoreError
from audit.store.parquet import HOUR_NS, check_export, export_store, read_manifest
from audit.store.writer import SpanStore
from tests.audit_helpers import simulated_store
from tests.serve_helpers import wait_loaded


def _ctxaudit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "audit", *args], capture_output=True, text=True, timeout=300)


def _rows(root: Path, kind: str, shard: str) -> list[tuple]:
    """Every row exported for a shard, in a fixed order, with the hour folder it sits in."""
    files = sorted((root / kind / f"shard={shard}").rglob("*.parquet"))
    rows = []
    for f in files:
        table = pq.read_table(f)
        hour = f.parent.relative_to(root / kind / f"shard={shard}").as_posix()
        rows += [(hour, *r.values()) for r in table.to_pylist()]
    return sorted(rows, key=repr)


def _schemas(root: Path, shard: str) -> dict[str, set[str]]:
    return {
        kind: {
            str(pq.read_schema(f).remove_metadata())
            for f in (root / kind / f"shard={shard}").rglob("*.parquet")
        }
        for kind in ("spans", "links")
    }


def _hours(root: Path, shard: str) -> dict:
    m = read_manifest(root, shard)
    return {k: (h["spans"], sorted(h["spans_files"].values())) for k, h in m["hours"].items()}


@pytest.fixture
def store(tmp_path):
    db, _ = simulated_store(tmp_path)
    return db


# --- serve's scheduled export, in process (no server) ---


def test_settled_hours_are_exported_once_and_then_nothing_is_due(store, tmp_path):
    span_store = SpanStore(store)
    try:
        export = ScheduledParquetExport(span_store, str(tmp_path / "pq"), "s0", every_s=60, settle_s=0)
        first = export.export_settled()
        assert first is not None and first["last_export"]["spans"] > 0
        assert export.export_settled() is None  # nothing newly settled: no export, no failure
        status = export.status()
        assert status["exports"] == 1 and status["failures"] == 0
        assert status["exported_until_ns"] == first["last_export"]["until_ns"]
        from audit.server.metrics import ServerMetrics
        from audit.store.reader import StoreReader

        text = ServerMetrics(StoreReader(span_store, store), parquet_export_status=export.status).render()
        values = dict(line.rsplit(" ", 1) for line in text.decode().splitlines() if not line.startswith("#"))
        assert float(values["ctxaudit_parquet_export_successes_total"]) == 1
        assert float(values["ctxaudit_parquet_export_failures_total"]) == 0
        until = float(values["ctxaudit_parquet_export_until_timestamp_seconds"])
        assert until == first["last_export"]["until_ns"] / 1e9
    finally:
        span_store.close()
    reference = tmp_path / "ref"
    export_store(store, str(reference), shard="s0")
    assert _rows(tmp_path / "pq", "spans", "s0") == _rows(reference, "spans", "s0")
    assert _rows(tmp_path / "pq", "links", "s0") == _rows(reference, "links", "s0")
    check_export(tmp_path / "pq", first["last_export"]["from_ns"], first["last_export"]["until_ns"])


def test_an_hour_still_settling_waits(store, tmp_path):
    span_store = SpanStore(store)
    try:
        (last,) = span_store.cursor().execute("SELECT max(start_ns) FROM spans").fetchone()
        export = ScheduledParquetExport(span_store, str(tmp_path / "pq"), "s0", every_s=60, settle_s=600)
        # ten minutes after the last span's hour ended, with a settle time of ten minutes and one second
        hour_end = (last // HOUR_NS + 1) * HOUR_NS
        assert export.settled_hours(now_ns=hour_end + 599 * 10**9) is None
        assert export.settled_hours(now_ns=hour_end + 600 * 10**9)[1] == hour_end
    finally:
        span_store.close()


def test_a_failing_export_is_counted_and_named(store, tmp_path):
    span_store = SpanStore(store)
    try:
        export = ScheduledParquetExport(span_store, str(tmp_path / "pq"), "s0", every_s=60, settle_s=0)
        manifest = tmp_path / "pq" / "_shards" / "s0.json"
        manifest.parent.mkdir(parents=True)
        manifest.write_text("{not json")
        assert export.export_settled() is None
        status = export.status()
        assert status["failures"] == 1 and status["exports"] == 0
        assert str(manifest) in status["last_error"]
        manifest.unlink()  # fixed: the next tick exports
        assert export.export_settled() is not None and export.status()["last_error"] is None
    finally:
        span_store.close()


# --- through a running server ---


@pytest.mark.slow
def test_export_through_the_server_writes_what_export_db_writes(store, tmp_path):
    served = tmp_path / "served"
    proc, _, _ = start_server(
        store,
        "--audit-every",
        "0",
        "--audit-settle",
        "0",
        "--export-parquet",
        str(served),
        "--export-every",
        "1h",
        "--export-shard",
        "s0",
    )
    try:
        wait_loaded(proc.api_url)
        remote = tmp_path / "remote"
        r = _ctxaudit("export", "--server", proc.api_url, "--parquet", str(remote), "--shard", "s0")
        assert r.returncode == 0, r.stderr
        files = sorted(remote.rglob("*.parquet"))
        again = _ctxaudit("export", "--server", proc.api_url, "--parquet", str(remote), "--shard", "s0")
        assert again.returncode == 0, again.stderr
        assert (
            len(sorted(remote.rglob("*.parquet"))) == len(files)
            and sorted(remote.rglob("*.parquet")) != files
        )
        deadline = time.monotonic() + 60  # the scheduled export's first pass comes a second after the start
        while not (status := RemoteReader(proc.api_url).ingest()["parquet_export"])["exports"]:
            assert time.monotonic() < deadline and not status["failures"], status
            time.sleep(0.2)
        assert status["shard"] == "s0" and status["last_spans"] > 0 and status["last_error"] is None
    finally:
        assert stop_server(proc) == 0
    reference = tmp_path / "ref"
    export_store(store, str(reference), shard="s0")
    for kind in ("spans", "links"):
        assert _rows(remote, kind, "s0") == _rows(reference, kind, "s0")
        assert _rows(served, kind, "s0") == _rows(reference, kind, "s0")
    assert _rows(reference, "links", "s0")  # the scenario has links: they went through too
    assert _schemas(remote, "s0") == _schemas(reference, "s0")
    assert _hours(remote, "s0") == _hours(reference, "s0") == _hours(served, "s0")


@pytest.mark.slow
def test_a_failing_scheduled_export_leaves_the_server_up(store, tmp_path):
    out = tmp_path / "pq"
    (out / "_shards").mkdir(parents=True)
    proc, _, _ = start_server(
        store,
        "--audit-every",
        "0",
        "--export-parquet",
        str(out),
        "--export-every",
        "1",
        "--export-shard",
        "s0",
    )
    try:
        (out / "_shards" / "s0.json").write_text(json.dumps({"format": "something else"}))
        deadline = time.monotonic() + 60
        while not (status := RemoteReader(proc.api_url).ingest()["parquet_export"])["failures"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert "not a ctxaudit export manifest" in status["last_error"] and status["exports"] == 0
        assert RemoteReader(proc.api_url).stats().spans > 0  # still answering
    finally:
        assert stop_server(proc) == 0


@pytest.mark.slow
def test_a_foreign_manifest_stops_serve_at_the_start(store, tmp_path):
    out = tmp_path / "pq"
    (out / "_shards").mkdir(parents=True)
    (out / "_shards" / "s0.json").write_text("[]")
    r = subprocess.run(
        [sys.executable, "-m", "audit", "serve", "--db", store, "--grpc", "127.0.0.1:0", "--http", "off"]
        + ["--api", "off", "--export-parquet", str(out), "--export-shard", "s0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and str(out / "_shards" / "s0.json") in r.stderr


def test_export_server_and_db_are_exclusive(store, tmp_path):
    args = ["export", "--db", store, "--server", "http://127.0.0.1:9", "--parquet", str(tmp_path / "x")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "--db or --server" in r.output


def test_export_server_that_is_not_there_is_named(tmp_path):
    r = CliRunner().invoke(
        main, ["export", "--server", "http://127.0.0.1:9", "--parquet", str(tmp_path / "x")]
    )
    assert r.exit_code == 1 and "http://127.0.0.1:9" in r.output
    assert not (tmp_path / "x" / "_shards").exists()


def test_the_stream_is_rejected_with_bad_parameters(store, tmp_path):
    """GET /v1/export on a read API over the store (in process): bad parameters are 400s."""
    from audit.server.parquet_export import ipc_chunks
    from audit.server.read_api import ReadApi
    from audit.store.reader import StoreReader

    span_store = SpanStore(store)
    api = ReadApi(
        StoreReader(span_store, store),
        "127.0.0.1",
        0,
        span_export=lambda kind, lo, hi: ipc_chunks(span_store, kind, lo, hi),
    )
    api.start()
    try:
        remote = RemoteReader(api.url)
        for params in ({"kind": "spanz"}, {"from_ns": 5, "until_ns": 5}):
            with pytest.raises(StoreError, match="400"):
                with remote.export_batches(**({"kind": "spans", "from_ns": 0, "until_ns": 1} | params)):
                    pass
        with remote.export_batches("spans", 0, 1 << 62) as batches:
            table = batches.read_all()
        (n,) = span_store.cursor().execute("SELECT count(*) FROM spans").fetchone()
        assert table.num_rows == n and table.column_names[-2:] == ["date", "hour"]
    finally:
        api.stop()
        span_store.close()


def test_a_copy_of_the_export_folder_reads_the_same(store, tmp_path):
    """The manifest names files relative to the folder: the folder can be moved (to a bucket)."""
    m = export_store(store, str(tmp_path / "a"), shard="s0")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    check_export(tmp_path / "b", m["last_export"]["from_ns"], m["last_export"]["until_ns"])
    files = (tmp_path / "b" / "spans").as_posix() + "/**/*.parquet"
    (n,) = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{files}')").fetchall()[0]
    assert n == m["last_export"]["spans"]


def test_a_stream_cut_off_fails_the_export_and_swaps_nothing_in(store, tmp_path):
    """The server fails after the first batch: the client sees the stream incomplete (no last
    chunk), the export stops with an error, and the folder keeps what it had."""
    from audit.server.parquet_export import ipc_chunks
    from audit.server.read_api import ReadApi
    from audit.store.parquet import StreamSource, export_spans
    from audit.store.reader import StoreReader

    out = tmp_path / "pq"
    before = export_store(store, str(out), shard="s0")
    files = sorted(out.rglob("*.parquet"))
    span_store = SpanStore(store)

    def failing(kind, lo, hi):
        chunks = ipc_chunks(span_store, kind, lo, hi)
        yield next(chunks)  # the schema
        yield next(chunks)  # the first batch
        raise RuntimeError("the disk went away")

    api = ReadApi(StoreReader(span_store, store), "127.0.0.1", 0, span_export=failing)
    api.start()
    try:
        remote = RemoteReader(api.url)
        source = StreamSource(api.url, lambda: tuple(remote.time_range().values()), remote.export_batches)
        with pytest.raises(StoreError, match=f"the export stream from {api.url} was cut off"):
            export_spans(source, str(out), shard="s0")
    finally:
        api.stop()
        span_store.close()
    assert sorted(out.rglob("*.parquet")) == files
    assert read_manifest(out, "s0") == before
    assert not [p for p in out.iterdir() if p.name.startswith(".export-")]
