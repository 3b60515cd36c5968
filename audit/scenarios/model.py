"""The scenario file: a service topology with its traffic, latencies, samplers and context
losses, validated on load so that a typo is an error that names its place, not a quiet default.
The format is documented in docs/scenarios.md."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROTOCOLS = ("http", "grpc", "rpc", "kafka", "db", "external")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Latency(_Strict):
    """Log-normal from its median and 99th percentile, in milliseconds."""

    median: float = Field(gt=0)
    p99: float = Field(gt=0)

    @model_validator(mode="after")
    def _p99_above_median(self):
        if self.p99 < self.median:
            raise ValueError("p99 must be at least the median")
        return self

    @property
    def mu(self) -> float:
        return math.log(self.median)

    @property
    def sigma(self) -> float:
        return math.log(self.p99 / self.median) / 2.3263  # z of the 99th percentile


class Drop(_Strict):
    """How often the context is lost on this call, where, and why (the ground-truth cause)."""

    probability: float = Field(ge=0, le=1)
    cause: str
    where: Literal["wire", "thread_pool"] = (
        "wire"  # wire: callee starts a trace; thread_pool: caller's exit does
    )
    # thread_pool: how long after the handler's previous step the pool runs the work
    handoff_ms: Latency = Latency(median=0.05, p99=0.5)
    # thread_pool, on a call to a db or external peer: False for a handler that goes on at once
    handler_waits: bool = True


class Call(_Strict):
    to: str
    protocol: Literal["http", "grpc", "rpc", "kafka", "db", "external"]
    operation: str = ""  # callee operation (http "GET /x/{id}", grpc "pkg.Service/Method", topic for kafka)
    count: int = Field(default=1, ge=0)
    probability: float = Field(default=1.0, ge=0, le=1)  # code-path dependent calls
    latency_ms: Latency = Latency(median=2, p99=20)  # network and queueing around the callee
    rpc_system: str = "tcp-jsonrpc"  # for protocol rpc
    db_system: str = "postgresql"  # for protocol db
    kafka_lag_ms: Latency = Latency(median=30, p99=400)
    kafka_link: bool = False  # the consumer starts a new trace with a link to the producer
    kafka_batch: int = Field(default=1, ge=1)  # >1: one consumer span per N messages, linking to each
    record_url: bool = True  # http: False for a client that records no `url.full` (no path to match on)
    drop: Drop | None = None


class Operation(_Strict):
    duration_ms: Latency = Latency(median=5, p99=50)  # time spent in the service itself
    error_rate: float = Field(default=0.0, ge=0, le=1)
    calls: list[Call] = []


class Sampler(_Strict):
    type: Literal["parent_based", "independent", "always_on"] = "parent_based"
    probability: float = Field(default=1.0, gt=0, le=1)  # of the root decision (parent_based) or every span
    writes_threshold: bool = True  # False: an SDK that does not write `ot=th` to the tracestate


class Service(_Strict):
    sampler: Sampler = Sampler()
    clock_skew_ms: float = 0.0
    port: int = 8080
    operations: dict[str, Operation] = {}


class Entrypoint(_Strict):
    service: str
    operation: str
    rate_per_s: float | None = Field(default=None, gt=0)  # Poisson arrivals
    every_s: float | None = Field(default=None, gt=0)  # a scheduled job

    @model_validator(mode="after")
    def _one_schedule(self):
        if (self.rate_per_s is None) == (self.every_s is None):
            raise ValueError("give exactly one of rate_per_s and every_s")
        return self


class Scenario(_Strict):
    name: str
    description: str = ""
    start_unix_s: float = (
        1_764_115_200.0  # 2025-11-26T00:00:00Z: fixed, so the same seed gives the same bytes
    )
    duration_s: float = Field(default=60, gt=0)
    services: dict[str, Service]
    entrypoints: list[Entrypoint] = Field(min_length=1)

    @model_validator(mode="after")
    def _references_resolve(self):
        for e in self.entrypoints:
            self._operation(e.service, e.operation, f"entrypoint {e.service}:{e.operation}")
        for name, service in self.services.items():
            for op_name, op in service.operations.items():
                for call in op.calls:
                    where = f"services.{name}.operations[{op_name!r}] call to {call.to}"
                    if call.protocol in ("db", "external"):
                        continue  # uninstrumented peers: no service entry needed
                    self._operation(call.to, call.operation, where)
        return self

    def _operation(self, service: str, operation: str, where: str) -> Operation:
        if service not in self.services:
            raise ValueError(f"{where}: unknown service {service!r}")
        ops = self.services[service].operations
        if operation not in ops:
            raise ValueError(
                f"{where}: service {service!r} has no operation {operation!r} (has {sorted(ops)})"
            )
        return ops[operation]


class ScenarioError(ValueError):
    pass


BUNDLED = Path(__file__).parent / "data"


def load_scenario(path_or_name: str) -> Scenario:
    """Load a scenario file, or a bundled scenario by name (see `bundled_scenarios()`)."""
    path = Path(path_or_name)
    if not path.exists() and (BUNDLED / f"{path_or_name}.yaml").exists():
        path = BUNDLED / f"{path_or_name}.yaml"
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ScenarioError(
            f"cannot read scenario {path_or_name!r}: {e.strerror}; "
            f"bundled ones: {', '.join(bundled_scenarios())}"
        ) from None
    except yaml.YAMLError as e:
        raise ScenarioError(f"{path}: not valid YAML: {e}") from None
    try:
        return Scenario.model_validate(doc)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()
        )
        raise ScenarioError(f"{path}: {problems}") from None


def bundled_scenarios() -> list[str]:
    return sorted(p.stem for p in BUNDLED.glob("*.yaml"))
