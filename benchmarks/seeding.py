"""The market of ``benchmarks.load`` as the broker sees it: benchmark jobs and offers
turned into API request bodies, and a fresh database migrated and seeded with
accounts, offers and jobs through the broker's own services.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solver import market as sm

DEVELOPERS = 20
PROVIDERS = 10


def region_name(region: str) -> str:
    """A price-sample region as the API accepts it (some marketplace ones read
    ``"Texas, US, NA"``)."""
    return re.sub(r"[^A-Za-z0-9 ._:/-]+", "-", region).strip("- ")


def offer_body(o: sm.Offer) -> dict[str, Any]:
    body: dict[str, Any] = {
        "accelerator": o.accelerator,
        "count": o.count,
        "price_per_hour": f"{o.price_per_hour:.6f}",
        "region": region_name(o.region),
        "country": o.country,
        "lat": o.lat,
        "lon": o.lon,
        "efficiency": o.efficiency,
    }
    if o.available_hours is not None:
        body["available_hours"] = o.available_hours
    return body


def job_body(j: sm.Job) -> dict[str, Any]:
    """The request a developer would send for a benchmark job."""
    body: dict[str, Any] = {
        "platforms": list(j.platforms),
        "accelerators": j.accelerators,
        "max_price_per_hour": f"{j.max_price_per_hour:.2f}",
        "priority": j.priority,
    }
    if j.duration_hours is not None:
        body["duration_hours"] = j.duration_hours
    else:
        body.update(flops=j.flops, bytes=j.bytes, dtype=j.dtype)
    optional = {
        "min_memory_gib": j.min_memory_gib or None,
        "accelerator_models": list(j.accelerator_models) or None,
        "deadline_hours": j.deadline_hours,
        "latency_slo_ms": j.latency_slo_ms,
        "user_lat": j.user_lat,
        "user_lon": j.user_lon,
        "data_region": j.data_region and region_name(j.data_region),
        "data_gb": j.data_gb,
        "allowed_countries": list(j.allowed_countries) or None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


@dataclass
class Keys:
    admin: str
    developers: list[str]
    providers: list[str]


def seed(url: str, market: sm.Market) -> Keys:
    """Accounts, then the market's offers and jobs, through the broker's services. The
    jobs are bids for capacity alone (a market simulation), which this process's
    settings must allow (BROKER_ALLOW_CAPACITY_BIDS=1)."""
    from broker.accounts.service import create_account
    from broker.config import get_settings
    from broker.db import make_engine, transaction
    from broker.jobs.schemas import JobCreate
    from broker.jobs.service import submit_job
    from broker.models.account import Role
    from broker.offers.schemas import OfferCreate
    from broker.offers.service import create_offer

    os.environ["BROKER_ALLOW_CAPACITY_BIDS"] = "1"
    get_settings.cache_clear()
    engine = make_engine(url)
    try:
        with transaction(engine) as session:
            admin = create_account(session, "ops", Role.admin)
            developers = [
                create_account(session, f"dev{i}", Role.developer) for i in range(DEVELOPERS)
            ]
            providers = [
                create_account(session, f"farm{i}", Role.provider) for i in range(PROVIDERS)
            ]
        for start in range(0, len(market.offers), 1000):
            with transaction(engine) as session:
                for i, o in enumerate(market.offers[start : start + 1000], start):
                    provider = providers[i % PROVIDERS][0]
                    create_offer(session, provider, OfferCreate.model_validate(offer_body(o)))
        for start in range(0, len(market.jobs), 1000):
            with transaction(engine) as session:
                for i, j in enumerate(market.jobs[start : start + 1000], start):
                    developer = developers[i % DEVELOPERS][0]
                    submit_job(session, developer, JobCreate.model_validate(job_body(j)))
    finally:
        engine.dispose()
    return Keys(admin[1], [k for _, k in developers], [k for _, k in providers])


def migrate(url: str, data_dir: Path) -> None:
    env = {**os.environ, "BROKER_DATABASE_URL": url, "BROKER_DATA_DIR": str(data_dir)}
    subprocess.run(
        [sys.executable, "-m", "broker.cli", "db", "upgrade"],
        env=env,
        check=True,
        capture_output=True,
    )
