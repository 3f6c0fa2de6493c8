"""The load benchmark runs end to end (not a timed test: it only has to work)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import load, seeding


def test_quick_run_on_sqlite(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "figures.json"
    load.main(["--quick", "--database", "sqlite", "--duration", "1", "--json", str(out)])
    (run,) = json.loads(out.read_text())["sqlite"]
    submit = run["submit"]["max"]
    assert submit["requests"] > 0
    assert not submit["errors"], submit["errors"]
    assert run["submit"]["rate_50"]["requests"] > 0
    for name in ("book_1", "book_8", "search_1", "search_8"):
        assert run["read"][name]["requests"] > 0, name
        assert not run["read"][name]["errors"], run["read"][name]["errors"]
    assert run["clear"]["matched"] > 0


def test_job_bodies_are_valid_requests() -> None:
    from benchmarks.markets import build_market
    from broker.jobs.schemas import JobCreate
    from broker.offers.schemas import OfferCreate

    market = build_market(500, 200, seed=3)
    for job in market.jobs:
        JobCreate.model_validate(seeding.job_body(job))
    for offer in market.offers:
        OfferCreate.model_validate(seeding.offer_body(offer))
