"""A report from an audit document: its figures, the comparison with the previous report, the
history for trends, and the gate's verdicts; then report.html, report.md and report.json in a
folder, and one line more in the history file (history.jsonl: one snapshot per report)."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from . import figures
from .compare import compare
from .gate import Threshold, Verdict, evaluate

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
HISTORY_SHOWN = 60  # reports in the trend charts
_HOP_KEYS = (
    "caller",
    "callee",
    "protocol",
    "calls",
    "propagated",
    "dropped",
    "stitched",
    "propagation_rate",
    "broken",
    "cause",
)


def snapshot(report: dict) -> dict:
    """What history.jsonl keeps of a report: enough to compare with and to draw trends."""
    return {
        "generated_at": report["generated_at"],
        "window_start": report["window"]["start"],
        "window_end": report["window"]["end"],
        "figures": report["figures"],
        "hops": [{k: h[k] for k in _HOP_KEYS} for h in report["hops"]],
    }


def build_report(
    doc: dict,
    *,
    source: str,
    since_s: float,
    history: list[dict],
    previous: dict | None = None,
    thresholds: list[Threshold] = (),
    now: datetime | None = None,
) -> dict:
    """`doc`: the audit's result document (findings left out) with `summary`. `previous`: the
    snapshot to compare with (default: the newest in `history`)."""
    now = now or datetime.now(UTC)
    run = doc["run"]
    report = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "source": source,
        "since_s": since_s,
        "window": {"start": run["window_start"], "end": run["window_end"]},
        "figures": figures.headline(doc),
        "hops": figures.hops(doc),
        "services": figures.services(doc),
        "summary": doc.get("summary", []),
        "audit": {k: doc[k] for k in ("schema_version", "run", "edges", "sampling")},
    }
    previous = previous if previous is not None else (history[-1] if history else None)
    report["comparison"] = compare(previous, snapshot(report))
    report["history"] = [
        {"generated_at": s["generated_at"], "window_end": s["window_end"], "figures": s["figures"]}
        for s in history[-HISTORY_SHOWN:]
    ]
    report["gate"] = [v.__dict__ for v in evaluate(list(thresholds), report)]
    return report


def verdicts(report: dict) -> list[Verdict]:
    return [Verdict(**v) for v in report["gate"]]


def read_history(path: Path) -> list[dict]:
    """The snapshots in a history file, oldest first; unreadable lines are skipped with a warning."""
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            item = json.loads(line)
            if {"generated_at", "figures", "hops"} <= set(item):
                out.append(item)
                continue
        except ValueError:
            pass
        log.warning("%s line %d is not a report snapshot: skipped", path, n)
    return out


def read_previous(path: str) -> dict:
    """A previous report.json (or one history line) as a snapshot; ValueError if it is neither."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise ValueError(f"{path} is not JSON: give a report.json written by `ctxaudit report`") from None
    if isinstance(data, dict) and "window" in data and "hops" in data:
        return snapshot(data)
    if isinstance(data, dict) and {"generated_at", "figures", "hops"} <= set(data):
        return data
    raise ValueError(f"{path} is not a report.json written by `ctxaudit report`")


def write_report(report: dict, out_dir: Path, history_path: Path | None = None) -> list[Path]:
    """report.html, report.md and report.json in `out_dir` (each written whole, then renamed into
    place), and the report's snapshot appended to `history_path` (default out_dir/history.jsonl)."""
    from .render import render_html, render_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        ("report.json", json.dumps(report, indent=1) + "\n"),
        ("report.md", render_markdown(report)),
        ("report.html", render_html(report)),
    ):
        path = out_dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        written.append(path)
    history_path = history_path or out_dir / "history.jsonl"
    with history_path.open("a") as f:
        f.write(json.dumps(snapshot(report)) + "\n")
    return written
