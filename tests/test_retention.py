"""Retention: spans past the age or size limit are deleted in the background, oldest first,
with their links; what the audits saved stays; a running server keeps ingesting meanwhile."""

import time

import duckdb
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

from audit.read.remote import RemoteReader
from audit.server.process import start_server, stop_server
from audit.store.reader import LocalReader
from audit.store.retention import Retention
from tests.audit_helpers import audited_store
from tests.serve_helpers import wait_loaded
from tests.test_roundtrip_sdk import emit

DAY = 86_400 * 10**9


def _counts(db: str) -> tuple[int, int, int, int]:
    con = duckdb.connect(db, read_only=True)
    try:
        return con.execute("""SELECT (SELECT count(*) FROM spans), (SELECT count(*) FROM span_links),
                                     (SELECT count(*) FROM audit_runs),
                                     (SELECT count(*) FROM audit_findings)""").fetchone()
    finally:
        con.close()


@pytest.mark.slow
def test_age_limit_deletes_old_spans_and_their_links_and_keeps_the_audits(tmp_path):
    db = audited_store(tmp_path)  # spans of 2025-11-26, with one saved run
    spans, links, runs, findings = _counts(db)
    assert spans == 774 and links > 0 and runs == 1 and findings > 0
    con = duckdb.connect(db)
    (newest,) = con.execute("SELECT max(start_ns) FROM spans").fetchone()
    keep_after = newest - 5 * 10**9  # the last five seconds of the scenario stay
    days = (time.time_ns() - keep_after) / DAY
    pruned = Retention(con, db, days=days).prune_once()
    (left, oldest_left) = con.execute("SELECT count(*), min(start_ns) FROM spans").fetchone()
    orphan_links = con.execute("""SELECT count(*) FROM span_links l WHERE NOT EXISTS
                                    (SELECT 1 FROM spans s
                                     WHERE s.trace_id = l.trace_id AND s.span_id = l.span_id)""").fetchone()[
        0
    ]
    con.close()
    assert 0 < pruned.spans < spans and left == spans - pruned.spans and oldest_left >= keep_after - 10**9
    assert orphan_links == 0 and pruned.links > 0
    assert _counts(db)[2:] == (runs, findings)  # the saved audit is untouched
    reader = LocalReader(db)
    try:
        assert reader.audit_run()["edges"] and reader.findings()["total"] == findings
    finally:
        reader.close()


def test_size_limit_deletes_the_oldest_first_and_not_twice_before_a_checkpoint(tmp_path, monkeypatch):
    db = audited_store(tmp_path)
    con = duckdb.connect(db)
    starts = [r[0] for r in con.execute("SELECT start_ns FROM spans ORDER BY start_ns").fetchall()]
    block_size, used = con.execute("SELECT block_size, used_blocks FROM pragma_database_size()").fetchone()
    # no checkpoint after the delete: what it freed is not counted yet, as while the writer is busy
    monkeypatch.setattr(Retention, "_checkpoint", staticmethod(lambda con: None))
    retention = Retention(con, db, max_bytes=used * block_size // 2)
    first = retention.prune_once()
    kept = [r[0] for r in con.execute("SELECT start_ns FROM spans ORDER BY start_ns").fetchall()]
    assert 0 < first.spans < len(starts) and kept == starts[first.spans :]  # exactly the oldest went
    assert retention.prune_once().spans == 0  # the size still reads as before: it does not delete twice
    con.close()
    assert Retention(duckdb.connect(db, read_only=True), db, max_bytes=1 << 40).prune_once().spans == 0


@pytest.mark.slow
def test_serve_prunes_in_the_background_while_it_ingests(tmp_path):
    db = audited_store(tmp_path)
    proc, grpc_port, _ = start_server(db, "--retain-days", "30", "--audit-every", "0")
    try:
        remote = RemoteReader(proc.api_url)

        def exporter():  # emit shuts its exporter down
            return GrpcExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True)

        traces = [emit(exporter(), "fresh")[0] for _ in range(5)]
        deadline = time.monotonic() + 60
        while remote.stats().spans != 5:  # the scenario's spans are a year old
            assert time.monotonic() < deadline, f"still {remote.stats().spans} spans"
            time.sleep(0.5)
        traces.append(emit(exporter(), "fresh")[0])
        wait_loaded(remote)  # acknowledged, then loaded from the staging log
        assert remote.stats().spans == 6 and all(remote.trace(t) for t in traces)
        run = remote.audit_run()
        assert run["run_id"] == 1 and remote.findings()["total"] > 0  # the audit survived its spans
        old = remote.findings(kind="orphan_root", limit=1)["findings"][0]
        assert remote.trace(int(old["trace_id"], 16)) == []
    finally:
        assert stop_server(proc) == 0
