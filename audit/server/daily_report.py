"""The report `ctxaudit serve` writes itself every day at a set time in a set time zone: into
DIR/YYYY-MM-DD/ (the local date), compared with the one before through DIR/history.jsonl,
keeping N days of reports. A failed report is logged; the next day's tries again."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from ..report import sources
from ..report.build import build_report, read_history, write_report
from ..settings import AuditSettings
from .periodic import Periodic

log = logging.getLogger(__name__)


def next_run(at: time, tz: ZoneInfo, now: datetime) -> datetime:
    """The next `at` o'clock in `tz` strictly after `now` (aware). On a day when the clock skips
    `at` (spring forward), the run happens at the same wall time read in the old offset, so a
    day is never skipped; when the clock repeats it, the first occurrence counts."""
    local = now.astimezone(tz)
    day = local.date()
    while True:
        candidate = datetime.combine(day, at, tzinfo=tz)
        if candidate > now:
            return candidate
        day += timedelta(days=1)


class NightlyReports:
    def __init__(
        self,
        out_dir: Path,
        at: time,
        tz: ZoneInfo,
        keep_days: int,
        since_s: float,
        settings: AuditSettings,
        time_range: Callable[[], dict],
        audit: Callable,
        source: str,
        clock: Callable[[], datetime] = lambda: datetime.now().astimezone(),
    ):
        self.out_dir, self.at, self.tz, self.keep_days, self.since_s = out_dir, at, tz, keep_days, since_s
        self.settings, self.time_range, self.audit, self.source, self.clock = (
            settings,
            time_range,
            audit,
            source,
            clock,
        )
        self._schedule = Periodic("nightly-report", self._until_next, self.report_once)

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "nightly report at %s %s into %s (next %s)",
            self.at.isoformat("seconds"),
            self.tz.key,
            self.out_dir,
            next_run(self.at, self.tz, self.clock()).isoformat(timespec="seconds"),
        )
        self._schedule.start()

    def stop(self) -> None:
        self._schedule.stop()

    def _until_next(self) -> float:
        return (next_run(self.at, self.tz, self.clock()) - self.clock()).total_seconds()

    def report_once(self) -> Path | None:
        today = self.clock().astimezone(self.tz).date()
        out = self.out_dir / today.isoformat()
        history_path = self.out_dir / "history.jsonl"
        try:
            doc = sources.in_server(self.time_range, self.audit, self.settings, self.since_s)
            report = build_report(
                doc, source=self.source, since_s=self.since_s, history=read_history(history_path)
            )
            write_report(report, out, history_path)
        except Exception:  # the server goes on whatever a report meets
            log.exception("the nightly report failed; the next one tries again")
            return None
        log.info(
            "nightly report written to %s: %d broken hops",
            out / "report.html",
            report["figures"]["broken_hops"],
        )
        self.prune(today)
        return out

    def prune(self, today: date) -> None:
        """Remove the dated folders and history lines older than keep_days."""
        oldest = today - timedelta(days=self.keep_days - 1)
        for folder in self.out_dir.iterdir():
            try:
                day = date.fromisoformat(folder.name)
            except ValueError:
                continue  # not one of ours
            if folder.is_dir() and day < oldest:
                shutil.rmtree(folder, ignore_errors=True)
                log.info("removed the report of %s (older than %d days)", folder.name, self.keep_days)
        history_path = self.out_dir / "history.jsonl"
        kept = [
            s
            for s in read_history(history_path)
            if datetime.fromisoformat(s["generated_at"]).astimezone(self.tz).date() >= oldest
        ]
        tmp = history_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(s) + "\n" for s in kept))
        tmp.replace(history_path)
