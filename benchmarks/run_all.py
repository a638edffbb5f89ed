"""``make bench``: run every benchmarks/bench_*.py in turn; each prints its own ratios.

``python benchmarks/run_all.py [--quick] [NAME ...]`` runs a subset (e.g. ``io tissue``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    names = [a for a in argv if not a.startswith("-")]
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in names]
    failed = []
    for s in scripts:
        print(f"=== {s.stem}", flush=True)
        rc = subprocess.call([sys.executable, str(s)] + (["--quick"] if quick else []), cwd=HERE)
        if rc:
            failed.append(s.stem)
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
