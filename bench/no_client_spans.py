"""Callers without client spans and spans without a kind: the Thrift-shaped capture of
tests/test_no_client_spans.py (DeathStarBench's compose-post path, 30% of cross-service hops
cut), at three request rates, with and without SERVER kinds; detection and stitching scored
against the truth kept while building it.

    .venv/bin/python -m bench.no_client_spans [--requests 600]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

from tests.audit_helpers import audit_all
from tests.test_no_client_spans import build, score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=600)
    args = ap.parse_args()
    print("| kinds | mean gap | orphans | detection P / R | stitching P / R |")
    print("|---|---|---|---|---|")
    for kinds in (False, True):
        for gap_us in (1500, 300, 100):
            with tempfile.TemporaryDirectory() as tmp:
                db, cap = build(pathlib.Path(tmp), kinds=kinds, gap_us=gap_us, n=args.requests)
                _, (dp, dr), (sp, sr) = score(audit_all(db), cap)
            label = "SERVER" if kinds else "none"
            print(f"| {label} | {gap_us} µs | {len(cap.truth)} | {dp:.3f} / {dr:.3f} | {sp:.3f} / {sr:.3f} |")


if __name__ == "__main__":
    main()
