"""The fractions benchmark on a small market: its figures add up."""

from __future__ import annotations

import pytest

from benchmarks import fractions


def test_a_small_fractions_market_reports_consistent_figures() -> None:
    row = fractions.run(60, 12, seed=1, time_limit=2.0)
    for method in ("solver", "whole_gpu", "first_fit"):
        fill = row[method]
        assert 0 <= fill["stranded"] <= 1
        # Stranded is what is idle inside slices and what is unsold, on the GPUs used.
        assert fill["stranded"] == pytest.approx(fill["idle_in_slices"] + fill["unsold"])
        assert fill["gpus_touched"] <= 12
    # Whole GPUs hold one job each; slices and shares hold more.
    assert row["whole_gpu"]["placed"] <= 12
    assert row["solver"]["placed"] >= row["whole_gpu"]["placed"]
    lines = fractions.lines(row)
    assert len(lines) == 4
    assert "of first-fit's" in lines[-1]
