"""serve's own daily report: when it runs (time zones, daylight saving), where it goes, what it
keeps, and a real `ctxaudit serve` writing one."""

import json
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from zoneinfo import ZoneInfo

from audit.server.daily_report import NightlyReports, next_run
from audit.server.process import start_server, stop_server
from tests.audit_helpers import simulated_store

PARIS = ZoneInfo("Europe/Paris")


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


def test_serve_writes_its_daily_report(tmp_path):
    db, _ = simulated_store(tmp_path)
    reports = tmp_path / "reports"
    stale = reports / "2000-01-01"
    stale.mkdir(parents=True)
    at = (datetime.now(UTC) + timedelta(seconds=6)).strftime("%H:%M:%S")
    proc, _, _ = start_server(
        db,
        "--audit-every",
        "0",
        "--report-at",
        at,
        "--report-tz",
        "UTC",
        "--report-dir",
        str(reports),
        "--report-keep-days",
        "3",
    )
    try:
        today = reports / datetime.now(UTC).date().isoformat()
        deadline = time.monotonic() + 120
        while not (today / "report.html").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no report after 120 s"
            time.sleep(0.5)
        time.sleep(1)  # the history line follows the files
    finally:
        assert stop_server(proc) == 0
    report = json.loads((today / "report.json").read_text())
    assert report["figures"]["broken_hops"] == 4 and report["source"] == db
    assert "gateway → recommendations" in (today / "report.html").read_text()
    assert len((reports / "history.jsonl").read_text().splitlines()) == 1
    assert not stale.exists()  # older than --report-keep-days
    bad = subprocess.run(
        [sys.executable, "-m", "audit", "serve", "--report-at", "7pm"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "time of day" in bad.stderr
