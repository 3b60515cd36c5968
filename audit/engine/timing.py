"""Timing models for stitching, fitted robustly (median and MAD) from propagated calls.

A synchronous call gives two gaps: d1 = server start - client start and d2 = client end -
server end. Their sum is the call's overhead (network, queues) and holds no clock: both ends
of it are on one host each. Their difference is twice the clock skew plus the asymmetry of the
two legs, which cannot be told apart and need not be. So a candidate is scored on the overhead
(log-normal) and on the offset (Student-t, heavy-tailed). A message's lag is log-normal.
Models pooled from other edges are widened: what holds on one edge only hints at another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_FLOOR_NS = 1_000.0
_T_NU = 3.0
_NULL_Z = 2.5  # a candidate this far out on both measures is as likely as "no parent here"


@dataclass(frozen=True)
class LogNormal:
    mu: float
    sigma: float

    def nll(self, x):
        g = np.maximum(np.asarray(x, dtype=float), _FLOOR_NS)
        z = (np.log(g) - self.mu) / self.sigma
        return np.log(g) + math.log(self.sigma * math.sqrt(2 * math.pi)) + 0.5 * z * z

    def quantile(self, z: float) -> float:
        return math.exp(self.mu + z * self.sigma)

    def widened(self) -> LogNormal:
        return LogNormal(self.mu, max(2.0 * self.sigma, 1.0))

    @classmethod
    def fit(cls, samples: np.ndarray, min_sigma: float = 0.5) -> LogNormal:
        logs = np.log(np.maximum(samples, _FLOOR_NS))
        mu = float(np.median(logs))
        return cls(mu, max(1.4826 * float(np.median(np.abs(logs - mu))), min_sigma))


@dataclass(frozen=True)
class StudentT:
    loc: float
    scale: float

    def nll(self, x):
        t = (np.asarray(x, dtype=float) - self.loc) / self.scale
        return math.log(self.scale) + (_T_NU + 1) / 2 * np.log1p(t * t / _T_NU)

    @classmethod
    def fit(cls, samples: np.ndarray, min_scale: float) -> StudentT:
        loc = float(np.median(samples))
        return cls(loc, max(1.4826 * float(np.median(np.abs(samples - loc))), min_scale))


@dataclass(frozen=True)
class SyncModel:
    overhead: LogNormal  # d1 + d2
    offset: StudentT  # d1 - d2
    pairs: int
    source: str  # "edge", "callee", "protocol" or "default": how specific it is

    def nll(self, d1, d2):
        d1, d2 = np.asarray(d1, dtype=float), np.asarray(d2, dtype=float)
        return self.overhead.nll(d1 + d2) + self.offset.nll(d1 - d2)

    def null(self) -> float:
        edge = self.overhead.quantile(_NULL_Z)
        return float(self.overhead.nll(edge) + self.offset.nll(self.offset.loc + _NULL_Z * self.offset.scale))

    def reach_ns(self) -> float:
        """How far outside the client span a server span may plausibly start or end."""
        return abs(self.offset.loc) / 2 + 4 * self.offset.scale

    def pooled(self, default_skew_ns: float, source: str) -> SyncModel:
        return SyncModel(self.overhead.widened(), StudentT(0.0, default_skew_ns), self.pairs, source)

    @classmethod
    def fit(cls, d1: np.ndarray, d2: np.ndarray, source: str) -> SyncModel:
        return cls(LogNormal.fit(d1 + d2), StudentT.fit(d1 - d2, min_scale=50_000.0), len(d1), source)


@dataclass(frozen=True)
class LagModel:
    lag: LogNormal  # consumer start - producer end
    pairs: int
    source: str

    def nll(self, lag):
        lag = np.asarray(lag, dtype=float)
        reach = self.reach_ns()
        return self.lag.nll(lag) + np.where(lag < 0, 50.0 * (lag / reach) ** 2, 0.0)

    def null(self) -> float:
        return float(self.lag.nll(self.lag.quantile(_NULL_Z)))

    def reach_ns(self) -> float:
        return self.lag.quantile(3.1)

    def pooled(self, source: str) -> LagModel:
        return LagModel(self.lag.widened(), self.pairs, source)
