"""Every hostile case ends as a correct result or a clear one-line error."""

from __future__ import annotations

import pytest

from ._framework import load_cases, run_case

CASES = load_cases()


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_hostile_case(c, tmp_path):
    out = run_case(c, tmp_path)
    assert out.category in ("correct", "clear error"), (
        f"{c.name}: {out.category}: {out.detail}\n--- stderr ---\n{out.stderr[-3000:]}")
