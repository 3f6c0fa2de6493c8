"""Observed ratios of runtime estimates: metered over estimated per model, the
correction they earn within a floor and a ceiling, applied to later rounds."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest
from sqlalchemy.orm import Session

from broker.config import Settings
from broker.db import utcnow
from broker.market import estimates
from broker.market.adapt import weights
from broker.market.estimates import CEILING, FLOOR, MAX_STARTUP_S, MIN_RUNS, Band
from broker.market.standing import Standing
from broker.models.account import Role
from broker.models.job_state import JobState
from broker.models.offer import Offer
from tests.conftest import ClientFactory
from tests.factories import make_account, make_job, make_offer, make_run

MS_PER_HOUR = 3_600_000


def _runs(db: Session, offer: Offer, ratios: list[float], **job: object) -> None:
    """Finished first attempts on ``offer``: each estimated at one hour, metered at
    ``ratio`` hours on each of its accelerators."""
    developer, _ = make_account(db, Role.developer)
    for ratio in ratios:
        row = make_job(db, developer, accelerators=2)
        row.duration_hours = job.get("duration_hours")  # type: ignore[assignment]
        row.flops, row.bytes = 1e15, 1e12
        row.state, row.attempts = JobState(str(job.get("state", "succeeded"))), 1
        run = make_run(db, row, offer, int(ratio * MS_PER_HOUR) * 2, ended_at=utcnow())
        run.runtime_hours = 1.0
    db.flush()


def test_the_correction_is_the_median_within_its_floor_and_ceiling() -> None:
    rng = random.Random(3)
    long = [(100.0, 160.0 * rng.uniform(0.9, 1.1)) for _ in range(101)]
    band = estimates.fit("h100-sxm", long)
    assert band.correction == pytest.approx(1.6, rel=0.05)  # converges on the series
    assert band.startup == pytest.approx(0.0, abs=5.0)
    assert band.low <= band.median <= band.high
    # However far the runs push it, it stays inside [FLOOR, CEILING].
    assert estimates.fit("m", [(100.0, 5000.0)] * 20).correction == CEILING
    assert estimates.fit("m", [(100.0, 0.1)] * 20).correction == FLOOR
    # Too few runs correct nothing.
    assert estimates.fit("m", [(100.0, 300.0)] * (MIN_RUNS - 1)).correction == 1.0


def test_small_jobs_teach_the_start_up() -> None:
    """Their work takes microseconds, their runs half a second: that is start-up,
    not a slow roofline (only long runs speak for the ratio)."""
    rng = random.Random(4)
    tiny = [(2e-5, 0.5 * rng.uniform(0.9, 1.1)) for _ in range(40)]
    long = [(300.0, 330.0 + 0.5) for _ in range(10)]
    band = estimates.fit("cpu", tiny + long)
    assert band.correction == pytest.approx(1.1, rel=0.01)
    assert band.startup == pytest.approx(0.5, rel=0.15)
    # A provider who reports slow runs moves it no further than the ceiling.
    assert estimates.fit("cpu", [(1.0, 1e6)] * 20).startup == MAX_STARTUP_S
    assert estimates.fit("cpu", [(1.0, 9.0)] * (MIN_RUNS - 1)).startup == 0.0


def test_bands_count_only_runs_that_speak_for_the_estimate(db: Session) -> None:
    provider, _ = make_account(db, Role.provider)
    offer = make_offer(db, provider, accelerator="mi300x", count=8)
    _runs(db, offer, [1.5] * 6)
    _runs(db, offer, [9.0] * 6, duration_hours=2.0)  # stated by the developer
    _runs(db, offer, [9.0] * 6, state="failed")
    band = estimates.bands(db)["mi300x"]
    assert band.runs == 6
    assert band.median == pytest.approx(1.5)
    assert band.correction == pytest.approx(1.5)


def test_rounds_use_the_corrected_efficiency(db: Session) -> None:
    provider, _ = make_account(db, Role.provider)
    slow = make_offer(db, provider, accelerator="mi300x", count=8)
    other = make_offer(db, provider, accelerator="h100-sxm", count=8)
    _runs(db, slow, [2.0] * MIN_RUNS)
    book, _ = Standing().read(db, weights(Settings(fee_percent=Decimal(0)), 0))
    by_id = {o.id: o for o in book.offers}
    assert by_id[slow.id].efficiency == pytest.approx(slow.efficiency / 2.0)
    assert by_id[slow.id].startup_seconds == pytest.approx(0.0, abs=1.0)
    assert by_id[other.id].efficiency == other.efficiency


def test_emulated_runs_keep_a_band_of_their_own(db: Session) -> None:
    """A demo's emulated A100 runs at its CPU's speed: its runs must not make real
    A100s look slow, and its own estimates may stretch past the real ceiling."""
    provider, _ = make_account(db, Role.provider)
    real = make_offer(db, provider, accelerator="a100-80gb", count=8)
    fake = make_offer(db, provider, accelerator="a100-80gb", count=8)
    fake.emulated = True
    _runs(db, fake, [10.0] * MIN_RUNS)
    _runs(db, real, [1.2] * MIN_RUNS)
    known = estimates.bands(db)
    assert known["a100-80gb"].correction == pytest.approx(1.2)
    assert known[estimates.key("a100-80gb", True)].correction == pytest.approx(10.0)
    book, _ = Standing().read(db, weights(Settings(fee_percent=Decimal(0)), 0))
    by_id = {o.id: o for o in book.offers}
    assert by_id[real.id].efficiency == pytest.approx(real.efficiency / 1.2)
    assert by_id[fake.id].efficiency == pytest.approx(fake.efficiency / 10.0)


def test_an_agents_measured_startup_counts_until_the_models_runs_speak(db: Session) -> None:
    provider, _ = make_account(db, Role.provider)
    measured = make_offer(db, provider, accelerator="mi300x", count=8)
    measured.startup_seconds = 0.4
    absurd = make_offer(db, provider, accelerator="h100-sxm", count=8)
    absurd.startup_seconds = 600.0  # the most an offer may state, above the clamp
    db.flush()
    book, _ = Standing().read(db, weights(Settings(fee_percent=Decimal(0)), 0))
    by_id = {o.id: o for o in book.offers}
    assert by_id[measured.id].startup_seconds == pytest.approx(0.4)
    assert by_id[absurd.id].startup_seconds == MAX_STARTUP_S
    # Runs enough of the model: the broker's own fit replaces what the agent said.
    _runs(db, measured, [1.0] * MIN_RUNS)
    book, _ = Standing().read(db, weights(Settings(fee_percent=Decimal(0)), 0))
    fitted = estimates.bands(db)["mi300x"].startup
    assert {o.id: o for o in book.offers}[measured.id].startup_seconds == fitted


def test_the_bands_are_in_the_api(db: Session, client_for: ClientFactory) -> None:
    provider, _ = make_account(db, Role.provider)
    _, key = make_account(db, Role.developer)
    offer = make_offer(db, provider, accelerator="mi300x", count=8)
    _runs(db, offer, [0.8] * MIN_RUNS)
    answer = client_for(key).get("/v1/market/estimates")
    assert answer.status_code == 200
    [band] = answer.json()
    assert band["model"] == "mi300x"
    assert band["runs"] == MIN_RUNS
    assert band["correction"] == pytest.approx(0.8)
    assert band["startup_s"] == pytest.approx(0.0, abs=1.0)
    assert isinstance(Band(model="m", runs=0, median=1, low=1, high=1).correction, float)
