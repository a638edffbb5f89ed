"""``make bench``: run every benchmarks/bench_*.py in turn; each prints its own ratios.

``python benchmarks/run_all.py [--quick] [NAME ...]`` runs a subset (e.g. ``io tissue``);
``peers`` is the TIAToolbox side by side (peers_tiatoolbox.py), run when ``.venv-peers``
exists (``make bench-peers`` creates it).
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
    if not names or "peers" in names:
        # the TIAToolbox side by side needs its own venv (make bench-peers creates it)
        peer = HERE.parent / ".venv-peers" / "bin" / "python"
        print("=== peers_tiatoolbox", flush=True)
        if peer.exists():
            if subprocess.call([sys.executable, str(HERE / "peers_tiatoolbox.py"),
                                "--peer-python", str(peer)], cwd=HERE):
                failed.append("peers_tiatoolbox")
        else:
            print("skipped: no .venv-peers (run `make bench-peers` once to create it)")
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
