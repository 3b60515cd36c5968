"""Timing models for stitching, fitted robustly (median and MAD) from propagated calls.

A synchronous call gives two gaps: d1 = server start - client start and d2 = client end -
server end. Their sum is the call's overhead (network, queues) and holds no clock: both ends
of it are on one host each. Their difference is twice the clock skew plus the asymmetry of the
two legs, which cannot be told apart and need not be. So a candidate is scored on the overhead
(log-normal) and on the offset (Student-t, heavy-tailed). A message's lag is log-normal.
Models pooled from other edges are widened: what holds on one edge only hints at another.

An edge with enough propagated calls is scored on the joint density of its two gaps as the
calls show it (`EmpiricalLegs`), mixed with the parametric model for what lies beyond them:
real legs stall on one side at a time (a client that queues before sending, a response held
100 ms), so the true pairs are a few modes, not one log-normal, and a server span sitting in
the middle of a long client span (both gaps large) is what an unrelated call looks like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

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


_LEGS_MIN_PAIRS = 200  # propagated calls an edge needs before its gaps' own density is used
_LEGS_BINS = 128
_LEGS_PARAMETRIC = 0.1  # the parametric model's share of the mixture: what lies beyond the calls seen
# the share of true pairs that may cost more than "no parent": the parametric model's own share,
# within these bounds (on well-shaped legs it is 0.5-3%)
_NULL_SHARE = (0.005, 0.05)


@dataclass(frozen=True, eq=False)
class EmpiricalLegs:
    """The joint density of (d1, d2) on an edge's propagated calls: a 2-D histogram smoothed with
    a Gaussian kernel, on u = asinh(d / s) per gap (s its median size): near-linear around zero,
    where clock skew puts negative gaps, and logarithmic for the long stalls, so one grid holds
    both a 0.5 ms leg and a 400 ms one."""

    scale: tuple[float, float]
    lo: tuple[float, float]
    step: tuple[float, float]
    density: np.ndarray  # (_LEGS_BINS, _LEGS_BINS), per unit of u1 x u2

    def pdf(self, d1, d2) -> np.ndarray:
        """The density per ns^2 at (d1, d2); 0 outside the grid."""
        out = np.ones(np.broadcast(d1, d2).shape)
        index = []
        for d, s, lo, step in zip((d1, d2), self.scale, self.lo, self.step):
            d = np.asarray(d, dtype=float)
            index.append(np.floor((np.arcsinh(d / s) - lo) / step).astype(np.int64))
            out = out / np.sqrt(s * s + d * d)  # du/dd
        i, j = index
        inside = (i >= 0) & (i < _LEGS_BINS) & (j >= 0) & (j < _LEGS_BINS)
        f = self.density[np.clip(i, 0, _LEGS_BINS - 1), np.clip(j, 0, _LEGS_BINS - 1)]
        return np.where(inside, f * out, 0.0)

    @classmethod
    def fit(cls, d1: np.ndarray, d2: np.ndarray) -> EmpiricalLegs:
        n = len(d1)
        scale, lo, step, coords, bandwidth = [], [], [], [], []
        for d in (np.asarray(d1, dtype=float), np.asarray(d2, dtype=float)):
            s = max(float(np.median(np.abs(d))), 10_000.0)
            u = np.arcsinh(d / s)
            iqr = float(np.subtract(*np.percentile(u, [75, 25])))
            spread = min(float(np.std(u)), iqr / 1.349) or float(np.std(u)) or 0.1
            h = max(0.9 * spread * n ** (-1 / 6), 0.02)  # Silverman's rule, two dimensions
            a, b = np.percentile(u, [0.1, 99.9])
            scale.append(s)
            lo.append(a - 4 * h)
            step.append((b - a + 8 * h) / _LEGS_BINS)
            coords.append(u)
            bandwidth.append(h)
        counts, _, _ = np.histogram2d(
            coords[0],
            coords[1],
            bins=_LEGS_BINS,
            range=[(lo[0], lo[0] + _LEGS_BINS * step[0]), (lo[1], lo[1] + _LEGS_BINS * step[1])],
        )
        smooth = gaussian_filter(counts, (bandwidth[0] / step[0], bandwidth[1] / step[1]), mode="constant")
        return cls((scale[0], scale[1]), (lo[0], lo[1]), (step[0], step[1]), smooth / (n * step[0] * step[1]))


@dataclass(frozen=True)
class SyncModel:
    overhead: LogNormal  # d1 + d2
    offset: StudentT  # d1 - d2
    pairs: int
    source: str  # "edge", "callee", "protocol" or "default": how specific it is
    legs: EmpiricalLegs | None = None  # the calls' own density, where there were enough of them
    legs_null: float = 0.0  # the "no parent" price on that density

    def nll(self, d1, d2):
        d1, d2 = np.asarray(d1, dtype=float), np.asarray(d2, dtype=float)
        parametric = self.overhead.nll(d1 + d2) + self.offset.nll(d1 - d2)
        if self.legs is None:
            return parametric
        # the parametric density is per unit of (overhead, offset): per ns^2 of (d1, d2) it is twice that
        mixed = (1 - _LEGS_PARAMETRIC) * self.legs.pdf(d1, d2) + _LEGS_PARAMETRIC * 2.0 * np.exp(-parametric)
        return -np.log(np.maximum(mixed, 1e-300))

    def _parametric_null(self) -> float:
        edge = self.overhead.quantile(_NULL_Z)
        return float(self.overhead.nll(edge) + self.offset.nll(self.offset.loc + _NULL_Z * self.offset.scale))

    def null(self) -> float:
        return self.legs_null if self.legs is not None else self._parametric_null()

    def reach_ns(self) -> float:
        """How far outside the client span a server span may plausibly start or end."""
        return abs(self.offset.loc) / 2 + 4 * self.offset.scale

    def pooled(self, default_skew_ns: float, source: str) -> SyncModel:
        return SyncModel(self.overhead.widened(), StudentT(0.0, default_skew_ns), self.pairs, source)

    @classmethod
    def fit(cls, d1: np.ndarray, d2: np.ndarray, source: str) -> SyncModel:
        model = cls(LogNormal.fit(d1 + d2), StudentT.fit(d1 - d2, min_scale=50_000.0), len(d1), source)
        if source != "edge" or len(d1) < _LEGS_MIN_PAIRS:
            return model
        # "No parent" is priced where the parametric model prices it, as the share of true pairs
        # that cost more (within _NULL_SHARE: a parametric model that misses a mode of the legs
        # puts a quarter of the true pairs beyond its price), measured on calls the density was
        # not fitted on (two halves, each scored by the other's density: in-sample, each call's
        # own kernel would make it look likelier than a new call).
        beyond = float(np.mean(model.nll(d1, d2) > model._parametric_null()))
        share = min(max(beyond, _NULL_SHARE[0]), _NULL_SHARE[1])
        half = np.arange(len(d1)) % 2 == 0
        held = []
        for fit_on in (half, ~half):
            legs = cls(
                model.overhead, model.offset, model.pairs, source, EmpiricalLegs.fit(d1[fit_on], d2[fit_on])
            )
            held.append(legs.nll(d1[~fit_on], d2[~fit_on]))
        null = float(np.quantile(np.concatenate(held), 1.0 - share))
        return cls(model.overhead, model.offset, model.pairs, source, EmpiricalLegs.fit(d1, d2), null)


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
