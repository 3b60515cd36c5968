"""Simulator at scale: spans/s generated and memory over a long run, to show memory stays bounded.

    python -m bench.simulate_memory [--spans 2000000] [--scenario shop-large]

Generates and encodes the export requests (as `ctxaudit simulate` does) and writes the truth
to a temporary gzip file; prints RSS every 10% of the run. Memory must not grow with the count.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import psutil

from audit.scenarios.model import load_scenario
from audit.scenarios.output import TruthWriter
from audit.scenarios.simulate import Simulator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=2_000_000, help="exported spans to generate")
    ap.add_argument("--scenario", default="shop-large")
    args = ap.parse_args()

    proc = psutil.Process()
    sim = Simulator(load_scenario(args.scenario), seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        truth = TruthWriter(os.path.join(tmp, "truth.jsonl.gz"))
        start, next_mark, rss = time.perf_counter(), args.spans // 10, []
        encoded = 0
        for request, records in sim.run(args.spans):
            encoded += len(request.SerializeToString())
            truth.write(records)
            if sim.exported >= next_mark:
                rss.append(proc.memory_info().rss / 2**20)
                print(
                    f"{sim.exported:>11,} exported {sim.generated:>11,} generated  "
                    f"{sim.generated / (time.perf_counter() - start):>8,.0f} spans/s generated  "
                    f"rss {rss[-1]:6.0f} MiB",
                    flush=True,
                )
                next_mark += args.spans // 10
        truth.close()
    print(
        f"rss after 10%: {rss[0]:.0f} MiB, at the end: {rss[-1]:.0f} MiB "
        f"({(rss[-1] - rss[0]) / rss[0] * 100:+.1f}%); {encoded / sim.exported:.0f} bytes/span encoded"
    )


if __name__ == "__main__":
    main()
