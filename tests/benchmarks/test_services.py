"""The services benchmark runs end to end (not a timed test: it only has to work): three
agents, a service on each, a killed agent and no failed request."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import services


def test_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    services.main(["--quick", "--callers", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    for phase in ("single", "steady", "kill"):
        assert report[phase]["per_second"] > 0, phase
        assert report[phase]["routing_added_ms"]["p50"] is not None
    assert report["kill"]["errors"] == 0, report["kill"]["error_statuses"]
    assert report["kill"]["three_replicas_again_after_s"] > 0
    assert report["plain_http_ms"]["p50"] > 0
