"""serve's own daily report: when it runs (time zones, daylight saving), where it goes, what it
keeps, and a real `ctxaudit serve` writing one."""

import json
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from zoneinfo import ZoneInfo

import pytest

from audit.server.audits import ServerAudits
from audit.server.daily_report import NightlyReports, next_run
from audit.server.process import start_server, stop_server
from audit.settings import AuditSettings
from audit.store.reader import StoreReader
from audit.store.writer import SpanStore
from tests.audit_helpers import simulated_store

PARIS = ZoneInfo("Europe/Paris")


def wait_for(condition, what: str, timeout: float = 120, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"the server exited before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _history_lines(reports) -> int:
    history = reports / "history.jsonl"  # appended after the report's files, one whole line
    return history.read_text().count("\n") if history.exists() else 0


def test_next_run_is_the_next_local_time_across_daylight_saving():
    at = time_of_day(6, 30)
    now = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    first = next_run(at, PARIS, now)
    assert first == datetime(2026, 3, 29, 6, 30, tzinfo=PARIS) and first.utcoffset() == timedelta(hours=2)
    assert next_run(at, PARIS, first) == datetime(2026, 3, 30, 6, 30, tzinfo=PARIS)  # strictly after
    before = next_run(at, PARIS, datetime(2026, 3, 28, 5, 0, tzinfo=UTC))
    assert before.astimezone(UTC) == datetime(2026, 3, 28, 5, 30, tzinfo=UTC)  # 06:30 at +01:00
    skipped = next_run(
        time_of_day(2, 30), PARIS, datetime(2026, 3, 28, 23, 0, tzinfo=UTC)
    )  # 02:30 does not exist
    assert skipped.date() == date(2026, 3, 29)  # that day still gets its report
    repeated = next_run(
        time_of_day(2, 30), PARIS, datetime(2026, 10, 24, 23, 0, tzinfo=UTC)
    )  # 02:30 happens twice
    assert repeated.astimezone(UTC) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # the first one


def test_old_reports_and_history_are_pruned(tmp_path):
    reports = NightlyReports(tmp_path, time_of_day(6), PARIS, 2, 86400, None, None, None, "test")
    for day in ("2026-11-24", "2026-11-25", "2026-11-26"):
        (tmp_path / day).mkdir()
        (tmp_path / day / "report.html").write_text("x")
    (tmp_path / "notes").mkdir()  # not a report folder: left alone
    lines = [
        {"generated_at": f"{d}T05:30:00Z", "window_start": 0, "window_end": 1, "figures": {}, "hops": []}
        for d in ("2026-11-24", "2026-11-25", "2026-11-26")
    ]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    reports.prune(date(2026, 11, 26))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "2026-11-25",
        "2026-11-26",
        "history.jsonl",
        "notes",
    ]
    kept = [json.loads(x)["generated_at"] for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert kept == ["2026-11-25T05:30:00Z", "2026-11-26T05:30:00Z"]


class StillClock:
    """The server's clock for the schedule, standing still: the test moves it."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.mark.slow
def test_the_daily_report_runs_once_at_its_time_on_the_servers_clock(tmp_path):
    """The schedule runs on an injected clock, a tenth of a second before 06:30 in Paris; once the
    report has begun, the clock moves on an hour: the next report is tomorrow's."""
    db, _ = simulated_store(tmp_path)
    store = SpanStore(db)
    audits = ServerAudits(store, AuditSettings(settle_s=0))
    day = datetime.now(PARIS).date()  # the history lines carry the real time: keep-days counts from it
    clock = StillClock(datetime.combine(day, time_of_day(6, 29, 59, 900_000), tzinfo=PARIS))

    def audit(*args, **kwargs):
        clock.now += timedelta(hours=1)
        return audits.audit(*args, **kwargs)

    out = tmp_path / "reports"
    stale = out / (day - timedelta(days=3)).isoformat()
    stale.mkdir(parents=True)
    reader = StoreReader(store, db)
    reports = NightlyReports(
        out, time_of_day(6, 30), PARIS, 3, 86400, audits.settings, reader.time_range, audit, db, clock=clock
    )
    reports.start()
    try:
        wait_for(lambda: _history_lines(out) == 1, "report")
    finally:
        reports.stop()  # a report in progress (its pruning included) finishes first
        store.close()
    assert sorted(p.name for p in out.iterdir()) == [day.isoformat(), "history.jsonl"]  # stale pruned
    assert _history_lines(out) == 1  # once: the next run is tomorrow's
    report = json.loads((out / day.isoformat() / "report.json").read_text())
    assert report["figures"]["broken_hops"] == 4 and report["source"] == db


@pytest.mark.slow
def test_serve_writes_its_daily_report(tmp_path):
    db, _ = simulated_store(tmp_path)
    reports = tmp_path / "reports"
    stale = reports / "2000-01-01"
    stale.mkdir(parents=True)
    lead = 6  # seconds from now to the report's time; longer if the server was not ready before it
    while True:
        at = (datetime.now(UTC) + timedelta(seconds=lead)).replace(microsecond=0)
        proc, _, _ = start_server(
            db,
            "--audit-every",
            "0",
            "--report-at",
            at.strftime("%H:%M:%S"),
            "--report-tz",
            "UTC",
            "--report-dir",
            str(reports),
            "--report-keep-days",
            "3",
        )
        if datetime.now(UTC) < at - timedelta(seconds=1):
            break  # ready well before: the report is today's (or tomorrow's, if `at` is past midnight)
        assert stop_server(proc) == 0
        lead *= 2
        assert lead < 200, "ctxaudit serve takes minutes to start"
    today = reports / at.date().isoformat()
    try:
        wait_for(lambda: _history_lines(reports) == 1, "report", proc=proc)
    finally:
        assert stop_server(proc) == 0  # a report in progress (its pruning included) finishes first
    report = json.loads((today / "report.json").read_text())
    assert report["figures"]["broken_hops"] == 4 and report["source"] == db
    assert "gateway → recommendations" in (today / "report.html").read_text()
    assert len((reports / "history.jsonl").read_text().splitlines()) == 1
    assert not stale.exists()  # older than --report-keep-days
    bad = subprocess.run(
        [sys.executable, "-m", "audit", "serve", "--report-at", "7pm"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "time of day" in bad.stderr
