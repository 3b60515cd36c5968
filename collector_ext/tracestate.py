"""Parse the OpenTelemetry `ot` entry of a W3C tracestate for its sampling fields.

Per the OpenTelemetry probability-sampling spec, `ot=th:T;rv:R` where `th` is 1 to
14 hex digits of a 56-bit rejection threshold with trailing zeros dropped, and `rv`
is exactly 14 hex digits of randomness. Malformed values are flagged, never fatal.
"""

from __future__ import annotations

import re
from functools import lru_cache

_TH = re.compile(r"[0-9a-f]{1,14}")
_RV = re.compile(r"[0-9a-f]{14}")


@lru_cache(maxsize=4096)  # a fleet writes few distinct tracestates; parse each once
def parse_ot_sampling(trace_state: str) -> tuple[int | None, int | None, bool]:
    """Return (threshold, rv, invalid) from a tracestate header value."""
    ot = None
    for member in trace_state.split(","):
        key, sep, value = member.strip().partition("=")
        if key == "ot" and sep:
            ot = value
            break
    if ot is None:
        return None, None, False
    th = rv = None
    invalid = False
    for field in ot.split(";"):
        name, sep, value = field.partition(":")
        if name == "th":
            if sep and _TH.fullmatch(value):
                th = int(value.ljust(14, "0"), 16)
            else:
                invalid = True
        elif name == "rv":
            if sep and _RV.fullmatch(value):
                rv = int(value, 16)
            else:
                invalid = True
    return th, rv, invalid
