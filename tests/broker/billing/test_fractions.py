"""Fractional runs: metered at their share of one accelerator and billed at the locked
ask for that share; invoice lines say what part they held."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import cast

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.allocations.service import meter
from broker.billing import invoices
from broker.models.account import Role
from broker.models.billing import InvoiceLine
from broker.models.job import Job
from broker.models.market import Allocation
from tests.factories import make_account, make_job, make_offer, make_run

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def test_a_fraction_is_metered_at_its_share() -> None:
    started = T0
    allocation = Allocation(
        accelerators=1, share_num=3, share_den=7, usage_ms=0, started_at=started
    )
    job = Job(usage_ms=0, budget_micros=None)
    # The agent reports the seconds the run took; 7 s of a 3/7 instance are 3 s of it.
    meter(cast(Session, None), allocation, job, 7.0, now=started + timedelta(seconds=7))
    assert (allocation.usage_ms, job.usage_ms) == (3000, 3000)
    # A report of more than the share of the wall time is capped to it.
    meter(cast(Session, None), allocation, job, 14.0, now=started + timedelta(seconds=14))
    assert allocation.usage_ms == 6000


def test_invoice_lines_show_the_fraction(db: Session) -> None:
    developer, _ = make_account(db, Role.developer)
    provider, _ = make_account(db, Role.provider)
    end = T0 + timedelta(days=2)
    shared = make_offer(
        db,
        provider,
        accelerator="h100-sxm",
        kind="shared",
        count=1,
        shares=4,
        memory_per_share_gib=20,
        price_per_hour="2.00",
    )
    half = make_run(db, make_job(db, developer, name="half"), shared, 360_000, ended_at=end)
    half.slice, half.share_num, half.share_den = "2/4 shared on GPU 0", 1, 2
    sliced = make_offer(db, provider, kind="mig", count=1, price_per_hour="7.00")
    mig = make_run(db, make_job(db, developer, name="mig"), sliced, 3_600_000, ended_at=end)
    mig.slice, mig.share_num, mig.share_den = "3g.40gb@4", 3, 7
    db.flush()
    (invoice,) = invoices.generate(db, period_start=T0, cutoff=T0 + timedelta(days=31))
    lines = {
        ln.job_id: ln
        for ln in db.scalars(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice.id))
    }
    shared_line, mig_line = lines[half.job_id], lines[mig.job_id]
    # 0.1 accelerator-hours metered (0.2 h at half an accelerator) at $2.00: $0.20.
    assert shared_line.description.startswith(
        "half: 0.5 x h100-sxm shared in europe-west4, 0.2000 h"
    )
    assert shared_line.amount_cents == 20
    # 1 accelerator-hour of 3/7 instance: 2.3333 h of the instance, at $7.00: $7.00.
    assert mig_line.description.startswith("mig: h100-sxm 3g.40gb in europe-west4, 2.3333 h")
    assert mig_line.amount_cents == 700
