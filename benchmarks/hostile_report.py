"""Run every hostile case (tests/hostile/cases_*.py) and print the outcome counts.

    python benchmarks/hostile_report.py [-v] [-k SUBSTRING] [--subprocess]

By default the CLI runs in this process (cases that need signals or their own
process always get one); --subprocess starts a fresh `lnmeta` process per case.

Categories: correct / clear error / traceback / hang / silent wrong / data loss.
The last four must be 0; the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.hostile._framework import CATEGORIES, load_cases, run_case  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    ap.add_argument("--subprocess", action="store_true",
                    help="run every case in a fresh `lnmeta` process (slower, the exact user path)")
    args = ap.parse_args(argv)
    cases = [c for c in load_cases() if args.k in c.name]
    counts: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="lnmeta-hostile-") as tmp:
        for i, c in enumerate(cases):
            out = run_case(c, Path(tmp) / f"case{i:03d}", in_process=not args.subprocess)
            counts[out.category] += 1
            if args.verbose or out.category not in ("correct", "clear error"):
                print(f"{out.category:12s} | {c.name} | {out.detail[:160]}")
    print(f"hostile cases: {len(cases)}")
    for cat in CATEGORIES:
        print(f"  {cat:12s} {counts[cat]}")
    bad = sum(counts[c] for c in CATEGORIES[2:])
    print(f"RESULT traceback+hang+silent wrong+data loss = {bad} (target 0)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
