"""The command line's own value types: listen addresses, times, durations, times of day,
time zones. Each says what it expects when given something else (a usage error, exit 2)."""

from __future__ import annotations

from datetime import UTC, datetime

import click


def hostport(ctx, param, value):
    """A HOST:PORT listen address, or None for `off`."""
    if value in (None, "", "off"):
        return None
    from collector_ext.addresses import parse_hostport

    try:
        parse_hostport(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


class Duration(click.ParamType):
    """A length of time: 90s, 45m, 24h, 7d, 2w (a bare number is seconds)."""

    name = "DURATION"
    _UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        text = value.strip().lower()
        unit = self._UNITS.get(text[-1:], None)
        try:
            n = float(text[:-1] if unit else text)
        except ValueError:
            n = -1
        if n <= 0:
            self.fail(f"{value!r} is not a duration such as 24h, 90m or 7d", param, ctx)
        return n * (unit or 1)


class TimeOfDay(click.ParamType):
    """HH:MM or HH:MM:SS, as a datetime.time."""

    name = "HH:MM"

    def convert(self, value, param, ctx):
        from datetime import time as time_of_day

        if isinstance(value, time_of_day):
            return value
        try:
            return time_of_day.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not a time of day such as 06:30", param, ctx)


class Zone(click.ParamType):
    """An IANA time zone name, as a ZoneInfo."""

    name = "ZONE"

    def convert(self, value, param, ctx):
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        if isinstance(value, ZoneInfo):
            return value
        try:
            return ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            self.fail(f"{value!r} is not a time zone such as UTC or Europe/Paris", param, ctx)


class Time(click.ParamType):
    """An ISO 8601 time (UTC unless it says otherwise), as Unix nanoseconds."""

    name = "TIME"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            t = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 time such as 2025-11-26T00:00:00Z", param, ctx)
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        return int(t.timestamp() * 1e9)


def setting(model, name: str, *flags: str, default_from_file: bool = False, **options):
    """A click option for the setting `name` declared in `model` (audit/settings.py): its type,
    bounds, default and help come from the declaration. `flags` default to --NAME-WITH-DASHES.
    With `default_from_file`, the option's own default is None (a --config file or the
    declaration supplies it) and the help shows the declared default."""
    field = model.model_fields[name]
    if field.annotation is bool:  # an on/off flag, off by default
        return click.option(
            *(flags or ("--" + name.replace("_", "-"),)),
            name,
            is_flag=True,
            default=field.default,
            help=field.description or "",
            **options,
        )
    bounds = {}
    for m in field.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(m, key, None) is not None:
                bounds[key] = getattr(m, key)
    annotation = field.annotation
    base = next(
        (t for t in (int, float, str) if annotation is t or t in getattr(annotation, "__args__", ())), str
    )
    if base in (int, float) and bounds:
        kind = click.IntRange if base is int else click.FloatRange
        low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
        ptype = kind(low, high, min_open="gt" in bounds, max_open="lt" in bounds)
    else:
        ptype = base
    help_text = field.description or ""
    default = field.default
    if default_from_file or default is None:
        if default is not None and "[default" not in help_text:
            help_text += (
                f" [default: {default:g}]" if isinstance(default, float) else f" [default: {default}]"
            )
        kw = {"default": None}
    else:
        kw = {"default": default, "show_default": True}
    return click.option(  # `options` may override the type (e.g. a Duration for seconds)
        *(flags or ("--" + name.replace("_", "-"),)),
        name,
        **({"type": ptype, "help": help_text} | kw | options),
    )
