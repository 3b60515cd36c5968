"""The CI gate: `--fail-on EXPR` thresholds over a report's figures. EXPR says when to fail:

    EXPR    := FIGURE OP NUMBER['%']
    FIGURE  := NAME | NAME '[' CALLER '->' CALLEE ']' | NAME '[' SERVICE ']'
    OP      := '>' | '>=' | '<' | '<=' | '==' | '!='

e.g. `orphan_rate>0.01`, `new_broken_hops>0`, `propagation_rate[orders->inventory]<99%`.
The names are below (docs/report.md lists them). A hop's figures add up its protocols; a
figure that cannot be computed (no such hop in the window, no previous report, no sampled
spans) neither passes nor fails: it is reported as not evaluated, with its own exit code."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from ..contract.figures import propagation_rate
from .figures import HEADLINE, HOP_SAMPLING

EXIT_FAILED = 3  # a threshold was crossed
EXIT_NOT_EVALUATED = 4  # none crossed, but one could not be evaluated

COMPARISON = {
    "new_broken_hops": "hops broken now that were not broken (or not seen) in the previous report",
    "fixed_hops": "hops broken in the previous report that no longer lose context",
    "worse_hops": "broken hops whose propagation rate fell significantly since the previous report",
    "better_hops": "broken hops whose propagation rate rose significantly since the previous report",
    "unseen_hops": "hops broken in the previous report and not seen in this window",
}
HOP = {
    "propagation_rate": "stored calls whose context arrived / stored calls",
    "calls": "stored calls",
    "propagated": "stored calls whose context arrived",
    "dropped": "stored calls whose context was lost",
    "stitched": "orphans linked back to this hop's calls",
    "conditional_capture_rate": "the callee side stored when the caller's is "
    "(sampling.md; one protocol only)",
    "upstream_missing_share": "orphans with no stored upstream (sampling.md; one protocol only)",
    "volume_ratio": "the caller's estimated calls / the callee's (sampling.md; one protocol only)",
}
SERVICE = {
    "orphan_rate": "the service's orphan roots / its roots",
    "orphan_roots": "the service's orphan roots",
    "root_inflation": "the share of the service's roots that are orphans, weighted by sampling (sampling.md)",
}
_OPS = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
_EXPR = re.compile(
    r"^\s*(?P<name>[a-z_]+)\s*(?:\[(?P<arg>[^\]]+)\])?\s*(?P<op>>=|<=|==|!=|>|<)\s*"
    r"(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<pct>%)?\s*$"
)


class GateError(ValueError):
    """The expression is not valid (a usage error)."""


@dataclass(frozen=True)
class Threshold:
    text: str
    name: str
    hop: tuple[str, str] | None
    service: str | None
    op: str
    limit: float

    @classmethod
    def parse(cls, text: str) -> Threshold:
        m = _EXPR.match(text)
        if not m:
            raise GateError(
                f"{text!r} is not a threshold such as orphan_rate>0.01 or "
                "propagation_rate[orders->inventory]<0.99"
            )
        name, arg = m["name"], m["arg"]
        limit = float(m["number"]) / (100 if m["pct"] else 1)
        hop = service = None
        if arg is None:
            if name not in HEADLINE and name not in COMPARISON:
                raise GateError(
                    f"{text!r}: unknown figure {name!r}; known: "
                    f"{', '.join(sorted(HEADLINE) + sorted(COMPARISON))}, and per hop "
                    f"{', '.join(sorted(HOP))}[CALLER->CALLEE], "
                    f"per service {', '.join(sorted(SERVICE))}[SERVICE]"
                )
        elif "->" in arg:
            caller, _, callee = (s.strip() for s in arg.partition("->"))
            if name not in HOP or not caller or not callee:
                raise GateError(
                    f"{text!r}: per hop, the figures are {', '.join(sorted(HOP))}[CALLER->CALLEE]"
                )
            hop = (caller, callee)
        else:
            if name not in SERVICE:
                raise GateError(
                    f"{text!r}: per service, the figures are {', '.join(sorted(SERVICE))}[SERVICE]"
                )
            service = arg.strip()
        return cls(text.strip(), name, hop, service, m["op"], limit)


@dataclass(frozen=True)
class Verdict:
    threshold: str
    status: str  # "pass", "fail" or "not evaluated"
    value: float | None
    reason: str

    def line(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.6g}"
        return f"{self.status.upper():<14} {self.threshold}: {self.reason or f'the value is {shown}'}"


def _value(t: Threshold, report: dict) -> tuple[float | None, str]:
    """The figure's value in `report` (report.json's shape), or None and why."""
    if t.hop:
        hops = [h for h in report["hops"] if (h["caller"], h["callee"]) == t.hop]
        if not hops:
            return None, f"no call from {t.hop[0]} to {t.hop[1]} was audited in this window"
        if t.name in HOP_SAMPLING:
            if len(hops) > 1:
                return None, f"{t.hop[0]} -> {t.hop[1]} has several protocols; {t.name} is per protocol"
            figure = hops[0][t.name]
            return (figure or {}).get("value"), "" if figure and figure.get(
                "value"
            ) is not None else "no sampled figure"
        total = {k: sum(h[k] for h in hops) for k in ("calls", "propagated", "dropped", "stitched")}
        if t.name == "propagation_rate":
            return propagation_rate(total["propagated"], total["calls"]), ""
        return total[t.name], ""
    if t.service:
        rows = [s for s in report["services"] if s["service"] == t.service]
        if not rows:
            return None, f"no root of {t.service} was audited in this window"
        return rows[0][t.name], ""
    if t.name in COMPARISON:
        if report.get("comparison") is None:
            return None, "there is no previous report to compare with (its history.jsonl, or --previous)"
        return report["comparison"]["counts"][t.name], ""
    return report["figures"][t.name], ""


def evaluate(thresholds: list[Threshold], report: dict) -> list[Verdict]:
    verdicts = []
    for t in thresholds:
        value, why = _value(t, report)
        if value is None:
            verdicts.append(
                Verdict(t.text, "not evaluated", None, why or f"{t.name} has no value in this window")
            )
        elif _OPS[t.op](value, t.limit):
            verdicts.append(Verdict(t.text, "fail", value, ""))
        else:
            verdicts.append(Verdict(t.text, "pass", value, ""))
    return verdicts


def exit_code(verdicts: list[Verdict]) -> int:
    if any(v.status == "fail" for v in verdicts):
        return EXIT_FAILED
    if any(v.status == "not evaluated" for v in verdicts):
        return EXIT_NOT_EVALUATED
    return 0
