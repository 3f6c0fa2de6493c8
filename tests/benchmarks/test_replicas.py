"""The replica benchmark runs end to end on PostgreSQL (not a timed test: it only
has to work); skipped where PostgreSQL is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import replicas


@pytest.mark.skipif(
    not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")),
    reason="PostgreSQL is not installed (apt-get install postgresql)",
)
def test_quick_run_with_one_and_two_replicas(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    replicas.main(["--quick", "--replicas", "1,2", "--duration", "2", "--json", str(out)])
    reports = json.loads(out.read_text())
    assert [r["replicas"] for r in reports] == [1, 2]
    for report in reports:
        for kind in replicas.KINDS:
            figures = report["kinds"][kind]
            assert figures["per_second"] > 0, (report["replicas"], kind)
            assert not figures["errors"], (report["replicas"], kind, figures["errors"])
        assert report["rounds"] >= 0
    assert {"replica 1", "replica 2", "proxy", "postgres"} <= set(reports[1]["cores"])
