"""Clearing rounds and prices over time, as the dashboard reads them."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Engine

from broker.config import Settings
from broker.db import transaction
from broker.ledger import latest_allocations
from broker.market import clearing
from broker.market.service import list_rounds, price_history
from tests.broker.market.test_clearing import accounts, seed
from tests.factories import make_job, make_offer

SETTINGS = Settings(clear_time_limit_seconds=5)


def test_clearing_prices_per_model_and_round(fresh_engine: Engine) -> None:
    provider, developer = accounts(fresh_engine)
    seed(fresh_engine, lambda s: make_offer(s, provider, price_per_hour="2.00", count=1))
    seed(fresh_engine, lambda s: make_offer(s, provider, price_per_hour="2.50", count=2))
    seed(fresh_engine, lambda s: make_offer(s, provider, accelerator="l4", price_per_hour="0.70"))
    h100 = {"accelerator_models": ["h100-sxm"], "max_price_per_hour": "3.00"}
    first = [seed(fresh_engine, lambda s: make_job(s, developer, **h100)) for _ in range(3)]
    one = clearing.run_round(fresh_engine, SETTINGS)
    assert one is not None
    assert one.matched == 3
    seed(fresh_engine, lambda s: make_offer(s, provider, price_per_hour="2.20", count=1))
    seed(fresh_engine, lambda s: make_job(s, developer, **h100))
    two = clearing.run_round(fresh_engine, SETTINGS)
    assert two is not None
    assert two.matched == 1
    clearing.run_round(fresh_engine, SETTINGS)  # nothing left to match: no price point

    with transaction(fresh_engine, write=False) as s:
        points = price_history(s, "H100")  # an alias names the same model
        assert [p.round_id for p in points] == [one.id, two.id]  # oldest first
        assert (points[0].low, points[0].high, points[0].accelerators) == (
            Decimal("2.00"),
            Decimal("2.50"),
            3,
        )
        assert points[0].average == Decimal("2.333333")  # (2.00 + 2 x 2.50) / 3, half-even
        assert points[1].average == points[1].low == Decimal("2.20")
        assert price_history(s, "l4") == []
        assert [p.round_id for p in price_history(s, "h100-sxm", limit=1)] == [two.id]

        rounds, total = list_rounds(s, limit=2, offset=0)
        assert total == 3
        assert rounds[1].id == two.id  # newest first

        placed = latest_allocations(s, [j.id for j in first])
        assert set(placed) == {j.id for j in first}
        assert {offer.accelerator for _, offer in placed.values()} == {"h100-sxm"}
        assert latest_allocations(s, []) == {}
