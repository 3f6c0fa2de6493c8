"""Invoices: exact amounts, one rounding per line, every run billed exactly once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from broker.billing import invoices, sync
from broker.billing.amounts import fee_on, to_cents, usage_charge
from broker.billing.statements import statement
from broker.config import get_settings
from broker.db import transaction
from broker.models.account import Role
from broker.models.billing import Invoice, InvoiceLine, InvoiceStatus
from broker.models.market import Allocation, AllocationStatus
from tests.factories import make_account, make_job, make_offer, make_run

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _lines(db: Session, invoice: Invoice) -> list[InvoiceLine]:
    return list(db.scalars(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice.id)))


def test_fee_arithmetic_by_hand(db: Session) -> None:
    """Three runs, worked out on paper: each line rounds once, the fee rounds once."""
    developer, _ = make_account(db, Role.developer)
    provider, _ = make_account(db, Role.provider)
    offer = make_offer(db, provider, price_per_hour="2.40")
    job = make_job(db, developer, name="train")
    end = T0 + timedelta(days=2)
    # 1.5 h at $2.40 = $3.60 exactly.
    make_run(db, job, offer, 5_400_000, fee_ppm=75_000, ended_at=end)
    # 10 min at $0.99 = $0.165: half a cent, rounded to the even $0.16.
    make_run(db, job, offer, 600_000, price_per_hour_micros=990_000, fee_ppm=75_000, ended_at=end)
    # 1 ms at $1/h = 1/3600 of a micro-dollar: $0.00 on its line, but it counts in the fee.
    make_run(db, job, offer, 1, price_per_hour_micros=1_000_000, fee_ppm=75_000, ended_at=end)

    (invoice,) = invoices.generate(db, period_start=T0, cutoff=T0 + timedelta(days=31))

    amounts = sorted(line.amount_cents for line in _lines(db, invoice))
    assert amounts == [0, 16, 360]
    assert invoice.subtotal_cents == 376
    # 7.5 % of the exact $3.765000277... = $0.2823750208...: $0.28.
    assert invoice.fee_cents == 28
    assert invoice.total_cents == 404
    assert invoice.status == InvoiceStatus.open  # no Stripe: finalized at once


def test_runs_still_going_wait_for_the_invoice_after_they_end(db: Session) -> None:
    developer, _ = make_account(db, Role.developer)
    provider, _ = make_account(db, Role.provider)
    offer = make_offer(db, provider)
    running = make_run(db, make_job(db, developer), offer, 60_000, ended_at=None)
    cutoff = T0 + timedelta(days=1)
    assert invoices.generate(db, period_start=T0, cutoff=cutoff) == []
    running.status, running.ended_at = AllocationStatus.finished, cutoff + timedelta(hours=1)
    assert invoices.generate(db, period_start=T0, cutoff=cutoff) == []  # ended after it
    (later,) = invoices.generate(db, period_start=cutoff, cutoff=cutoff + timedelta(days=1))
    assert [line.allocation_id for line in _lines(db, later)] == [running.id]


def test_period_bounds_are_calendar_periods_in_utc() -> None:
    moment = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert invoices.period_bounds(moment, "month") == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert invoices.period_bounds(moment, "week") == (
        datetime(2026, 12, 28, tzinfo=UTC),  # a Monday
        datetime(2027, 1, 4, tzinfo=UTC),
    )
    assert invoices.period_bounds(moment, "day")[0] == datetime(2026, 12, 31, tzinfo=UTC)


run_specs = st.lists(
    st.tuples(
        st.integers(0, 2),  # developer
        st.integers(0, 2),  # offer
        st.integers(1, 40 * 3_600_000),  # accelerator-milliseconds
        st.integers(0, 50_000_000),  # locked price, micro-dollars per hour
        st.sampled_from([0, 50_000, 75_000, 123_457, 250_000]),  # fee, ppm
        st.one_of(st.none(), st.integers(0, 60 * 24 * 3600)),  # ended, seconds after T0
    ),
    min_size=1,
    max_size=30,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=run_specs, cutoffs=st.lists(st.integers(1, 70), min_size=1, max_size=4))
def test_invoices_reconcile_with_metered_usage(
    db: Session, specs: list[tuple[int, int, int, int, int, int | None]], cutoffs: list[int]
) -> None:
    """Over many random runs and billing cut-offs (some repeated):

    - every run that ended before the last cut-off is on exactly one invoice line,
      and no run still going, or ending later, is on any;
    - each line is its exact usage charge rounded once, each fee the fee on the
      exact sum rounded once, and the totals add up, recomputed from the metered
      rows alone;
    - the invoices are within half a cent per rounding of the exact sum of usage
      x locked rates + fees;
    - what developers pay is what providers earn plus the broker's fees, exactly.
    """
    savepoint = db.begin_nested()
    try:
        developers = [make_account(db, Role.developer)[0] for _ in range(3)]
        provider, _ = make_account(db, Role.provider)
        offers = [make_offer(db, provider, region=r) for r in ("eu-west", "us-east", "asia")]
        runs = []
        for who, where, usage, price, fee, ended in specs:
            job = make_job(db, developers[who])
            end = None if ended is None else T0 + timedelta(seconds=ended)
            runs.append(
                make_run(
                    db,
                    job,
                    offers[where],
                    usage,
                    price_per_hour_micros=price,
                    fee_ppm=fee,
                    ended_at=end,
                )
            )
        made: list[Invoice] = []
        for days in [*sorted(cutoffs), max(cutoffs)]:  # the last cut-off twice: nothing new
            made += invoices.generate(db, period_start=T0, cutoff=T0 + timedelta(days=days))
        last_cutoff = T0 + timedelta(days=max(cutoffs))

        lines = list(db.scalars(select(InvoiceLine)))
        billed = [line.allocation_id for line in lines]
        assert len(billed) == len(set(billed))
        due = {r.id for r in runs if r.ended_at is not None and r.ended_at < last_cutoff}
        assert set(billed) == due

        by_id = {r.id: r for r in runs}
        exact_total = Fraction(0)
        for invoice in made:
            own = [ln for ln in lines if ln.invoice_id == invoice.id]
            assert own, "no empty invoices"
            charges = [
                usage_charge(
                    by_id[ln.allocation_id].usage_ms, by_id[ln.allocation_id].price_per_hour_micros
                )
                for ln in own
            ]
            fees = [
                fee_on(c, by_id[ln.allocation_id].fee_ppm)
                for c, ln in zip(charges, own, strict=True)
            ]
            assert [ln.amount_cents for ln in own] == [to_cents(c) for c in charges]
            assert invoice.subtotal_cents == sum(to_cents(c) for c in charges)
            assert invoice.fee_cents == to_cents(sum(fees, Fraction(0)))
            assert invoice.total_cents == invoice.subtotal_cents + invoice.fee_cents
            owner = {by_id[ln.allocation_id].job_id for ln in own}
            assert len(owner) >= 1
            exact_total += sum(charges, Fraction(0)) + sum(fees, Fraction(0))
        roundings = len(lines) + len(made)
        invoiced = sum(i.total_cents for i in made) * 10_000  # in micro-dollars
        assert abs(invoiced - exact_total) <= roundings * 5_000

        # Developers pay = providers earn + fees, exactly, before any rounding.
        earned = statement(db, provider, None, T0 - timedelta(days=1), last_cutoff)
        earned_exact = sum((row.exact_micros for row in earned.rows), Fraction(0))
        fees_exact = sum(
            (
                fee_on(usage_charge(r.usage_ms, r.price_per_hour_micros), r.fee_ppm)
                for r in runs
                if r.id in due
            ),
            Fraction(0),
        )
        assert earned_exact + fees_exact == exact_total
    finally:
        savepoint.rollback()


def test_two_generations_of_the_same_runs_bill_them_once(db: Session) -> None:
    developer, _ = make_account(db, Role.developer)
    provider, _ = make_account(db, Role.provider)
    offer = make_offer(db, provider)
    for _ in range(3):
        make_run(db, make_job(db, developer), offer, 3_600_000, ended_at=T0)
    cutoff = T0 + timedelta(days=1)
    first = invoices.generate(db, period_start=T0, cutoff=cutoff)
    assert len(first) == 1
    assert invoices.generate(db, period_start=T0, cutoff=cutoff) == []
    assert invoices.generate(db, period_start=T0, cutoff=cutoff + timedelta(days=30)) == []
    assert db.scalar(select(Allocation.id).where(Allocation.usage_ms == 0)) is None


def test_the_server_invoices_a_period_once_it_has_ended(fresh_engine: Engine) -> None:
    """The billing pass run in April bills March's runs, as March's invoice, once."""
    with transaction(fresh_engine) as db:
        developer, _ = make_account(db, Role.developer)
        provider, _ = make_account(db, Role.provider)
        offer = make_offer(db, provider, price_per_hour="1.20")
        make_run(db, make_job(db, developer), offer, 3_600_000, ended_at=T0 + timedelta(days=3))
        make_run(db, make_job(db, developer), offer, 1_800_000, ended_at=None)  # still going
    transactions = lambda write=True: transaction(fresh_engine, write=write)  # noqa: E731
    settings = get_settings()
    assert settings.billing_period == "month"
    in_march = sync.generate(transactions, settings, now=T0 + timedelta(days=20))
    assert in_march.invoices == []  # March has not ended
    april = datetime(2026, 4, 1, 1, tzinfo=UTC)
    (invoice_id,) = sync.generate(transactions, settings, now=april).invoices
    assert sync.generate(transactions, settings, now=april).invoices == []
    with transaction(fresh_engine, write=False) as db:
        invoice = db.get_one(Invoice, invoice_id)
        assert (invoice.period_start, invoice.period_end) == (T0, datetime(2026, 4, 1, tzinfo=UTC))
        assert invoice.total_cents == 120  # an hour at $1.20 (this run locked no fee)
        assert invoice.status == InvoiceStatus.open
