"""The store's own errors: `duckdb.Error` is translated here, at the boundary, into
messages that say what to do. `transient` tells the receivers whether a client may retry."""

from __future__ import annotations

import re

import duckdb


class StoreError(Exception):
    transient = False


class StoreLocked(StoreError):
    """Another process holds the DB file (DuckDB allows one writer or many readers)."""


class StoreCorrupt(StoreError):
    pass


class StoreMissing(StoreError):
    pass


class StoreUnavailable(StoreError):
    """A write failed for a reason that may pass (disk full, I/O error): retry later."""

    transient = True


_LOCK_PID = re.compile(r"Conflicting lock is held in (.*) \(PID (\d+)\)")


def translate(error: duckdb.Error, path: str, *, writing: bool) -> StoreError:
    text = str(error)
    if "Could not set lock" in text:
        m = _LOCK_PID.search(text)
        holder = f" by {m.group(1)} (PID {m.group(2)})" if m else ""
        return StoreLocked(
            f"{path} is locked{holder}. DuckDB lets one process write a file, or many read it, "
            "never both. If it is `ctxaudit serve`, read through it: --server http://127.0.0.1:4319 "
            "(its --api address); otherwise stop that process, or use another --db file."
        )
    if "not a valid DuckDB database file" in text or "Corrupt" in text or "checksum" in text.lower():
        return StoreCorrupt(
            f"{path} is not a readable ctxaudit/DuckDB database ({text}). "
            "Move it aside and start with a new --db file; nothing else will be written to it."
        )
    if "does not exist" in text or "No such file" in text:
        return StoreMissing(
            f"{path} does not exist (or its folder does not): "
            + ("create the folder first." if writing else "run `ctxaudit serve --db PATH` to create it.")
        )
    if "No space left" in text or "disk" in text.lower():
        return StoreUnavailable(
            f"cannot write to {path}: {text}. Free some disk space; writes resume by themselves."
        )
    return StoreUnavailable(f"DuckDB error on {path}: {text}") if writing else StoreError(f"{path}: {text}")
