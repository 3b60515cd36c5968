"""Every setting declared once: name, type, default, bounds and help. The command line's
options (audit/cli_params.py derives them), the audit's `--config` YAML, the read API's audit
requests and `serve`'s configuration all validate with these models, so no default or bound
is written twice. Invalid values are errors that name the setting (`SettingsError`).
A leaf: pydantic and YAML only, so every layer may read its declarations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_MIB = 1 << 20


class SettingsError(ValueError):
    """A setting is unknown, of the wrong type or out of bounds; the message names it."""


def explain(
    error: ValidationError, model: type[BaseModel], where: str = "", noun: str = "setting"
) -> SettingsError:
    """One readable line per problem, naming the setting (or key, or parameter) and what it
    accepts."""
    unknown = [str(e["loc"][-1]) for e in error.errors() if e["type"] == "extra_forbidden"]
    lines = []
    if unknown:
        lines.append(f"unknown {noun}(s) {sorted(unknown)}; known: {sorted(model.model_fields) or 'none'}")
    for e in error.errors():
        if e["type"] == "extra_forbidden":
            continue
        name = ".".join(str(part) for part in e["loc"][:1]) or "the settings"
        if e["type"] == "missing":
            lines.append(f"missing {noun} {name!r}")
        else:
            lines.append(
                f"{noun} {name!r} {_accepts(model, e)}"
                if noun == "parameter"
                else f"{name} {_accepts(model, e)}"
            )
    return SettingsError(where + "; ".join(lines))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _description(field) -> str | None:
    """The field's help, or that of the annotated type inside an optional one."""
    if field is None:
        return None
    if field.description:
        return field.description
    for arg in getattr(field.annotation, "__args__", ()):
        for meta in getattr(arg, "__metadata__", ()):
            if getattr(meta, "description", None):
                return meta.description
    return None


def _accepts(model: type[BaseModel], e: dict) -> str:
    field = model.model_fields.get(str(e["loc"][0])) if e["loc"] else None
    help_text = _description(field)
    got = f"got {_short(e['input'])}" + (f"; {help_text}" if help_text else "")
    bounds = e.get("ctx") or {}
    low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
    if e["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        if field is not None:  # the declared range, both ends, where there are two
            for m in field.metadata:
                low = next((v for k in ("ge", "gt") if (v := getattr(m, k, None)) is not None), low)
                high = next((v for k in ("le", "lt") if (v := getattr(m, k, None)) is not None), high)
        if low is not None and high is not None:
            return f"must be between {low:g} and {high:g} ({got})"
        if low is not None:
            return f"must be {'at least' if 'ge' in bounds else 'above'} {low:g} ({got})"
        return f"must be {'at most' if 'le' in bounds else 'below'} {high:g} ({got})"
    if e["type"] == "finite_number":
        return "must be a finite number"
    if e["type"] == "literal_error":
        return f"must be one of {e['ctx']['expected']} ({got})"
    if e["type"].startswith(("float", "int")):
        return f"must be {'an integer' if e['type'].startswith('int') else 'a number'} ({got})"
    if e["type"].startswith("bool"):
        return "must be true or false"
    if e["type"] == "value_error":
        return str(e["ctx"]["error"])
    return e["msg"][0].lower() + e["msg"][1:]


class AuditConfig(BaseModel):
    """How the audit engine judges."""

    # finite numbers only, nothing unknown: a NaN bound would silently change the findings
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    entrypoints: frozenset[str] = Field(
        frozenset(),
        description="Real entry points, services (SVC) or operations (SVC:OPERATION), whose roots are not "
        "orphans, besides those learned.",
    )
    min_confidence: float = Field(
        0.6, ge=0.0, le=1.0, description="Name a probable parent only at this confidence or above."
    )
    default_skew_ms: float = Field(
        50.0,
        ge=0.0,
        le=60_000.0,
        description="Clock skew allowed on an edge whose skew could not be learned from propagated calls.",
    )
    default_max_lag_s: float = Field(
        60.0,
        gt=0.0,
        le=86_400.0,
        description="Longest producer-to-consumer lag a stitching candidate may have "
        "(caps the learned lags).",
    )
    entry_candidate_share: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="A service whose roots have stitching candidates less often than this is an entry point.",
    )
    assume_sampling_probability: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Sampling probability of spans without ot=th; unset: their adjusted count is unknown, "
        "and the sampling figures leave them out (and count them).",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, value, info):
        # JSON's true would otherwise pass as 1.0
        if isinstance(value, bool) and info.field_name not in ("entrypoints", "calibrate"):
            raise ValueError("must be a number, not true or false")
        return value

    calibrate: bool = Field(
        True,
        description="Check the stitching confidences against propagated calls cut on purpose, and lower "
        "those that over-promise (docs/audit.md); off: raw confidences, and a faster audit (about 40% "
        "of the time at 10M spans).",
    )

    def is_configured_entry(self, service: str, operation: str) -> bool:
        return service in self.entrypoints or f"{service}:{operation}" in self.entrypoints


class AuditSettings(AuditConfig):
    """How an audit judges (the engine's `AuditConfig`) and which window it reads."""

    settle_s: float = Field(
        60.0, ge=0.0, le=7 * 86_400.0, description="Seconds to wait for late spans before auditing them."
    )
    context_s: float = Field(
        120.0,
        ge=0.0,
        le=86_400.0,
        description="Seconds read either side of the window for parents, children and candidates.",
    )

    @field_validator("entrypoints", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        """`--entrypoints a,b` and a YAML list both work."""
        if isinstance(value, str):
            return frozenset(e.strip() for e in value.split(",") if e.strip())
        if isinstance(value, (list, tuple, set, frozenset)) and not all(isinstance(e, str) for e in value):
            raise ValueError("must be a list of SVC or SVC:OPERATION strings")
        return value

    @property
    def config(self) -> AuditConfig:
        """The engine's part."""
        return AuditConfig(**self.model_dump(include=set(AuditConfig.model_fields)))

    @classmethod
    def load(cls, path: str | None, **overrides) -> AuditSettings:
        """From an optional YAML file of these settings, then the non-None `overrides`.
        `to_dict` gives what this reads back."""
        doc: dict = {}
        if path is not None:
            try:
                doc = yaml.safe_load(Path(path).read_text()) or {}
            except OSError as e:
                raise SettingsError(f"cannot read {path}: {e.strerror}") from None
            except yaml.YAMLError as e:
                raise SettingsError(f"{path}: not valid YAML: {e}") from None
            if not isinstance(doc, dict):
                raise SettingsError(f"{path}: expected a mapping of settings")
        doc |= {k: v for k, v in overrides.items() if v is not None}
        return cls.parse(doc, where=f"{path}: " if path else "")

    @classmethod
    def parse(cls, doc: object, where: str = "") -> AuditSettings:
        if not isinstance(doc, dict):
            raise SettingsError(f"{where}settings must be an object (the keys of `ctxaudit audit --config`)")
        try:
            return cls.model_validate(doc)
        except ValidationError as e:
            raise explain(e, cls, where) from None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json") | {"entrypoints": sorted(self.entrypoints)}


class ServeSettings(BaseModel):
    """`ctxaudit serve`'s tuning: ingest limits, the store, its scheduled work."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    audit_every: float = Field(
        300.0,
        ge=0.0,
        description="Audit the newest settled window this often (seconds), and save the run (the UI shows "
        "it); 0: never.",
    )
    audit_settle: float = Field(
        AuditSettings.model_fields["settle_s"].default,
        ge=0.0,
        le=AuditSettings.model_fields["settle_s"].metadata[1].le,
        description="How long the periodic audit waits for late spans before a window counts as settled.",
    )
    max_body_mib: float = Field(
        16.0,
        ge=0.001,
        description="Largest request accepted, after decompression (413 / RESOURCE_EXHAUSTED).",
    )
    queue_spans: int = Field(
        200_000, ge=1, description="Spans waiting for commit before requests are refused (retryable)."
    )
    inflight_mib: float = Field(
        256.0, ge=0.001, description="Request bytes being decoded or committed before requests are refused."
    )
    staging_mib: int = Field(
        256,
        ge=0,
        description="Disk space of the staging log (DB's name + '.staging/'): requests are acknowledged "
        "once their spans are fsync'd there, and loaded into DB within about a second; beyond it requests "
        "are refused (retryable). 0: no staging log, acknowledge after the DuckDB commit.",
    )
    decoders: int | None = Field(
        None,
        ge=0,
        description="Decode worker processes [default: CPU count]; 0 decodes in the server process.",
    )
    memory_limit: str = Field("512MB", description="DuckDB memory limit of the store.")
    audit_max_rss_mib: int = Field(
        4096,
        ge=256,
        description="The server's resident memory at which an audit it runs is stopped (its answer, the log "
        "and /v1/ingest say so); ingestion is not affected.",
    )
    checkpoint_mib: int = Field(
        128, ge=1, description="WAL size at which DuckDB checkpoints; larger is faster but replays longer."
    )
    drain_timeout: float = Field(
        30.0, ge=0.0, description="Seconds to let requests in flight finish on SIGTERM/SIGINT."
    )
    log_interval: float = Field(
        10.0, ge=0.0, description="Seconds between ingest progress lines on stderr; 0 for none."
    )
    header_timeout: float = Field(
        10.0,
        gt=0.0,
        le=3600.0,
        description="Seconds a client has to send a request's head (request line and headers) after it "
        "connects, or after its first byte following a response; also the TLS and HTTP/2 handshakes.",
    )
    idle_timeout: float = Field(
        60.0, gt=0.0, le=86_400.0, description="Seconds an idle keep-alive connection stays open."
    )
    stall_timeout: float = Field(
        30.0,
        gt=0.0,
        le=3600.0,
        description="Seconds a request body may stop arriving, or a response stop leaving, before the "
        "connection is closed.",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Open connections per listener (OTLP/gRPC, OTLP/HTTP, read API); lowered to fit the "
        "file descriptor limit. Beyond it a new connection closes the oldest idle or unfinished one.",
    )
    metrics_public: bool = Field(
        False,
        description="Serve the read API's /metrics without the token (--token-file) that every other "
        "route requires: for a Prometheus that cannot send it.",
    )
    metrics_max_edges: int = Field(
        1000,
        ge=0,
        le=100_000,
        description="Edges (caller, callee, protocol) given series on /metrics, broken and busiest first; "
        "the rest are counted in ctxaudit_edges_omitted.",
    )
    report_keep_days: int = Field(30, ge=1, description="Days of daily reports kept; older ones are removed.")
    retain_days: float | None = Field(
        None, gt=0.0, description="Delete spans that started more than DAYS ago [default: keep all]."
    )
    retain_gib: float | None = Field(
        None,
        gt=0.0,
        description="Delete the oldest spans once the stored data exceed GIB [default: no limit].",
    )
    export_otlp: str | None = Field(
        None,
        pattern=r"^(grpcs?|https?)://[^/\s]+(/\S*)?$",
        max_length=2048,
        description="After each audit, send its stitched hops as spans into their probable parents' "
        "traces at this OTLP endpoint (grpc://HOST:4317, http://HOST:4318), as `ctxaudit export --otlp`, "
        "on a thread of its own; what was sent is kept in DB's name + '.otlp-export' [default: never].",
    )
    export_parquet: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="Export every settled hour of spans as Parquet into this folder, as `ctxaudit export "
        "--parquet` does (under shard=--export-shard), every --export-every; for `ctxaudit audit --spark` "
        "(docs/scale.md) [default: never].",
    )
    export_every: float = Field(
        3600.0,
        ge=1.0,
        description="How often --export-parquet looks for newly settled hours (an hour is settled once "
        "--audit-settle has passed since its end).",
    )
    export_shard: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$",
        max_length=200,
        description="This server's name among the shards sharing --export-parquet's folder [default: the "
        "host name].",
    )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mib * _MIB)

    @property
    def inflight_bytes(self) -> int:
        return int(self.inflight_mib * _MIB)

    @property
    def staging_bytes(self) -> int:
        return self.staging_mib * _MIB

    @property
    def retain_bytes(self) -> int | None:
        return int(self.retain_gib * (1 << 30)) if self.retain_gib else None


# the audit's DuckDB memory when a command opens the file itself (`audit`, `report` with --db)
AUDIT_MEMORY_LIMIT = "2GB"
# how far back a report reaches (`ctxaudit report --since`, `serve --report-since`)
REPORT_SINCE = "24h"


class AuditRequest(BaseModel):
    """What one audit is asked to do: `ctxaudit audit`'s window options, and the JSON body of
    the read API's `POST /v1/audit`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    settings: AuditSettings = Field(
        default_factory=AuditSettings, description="As `ctxaudit audit --config`."
    )
    since_ns: int | None = Field(
        None,
        ge=0,
        lt=1 << 64,
        description="Window start, Unix nanoseconds [default: where the last run ended].",
    )
    until_ns: int | None = Field(
        None,
        ge=0,
        lt=1 << 64,
        description="Window end, Unix nanoseconds [default: now minus the settle time].",
    )
    all: bool = Field(False, description="Start at the first span, not where the last run ended.")
    save: bool = Field(True, description="Store the run.")

    @property
    def resume(self) -> bool:
        return not self.all and self.since_ns is None

    @classmethod
    def parse(cls, body: object) -> AuditRequest:
        if not isinstance(body, dict):
            raise SettingsError("the body must be a JSON object")
        settings = AuditSettings.parse(body.get("settings", {}), where="settings: ")
        try:
            return cls.model_validate(body | {"settings": settings})
        except ValidationError as e:
            raise explain(e, cls, noun="key") from None
