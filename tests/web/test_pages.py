"""The dashboard's pages and forms, through the same services as the API."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from broker.db import transaction
from broker.models.account import Role
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation
from broker.models.offer import Offer, OfferStatus
from tests.conftest import ClientFactory
from tests.factories import make_account, make_job, make_offer, make_run
from tests.web.conftest import Browser

OFFER_FORM = {
    "accelerator": "H100",
    "count": "4",
    "price_per_hour": "2.49",
    "region": "europe-west4",
    "country": "nl",
    "lat": "53.44",
    "lon": "6.84",
}


def test_a_provider_lists_changes_and_withdraws_an_offer(db: Session, browser_for: Any) -> None:
    provider: Browser = browser_for(Role.provider)
    listed = provider.post("/offers", OFFER_FORM)
    assert listed.status_code == 303
    offer = db.scalars(select(Offer).where(Offer.provider_id == provider.account.id)).one()
    assert (offer.accelerator, offer.count, offer.country) == ("h100-sxm", 4, "NL")
    assert listed.headers["location"] == f"/offers?notice=listed&offer={offer.id}"
    page = provider.get(listed.headers["location"]).text
    assert f"Listed offer <code>{offer.id}</code>" in page
    assert "$2.49/h" in page

    edit = provider.get(f"/offers/{offer.id}")
    assert 'value="2.49"' in edit.text
    changed = provider.post(
        f"/offers/{offer.id}", {"price_per_hour": "2.29", "capacity": "6", "efficiency": "0.5"}
    )
    assert changed.status_code == 303
    db.refresh(offer)
    assert (offer.price_per_hour_micros, offer.capacity, offer.count) == (2_290_000, 6, 6)
    assert offer.available_hours is None

    assert provider.post(f"/offers/{offer.id}/withdraw").status_code == 303
    db.refresh(offer)
    assert offer.status == OfferStatus.withdrawn
    assert "withdrawn" in provider.get("/offers").text


def test_a_refused_offer_form_comes_back_with_the_reason(db: Session, browser_for: Any) -> None:
    provider: Browser = browser_for(Role.provider)
    bad_count = provider.post("/offers", {**OFFER_FORM, "count": "0"})
    assert bad_count.status_code == 422
    assert 'aria-invalid="true"' in bad_count.text
    assert "greater than or equal to 1" in bad_count.text
    assert 'value="europe-west4"' in bad_count.text  # what was typed is kept
    unknown = provider.post("/offers", {**OFFER_FORM, "accelerator": "mystery-9000"})
    assert unknown.status_code == 422
    assert "is not in the hardware catalog" in unknown.text  # the service's own message
    assert db.scalars(select(Offer)).all() == []


def test_capacity_below_what_matches_hold_is_a_conflict(
    fresh_engine: Engine, fresh_client_for: ClientFactory
) -> None:
    from broker.config import Settings
    from broker.market.clearing import run_round

    with transaction(fresh_engine) as s:
        provider, key = make_account(s, Role.provider)
        developer, _ = make_account(s, Role.developer)
        offer = make_offer(s, provider, count=4)
        make_job(s, developer, accelerators=3)
    run_round(fresh_engine, Settings(clear_time_limit_seconds=5))
    browser = Browser(fresh_client_for(None), provider, key)
    refused = browser.post(
        f"/offers/{offer.id}", {"price_per_hour": "2.50", "capacity": "2", "efficiency": "0.4"}
    )
    assert refused.status_code == 409
    assert "capacity cannot go below 3" in refused.text
    with transaction(fresh_engine, write=False) as s:
        assert s.get_one(Offer, offer.id).capacity == 4


def test_a_developer_places_changes_and_cancels_a_bid(db: Session, browser_for: Any) -> None:
    developer: Browser = browser_for(Role.developer)
    form = developer.get("/jobs/new").text
    request_id = re.search(r'name="request_id" value="([^"]+)"', form)
    assert request_id
    bid = {
        "request_id": request_id.group(1),
        "name": "fine-tune",
        "platforms": ["cuda", "rocm"],
        "accelerators": "2",
        "max_price_per_hour": "3.10",
        "duration_hours": "3",
        "allowed_countries": "nl, de",
        "accelerator_models": "H100, mi300x",
    }
    placed = developer.post("/jobs/new", bid)
    assert placed.status_code == 303
    job = db.scalars(select(Job).where(Job.account_id == developer.account.id)).one()
    assert (job.name, job.platforms, job.allowed_countries, job.accelerator_models) == (
        "fine-tune",
        ["cuda", "rocm"],
        ["DE", "NL"],
        ["h100-sxm", "mi300x"],
    )
    assert placed.headers["location"] == f"/jobs/{job.id}?notice=submitted"
    # The same form sent again (a double click) is the same bid, not a second one.
    again = developer.post("/jobs/new", bid)
    assert again.headers["location"] == placed.headers["location"]
    assert len(db.scalars(select(Job)).all()) == 1

    detail = developer.get(placed.headers["location"]).text
    assert "Your bid is in the order book." in detail
    assert "No offers are listed yet." in detail  # why it is not matched
    book = developer.get("/market?model=mi300x").text  # the bid is in the books it names
    bids = re.search(r'data-testid="bids">.*?</table>', book, re.S)
    assert bids
    assert "$3.10/h" in bids.group(0)

    assert developer.post(f"/jobs/{job.id}/bid", {"max_price_per_hour": "3.40"}).status_code == 303
    db.refresh(job)
    assert job.max_price_per_hour_micros == 3_400_000
    bad = developer.post(f"/jobs/{job.id}/bid", {"max_price_per_hour": "3.1234567"})
    assert bad.status_code == 422
    assert "at most 6 decimal places" in bad.text

    assert developer.post(f"/jobs/{job.id}/cancel").status_code == 303
    db.refresh(job)
    assert job.state == JobState.cancelled
    late = developer.post(f"/jobs/{job.id}/bid", {"max_price_per_hour": "3.50"})
    assert late.status_code == 409
    assert "only an open job&#39;s bid can change" in late.text


def test_a_refused_bid_form_keeps_what_was_typed(browser_for: Any) -> None:
    developer: Browser = browser_for(Role.developer)
    refused = developer.post(
        "/jobs/new", {"platforms": ["cuda"], "max_price_per_hour": "2", "name": "no-runtime"}
    )
    assert refused.status_code == 422
    assert "give the runtime" in refused.text
    assert 'value="no-runtime"' in refused.text
    no_platform = developer.post("/jobs/new", {"max_price_per_hour": "2", "duration_hours": "1"})
    assert no_platform.status_code == 422
    assert "give platforms" in no_platform.text


def test_a_default_broker_shows_how_to_submit_a_program_not_a_capacity_form(
    browser_for: Any, monkeypatch: Any
) -> None:
    from broker.config import get_settings

    developer: Browser = browser_for(Role.developer)
    monkeypatch.setenv("BROKER_ALLOW_CAPACITY_BIDS", "0")
    get_settings.cache_clear()
    try:
        page = developer.get("/jobs/new").text
        refused = developer.post(
            "/jobs/new", {"platforms": ["cpu"], "max_price_per_hour": "2", "duration_hours": "1"}
        )
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert "broker jobs submit my_model.py:predict" in page
    assert "Place the bid" not in page
    assert refused.status_code == 422
    assert "a job needs its program" in refused.text
    assert "capacity alone" in developer.get("/jobs/new").text  # a simulation broker


def test_a_developer_never_sees_another_developers_jobs(db: Session, browser_for: Any) -> None:
    alice: Browser = browser_for(Role.developer)
    bob: Browser = browser_for(Role.developer)
    admin: Browser = browser_for(Role.admin)
    hers = make_job(db, alice.account, name="alice-secret")
    his = make_job(db, bob.account, name="bob-job")
    assert "alice-secret" in alice.get("/jobs").text
    listing = bob.get("/jobs").text
    assert "bob-job" in listing
    assert "alice-secret" not in listing
    assert hers.id not in listing
    for url in (f"/jobs/{hers.id}", f"/jobs/{hers.id}/result"):
        response = bob.get(url)
        assert response.status_code == 404, url
        assert "alice-secret" not in response.text
    assert bob.post(f"/jobs/{hers.id}/cancel").status_code == 404
    assert bob.post(f"/jobs/{hers.id}/bid", {"max_price_per_hour": "9"}).status_code == 404
    db.refresh(hers)
    assert hers.state == JobState.open
    everyone = admin.get("/jobs").text  # admins see all, as in the API
    assert hers.id in everyone
    assert his.id in everyone


def test_a_provider_sees_only_its_own_offers_and_nodes(db: Session, browser_for: Any) -> None:
    mine: Browser = browser_for(Role.provider)
    theirs: Browser = browser_for(Role.provider)
    offer = make_offer(db, theirs.account)
    assert offer.id not in mine.get("/offers").text
    assert mine.get(f"/offers/{offer.id}").status_code == 404
    assert mine.post(f"/offers/{offer.id}/withdraw").status_code == 404
    assert offer.id in theirs.get("/offers").text


def test_an_admin_creates_an_account_and_clears_the_market(
    fresh_engine: Engine, fresh_client_for: ClientFactory
) -> None:
    with transaction(fresh_engine) as s:
        admin, admin_key = make_account(s, Role.admin)
        provider, _ = make_account(s, Role.provider)
        make_offer(s, provider, price_per_hour="2.49", count=8)
    ops = Browser(fresh_client_for(None), admin, admin_key)
    created = ops.post("/admin/accounts", {"name": "new-dev", "role": "developer"})
    assert created.status_code == 200
    key = re.search(r'data-testid="new-key">(bk_[^<]+)<', created.text)
    assert key, "the new key is shown once"
    taken = ops.post("/admin/accounts", {"name": "new-dev", "role": "developer"})
    assert taken.status_code == 409
    assert "already exists" in taken.text

    # The new developer signs in with that key and bids; the admin clears the market.
    with transaction(fresh_engine, write=False) as s:
        from broker.accounts.service import authenticate

        new_dev = authenticate(s, key.group(1))
        assert new_dev is not None
    dev = Browser(fresh_client_for(None), new_dev, key.group(1))
    bid = {"platforms": ["cuda"], "max_price_per_hour": "3.00", "duration_hours": "2"}
    job_url = dev.post("/jobs/new", bid).headers["location"].split("?")[0]
    cleared = ops.post("/admin/clear")
    assert cleared.status_code == 303
    round_id = cleared.headers["location"].removeprefix("/market?round=")
    market = ops.get(cleared.headers["location"]).text
    assert f"Clearing round <code>{round_id}</code> ran" in market
    row = re.search(
        rf'<tr class="selected">\s*<th scope="row"><code>{round_id}</code>.*?</tr>', market, re.S
    )
    assert row
    assert '<td class="num" data-testid="matched">1</td>' in row.group(0)
    job_page = dev.get(job_url).text
    assert "matched" in job_page
    assert "Locked price" in job_page
    assert "$2.49/h" in job_page
    assert "$4.98" in job_page  # 2.49 x 1 x 2 h, the estimate the round locked
    with transaction(fresh_engine, write=False) as s:
        assert s.scalars(select(Allocation)).one().price_per_hour_micros == 2_490_000


def test_lists_paginate(db: Session, browser_for: Any) -> None:
    developer: Browser = browser_for(Role.developer)
    for i in range(23):
        make_job(db, developer.account, name=f"job-{i:02d}")
    first = developer.get("/jobs").text
    assert "1&ndash;20 of 23" in first
    assert 'href="?offset=20"' in first
    second = developer.get("/jobs?offset=20").text
    assert "21&ndash;23 of 23" in second
    assert "job-00" in second
    assert "job-00" not in first
    filtered = developer.get("/jobs?state=cancelled").text
    assert "No jobs in state cancelled" in filtered
    assert developer.get("/jobs?state=bogus").status_code == 422


def test_pages_load_only_what_the_app_serves(browser_for: Any) -> None:
    """No CDN: every script, style and icon is a local file, and the policy says so."""
    admin: Browser = browser_for(Role.admin)
    for url in (
        "/market",
        "/jobs",
        "/offers",
        "/nodes",
        "/invoices",
        "/earnings",
        "/admin",
        "/signin",
    ):
        response = admin.get(url)
        assert response.status_code == 200
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy
        assert "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert response.headers["cache-control"] == "no-store"
        assets = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', response.text)
        assert assets
        for asset in assets:
            assert asset.startswith("/static/"), asset
            assert admin.get(asset).status_code == 200, asset
        assert "style=" not in response.text  # the policy would block inline styles
        assert "http://" not in response.text.replace("http://www.w3.org", "")
        assert "https://" not in response.text


def test_nodes_show_heartbeat_and_utilisation(db: Session, browser_for: Any) -> None:
    from broker.models.node import Node

    provider: Browser = browser_for(Role.provider)
    db.add(
        Node(
            id="node_page",
            provider_id=provider.account.id,
            name="gpu-box-1",
            region="europe-west4",
            country="NL",
            lat=53.4,
            lon=6.8,
            adapters=["nvidia"],
            devices=[
                {"id": "0", "name": "H100", "platform": "cuda", "utilization": 0.5},
                {"id": "1", "name": "H100", "platform": "cuda", "utilization": 0.25},
                {"id": "2", "name": "H100", "platform": "cuda", "healthy": False},
            ],
        )
    )
    db.flush()
    page = provider.get("/nodes").text
    assert "gpu-box-1" in page
    assert "online" in page
    assert "s ago" in page
    assert "37.5 %" in page  # mean utilisation of the devices that report it
    assert "1 unhealthy" in page


def test_refusals_render_after_the_transaction_rolled_back(
    fresh_engine: Engine, fresh_client_for: ClientFactory
) -> None:
    """With real transactions: the request's rows are gone when the error page is drawn."""
    with transaction(fresh_engine) as s:
        alice, _ = make_account(s, Role.developer)
        bob, bob_key = make_account(s, Role.developer)
        job = make_job(s, alice)
    other = Browser(fresh_client_for(None), bob, bob_key)
    for response in (
        other.get(f"/jobs/{job.id}"),
        other.post(f"/jobs/{job.id}/cancel"),
        other.get("/admin"),
        other.get("/jobs?state=nope"),
    ):
        assert response.status_code in (403, 404, 422), response.text
        assert bob.name in response.text  # the page still knows who is signed in


def test_pages_update_themselves_until_nothing_can_change(db: Session, browser_for: Any) -> None:
    developer: Browser = browser_for(Role.developer)
    job = make_job(db, developer.account)
    polling = 'hx-trigger="every 3s" hx-select="#live"'
    assert polling in developer.get("/jobs").text
    assert polling in developer.get("/market").text
    assert polling in developer.get(f"/jobs/{job.id}").text
    # What a poll fetches is the same page; htmx swaps in its live part only.
    assert 'id="live"' in developer.get(f"/jobs/{job.id}", headers={"HX-Request": "true"}).text
    developer.post(f"/jobs/{job.id}/cancel")
    final = developer.get(f"/jobs/{job.id}").text
    assert 'id="live"' in final
    assert "hx-trigger" not in final  # cancelled: the last poll ends the polling


def test_the_api_description_stays_the_apis(client_for: ClientFactory) -> None:
    paths = client_for(None).get("/openapi.json").json()["paths"]
    assert all(p.startswith("/v1/") or p in ("/healthz", "/readyz") for p in paths), paths


def test_emulated_capacity_is_labelled_wherever_it_shows(db: Session, browser_for: Any) -> None:
    provider: Browser = browser_for(Role.provider)
    developer: Browser = browser_for(Role.developer)
    emulated = make_offer(db, provider.account)
    emulated.emulated = True  # as an agent run with --emulate publishes it (demos)
    real = make_offer(db, provider.account, accelerator="mi300x")
    db.flush()
    listing = provider.get("/offers").text
    row = re.search(rf'<tr data-offer="{emulated.id}">.*?</tr>', listing, re.S)
    assert row is not None
    assert ">emulated</span>" in row.group(0)
    plain = re.search(rf'<tr data-offer="{real.id}">.*?</tr>', listing, re.S)
    assert plain is not None
    assert "emulated" not in plain.group(0)
    assert ">emulated</span>" in provider.get(f"/offers/{emulated.id}").text
    assert developer.get("/jobs").status_code == 200


def test_the_market_page_shows_unfillable_bids_apart(db: Session, browser_for: Any) -> None:
    provider: Browser = browser_for(Role.provider)
    developer: Browser = browser_for(Role.developer)
    make_offer(db, provider.account, count=8, price_per_hour="2.49")
    make_job(db, developer.account, accelerators=1000, max_price_per_hour="50")
    page = developer.get("/market?model=h100-sxm").text
    assert 'data-testid="unfillable"' in page
    assert "more accelerators than its largest offer lists (8)" in page
    assert "crossed" not in page


def test_the_market_page_shows_parts_of_accelerators(db: Session, browser_for: Any) -> None:
    provider: Browser = browser_for(Role.provider)
    developer: Browser = browser_for(Role.developer)
    make_offer(
        db, provider.account, count=1, price_per_hour="7.00", kind="mig",
        mig_instances=["3g.40gb@0", "3g.40gb@4"],
    )  # fmt: skip
    make_offer(
        db, provider.account, count=1, price_per_hour="2.00", kind="shared", shares=4,
        memory_per_share_gib=20,
    )  # fmt: skip
    make_job(db, developer.account, accelerators=0.25, accepts_shared=True)
    page = developer.get("/market?model=h100-sxm").text
    asks = re.search(r'data-testid="slice-asks">.*?</table>', page, re.S)
    assert asks is not None
    assert "h100-sxm 3g.40gb <small>isolated</small>" in asks.group(0)
    assert "h100-sxm 1/4 shared <small>compute not isolated</small>" in asks.group(0)
    bids = re.search(r'data-testid="slice-bids">.*?</table>', page, re.S)
    assert bids is not None
    assert "0.25 x h100-sxm, shared accepted" in bids.group(0)


def test_the_market_page_plots_price_against_carbon(db: Session, browser_for: Any) -> None:
    provider: Browser = browser_for(Role.provider)
    make_offer(db, provider.account, price_per_hour="2.49", pue=1.2, grid_g_per_kwh=500)
    make_offer(db, provider.account, price_per_hour="3.10", pue=1.1, grid_g_per_kwh=20)
    page = provider.get("/market").text
    chart = re.search(r'<figure class="chart chart-carbon">.*?</figure>', page, re.S)
    assert chart, page
    # 700 W x 1.2 / 1000 x 500 g = 420 g an hour; 700 W x 1.1 / 1000 x 20 g = 15.4 g.
    assert "$2.49/h, 420 g CO2e per accelerator-hour" in chart.group(0)
    assert "$3.10/h, 15 g CO2e per accelerator-hour" in chart.group(0)
    assert chart.group(0).count("<circle") == 2
    # The order book's asks say the same, per price level.
    book = provider.get("/market?model=h100-sxm").text
    cells = re.findall(r'data-testid="ask-carbon">(.*?)</td>', book)
    assert cells == ["420 g CO2e", "15 g CO2e"], cells


def test_the_job_page_shows_each_run_where_it_ran_and_why_it_ended(
    db: Session, browser_for: Any
) -> None:
    from broker.db import utcnow

    provider: Browser = browser_for(Role.provider)
    developer: Browser = browser_for(Role.developer)
    offer = make_offer(db, provider.account, region="europe-west4", country="NL")
    job = make_job(db, developer.account, name="runs-shown")
    run = make_run(db, job, offer, 90_000, ended_at=utcnow())
    run.end_reason = "run failed: the offer is cuda but this machine runs jobs on cpu"
    run.energy_kwh, run.gco2 = 0.77, 2500.0
    db.flush()
    page = developer.get(f"/jobs/{job.id}").text
    assert re.search(r'data-testid="carbon">0.77 kWh, 2.5 kg CO2e', page), page
    runs = re.search(r'<table data-testid="runs">.*?</table>', page, re.S)
    assert runs, page
    assert "listed by hand" in runs.group(0)
    assert "1 &times; h100-sxm" in runs.group(0)
    assert "europe-west4 (NL)" in runs.group(0)
    assert "the offer is cuda but this machine runs jobs on cpu" in runs.group(0)
    # Estimated against metered runtime: 1 h estimated, 90 accelerator-seconds on 1.
    assert "1 h / 1.5 min" in runs.group(0)
    assert 'data-testid="run-log"' not in page  # no lines reported: no log shown


def test_the_job_page_shows_each_runs_log(db: Session, browser_for: Any) -> None:
    from datetime import UTC, datetime

    from broker.models.run_log import RunLogLine

    provider: Browser = browser_for(Role.provider)
    developer: Browser = browser_for(Role.developer)
    offer = make_offer(db, provider.account)
    job = make_job(db, developer.account, name="log-shown")
    run = make_run(db, job, offer, 1_000)
    at = datetime(2026, 12, 3, 10, 0, 5, tzinfo=UTC)
    for seq, stream, text in ((0, "agent", "compiled for cpu in 0.120 s"),
                              (1, "program", "W xla: <slow> & costly")):  # fmt: skip
        db.add(
            RunLogLine(
                allocation_id=run.id, seq=seq, job_id=job.id, at=at, stream=stream, text=text
            )
        )
    db.flush()
    page = developer.get(f"/jobs/{job.id}").text
    log = re.search(r'<pre class="log" data-testid="run-log">(.*?)</pre>', page, re.S)
    assert log, page
    assert log.group(1).splitlines() == [
        "10:00:05 compiled for cpu in 0.120 s",
        "10:00:05 | W xla: &lt;slow&gt; &amp; costly",  # escaped: a program's text is not HTML
    ]


def test_an_unknown_page_answers_a_page_and_the_api_json(client_for: ClientFactory) -> None:
    client = client_for(None)
    page = client.get("/no-such-page", headers={"Accept": "text/html,*/*"})
    assert page.status_code == 404
    assert "text/html" in page.headers["content-type"]
    assert "There is no page at this address." in page.text
    assert 'href="/docs"' in page.text  # the usual layout, links included
    api = client.get("/v1/no-such-thing", headers={"Accept": "text/html"})
    assert api.status_code == 404
    assert api.json()["error"]["code"] == "not_found"
    assert client.get("/no-such-page").json()["error"]["code"] == "not_found"


def test_a_running_job_shows_when_it_should_end(db: Session, browser_for: Any) -> None:
    from datetime import timedelta

    from broker.db import utcnow

    provider: Browser = browser_for(Role.provider)
    developer: Browser = browser_for(Role.developer)
    offer = make_offer(db, provider.account)
    job = make_job(db, developer.account, name="eta")
    make_run(db, job, offer, 0)  # running, no end yet
    # An iterative job a quarter done after 60 s: about 180 s to go.
    job.state = JobState.running
    job.steps, job.steps_done = 400, 100
    job.started_at = utcnow() - timedelta(seconds=60)
    db.flush()
    page = developer.get(f"/jobs/{job.id}").text
    eta = re.search(r'data-testid="eta">in about ([0-9.]+) min', page)
    assert eta, page
    assert 2.9 <= float(eta.group(1)) <= 3.2
    assert "at the pace of its steps so far" in page


def test_fractions_show_on_the_offer_and_job_pages(db: Session, browser_for: Any) -> None:
    provider: Browser = browser_for(Role.provider)
    developer: Browser = browser_for(Role.developer)
    offer = make_offer(
        db, provider.account, kind="shared", count=1, shares=4, memory_per_share_gib=20
    )
    assert "shared, 4 shares of 20 GiB each" in provider.get("/offers").text
    job = make_job(db, developer.account, accelerators=0.5, accepts_shared=True)
    run = make_run(db, job, offer, 360_000, ended_at=None)
    run.slice, run.share_num, run.share_den = "2/4 shared on GPU 0", 1, 2
    db.flush()
    page = developer.get(f"/jobs/{job.id}").text
    assert "0.5 of one" in page
    assert "shared accepted" in page
    assert "0.5 x h100-sxm shared" in page
