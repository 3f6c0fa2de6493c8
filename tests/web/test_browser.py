"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright,
against ``broker serve`` in its own process on 127.0.0.1 with a database of its own.

A provider lists capacity, a developer bids for it (from the browser and with the
SDK), an admin forces a clearing round, and the developer's open page shows the
match without a reload; the order book changes; the provider's machine runs the
jobs; the developer downloads the result and invoices the runs; another developer
sees none of it. Every page is saved as a screenshot (``var/screenshots/``, or
``BROKER_SCREENSHOT_DIR``).

Skipped when ``/usr/bin/chromium`` is missing (``apt-get install chromium``; never
``playwright install``), unless ``BROKER_REQUIRE_BROWSER=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("BROKER_SCREENSHOT_DIR") or REPO / "var" / "screenshots")

# CI sets BROKER_REQUIRE_BROWSER=1: there, a missing browser fails instead of skipping.
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and os.environ.get("BROKER_REQUIRE_BROWSER") != "1",
    reason="browser tests need Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """``broker serve`` in a process of its own, and the accounts of the story."""

    url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    keys: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "broker.cli", *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return done.stdout


@pytest.fixture(scope="module")
def broker(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    from tests.databases import fresh_database

    tmp = tmp_path_factory.mktemp("browser")
    with fresh_database(database_url, tmp) as url:
        port = _port()
        env = {
            **os.environ,
            "BROKER_DATABASE_URL": url,
            "BROKER_DATA_DIR": str(tmp / "data"),
            "BROKER_CLEAR_INTERVAL_SECONDS": "0",  # the admin clears the market from the page
            "BROKER_BILLING_INTERVAL_SECONDS": "0",
            "JAX_PLATFORMS": "cpu",
        }
        log = (tmp / "server.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "serve", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        server = Broker(f"http://127.0.0.1:{port}", env, process)
        try:
            _wait_ready(server, tmp / "server.log")
            for name, role in (
                ("gpu-farm", "provider"),
                ("alice", "developer"),
                ("bob", "developer"),
                ("ops", "admin"),
            ):
                out = server.cli("accounts", "create", name, "--role", role)
                server.keys[name] = out.strip().splitlines()[-1]
            yield server
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _wait_ready(server: Broker, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError("broker serve exited:\n" + log.read_text(errors="replace"))
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("broker serve did not come up in 60 s")


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


# Tables that do not fit: wider than their scrolling wrapper (the reader must scroll
# sideways to see a column) or than the window.
OVERFLOWING_TABLES = """() => [...document.querySelectorAll('table')].filter(t => {
    const box = t.closest('.table-wrap') || t.parentElement;
    return t.scrollWidth > box.clientWidth + 1
        || t.getBoundingClientRect().right > document.documentElement.clientWidth + 1;
}).map(t => `${t.dataset.testid || 'a table'}: ${t.scrollWidth}px in ${
    (t.closest('.table-wrap') || t.parentElement).clientWidth}px`)"""


class Person:
    """One person's browser window: it may reach the broker and nothing else."""

    def __init__(self, browser: Browser, broker: Broker, name: str, width: int = 1280) -> None:
        self.name, self.broker = name, broker
        self.context: BrowserContext = browser.new_context(
            viewport={"width": width, "height": 900}, accept_downloads=True
        )
        self.context.set_default_timeout(20_000)
        self.outside: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._only_the_broker)
        self.page: Page = self.context.new_page()
        self.page.on("console", self._console)

    def _only_the_broker(self, route: Any) -> None:
        if route.request.url.startswith(self.broker.url):
            route.continue_()
        else:  # no CDN, no fonts, no trackers: any other request is a failure
            self.outside.append(route.request.url)
            route.abort()

    def _console(self, message: Any) -> None:
        # A CSP violation or a script error is a console error.
        if message.type == "error":
            self.errors.append(f"{self.page.url}: {message.text}")

    def go(self, path: str) -> Page:
        self.page.goto(self.broker.url + path)
        return self.page

    def sign_in(self) -> None:
        page = self.go("/signin")
        page.get_by_label("API key").fill(self.broker.keys[self.name])
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator(".who strong")).to_have_text(self.name)

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        # caret="initial": hiding the caret would leave style="" on inputs, which htmx
        # then copies when it swaps (and the CSP rightly refuses).
        self.page.screenshot(path=SHOTS / f"{name}.png", full_page=True, caret="initial")

    def check(self) -> None:
        assert self.outside == [], f"{self.name}'s pages asked for {self.outside}"
        assert self.errors == [], f"{self.name}'s console: {self.errors}"
        labels = self.page.evaluate(
            """() => [...document.querySelectorAll('input:not([type=hidden]), select')]
                 .filter(e => !e.labels.length && !e.getAttribute('aria-label'))
                 .map(e => e.name)"""
        )
        assert labels == [], f"inputs without a label on {self.page.url}: {labels}"
        if self.page.viewport_size and self.page.viewport_size["width"] >= 1280:
            overflowing = self.page.evaluate(OVERFLOWING_TABLES)
            assert overflowing == [], f"tables wider than {self.page.url}'s page: {overflowing}"

    def close(self) -> None:
        self.context.close()


def _row(page: Page, marker: str) -> Any:
    return page.locator(f"tr[{marker}]")


def test_the_market_from_offer_to_invoice(chromium: Browser, broker: Broker) -> None:
    provider = Person(chromium, broker, "gpu-farm")
    alice = Person(chromium, broker, "alice")
    ops = Person(chromium, broker, "ops")
    bob = Person(chromium, broker, "bob")
    phone = Person(chromium, broker, "alice", width=390)
    try:
        _story(broker, provider, alice, ops, bob, phone)
    finally:
        for person in (provider, alice, ops, bob, phone):
            person.close()


def _story(
    broker: Broker, provider: Person, alice: Person, ops: Person, bob: Person, phone: Person
) -> None:
    # 1. The provider signs in and lists two CPU accelerators at $72 an hour.
    signin = provider.go("/signin")
    expect(signin.get_by_role("heading", name="Sign in")).to_be_visible()
    provider.shot("01-sign-in")
    provider.sign_in()
    page = provider.page
    expect(page).to_have_url(re.compile(r"/offers$"))
    page.get_by_label("Model", exact=True).fill("cpu")
    page.get_by_label("Accelerators", exact=True).fill("2")
    page.get_by_label("Ask, USD per accelerator-hour", exact=True).fill("72.00")
    page.get_by_label("Region", exact=True).fill("europe-west4")
    page.get_by_label("Country (ISO code)", exact=True).fill("NL")
    page.get_by_label("Latitude", exact=True).fill("53.44")
    page.get_by_label("Longitude", exact=True).fill("6.84")
    page.get_by_role("button", name="List the offer").click()
    expect(page.get_by_role("status")).to_contain_text("Listed offer")
    offer_row = page.locator("table[data-testid=offers] tbody tr").first
    expect(offer_row).to_contain_text("$72.00/h")
    expect(offer_row).to_contain_text("2 / 2")
    provider.check()
    provider.shot("02-provider-offers")

    # 2. The developer places a bid from the browser: one CPU for an hour, up to $80.
    alice.sign_in()
    page = alice.page
    expect(page).to_have_url(re.compile(r"/jobs$"))
    page.get_by_role("link", name="New bid").click()
    page.get_by_label("Name (optional)", exact=True).fill("capacity-bid")
    page.get_by_label("cuda", exact=True).uncheck()
    page.get_by_label("cpu", exact=True).check()
    page.get_by_label("Bid, USD per accelerator-hour", exact=True).fill("80")
    page.get_by_label("Runtime, hours", exact=True).fill("1")
    alice.check()
    alice.shot("03-developer-new-bid")
    page.get_by_role("button", name="Place the bid").click()
    expect(page.get_by_role("status")).to_contain_text("Your bid is in the order book.")
    expect(page.get_by_test_id("state")).to_contain_text("open")
    expect(page.get_by_test_id("why")).to_contain_text("1 of 1 offers pass every rule")
    alice.shot("04-developer-job-open")

    # ...and a program with the SDK: 40 steps, checkpointed every 10.
    sdk_job = _submit_program(broker)

    # 3. The order book has both bids and the ask.
    page = alice.go("/market?model=cpu")
    bids = page.get_by_test_id("bids")
    expect(bids).to_contain_text("$80.00/h")
    expect(bids.locator("tbody tr").first.locator("td").nth(1)).to_have_text("2")  # both jobs
    expect(page.get_by_test_id("asks")).to_contain_text("$72.00/h")
    expect(page.locator("figure.chart-depth svg path.bids")).to_have_count(1)
    alice.shot("05-market-before-the-round")

    # 4. The developer watches the jobs page while the admin clears the market.
    page = alice.go("/jobs")
    page.evaluate("window.stillThisPage = true")  # gone if the page were reloaded
    expect(page.get_by_test_id("jobs").locator("tbody tr")).to_have_count(2)
    ops.sign_in()
    expect(ops.page).to_have_url(re.compile(r"/market$"))
    ops.page.get_by_role("button", name="Clear the market now").click()
    expect(ops.page.get_by_role("status")).to_contain_text("ran; its result is below")
    expect(ops.page.locator("tr.selected [data-testid=matched]")).to_have_text("2")
    ops.check()
    ops.shot("06-admin-market-after-the-round")

    jobs = page.get_by_test_id("jobs")
    for row in (jobs.locator("tbody tr").nth(0), jobs.locator("tbody tr").nth(1)):
        expect(row).to_contain_text("matched", timeout=20_000)  # htmx polling, no reload
        expect(row).to_contain_text("cpu, europe-west4 (NL)")
        expect(row).to_contain_text("$72.00/h")
    assert page.evaluate("window.stillThisPage") is True
    alice.shot("07-developer-jobs-matched")

    # 5. The book changed: the bids left it, the ask has no free accelerators.
    page = alice.go("/market?model=cpu")
    expect(page.get_by_test_id("bids")).to_contain_text("No bids")
    free = page.get_by_test_id("asks").locator("tbody tr").first.locator("td").nth(1)
    expect(free).to_have_text("0")
    expect(page.locator("figure.chart-prices svg g.marker")).to_have_count(1)
    expect(page.locator("figure.chart-prices")).to_contain_text("$72.00")
    alice.shot("08-market-after-the-round")

    # 6. The provider's machine runs both jobs; the developer sees them finish.
    _run_matched_jobs(broker)
    page = alice.go(f"/jobs/{sdk_job}")
    expect(page.get_by_test_id("state")).to_contain_text("succeeded", timeout=20_000)
    expect(page.locator("#progress")).to_have_attribute("value", "40")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download the result").click()
    _check_result(download.value.path())
    alice.check()
    alice.shot("09-developer-job-succeeded")

    page = alice.go("/jobs")
    for row in (_row(page, "data-job").nth(0), _row(page, "data-job").nth(1)):
        expect(row).to_contain_text("succeeded")
        metered = row.get_by_test_id("metered").inner_text().split()[0]
        assert metered.startswith("$"), metered
        assert metered != "$0.00", metered
    alice.check()  # at 1280 px, no table wider than the page

    # 7. The runs are invoiced: lines, fee and total.
    page = alice.go("/invoices")
    expect(page.get_by_text("No invoices yet.")).to_be_visible()
    page.get_by_role("button", name="Invoice finished runs now").click()
    expect(page.get_by_role("status")).to_contain_text("1 new invoice.")
    invoice_link = page.get_by_test_id("invoices").locator("tbody tr th a").first
    invoice_id = invoice_link.inner_text()
    alice.shot("10-developer-invoices")
    invoice_link.click()
    expect(page.get_by_test_id("lines").locator("tbody tr")).to_have_count(2)
    expect(page.get_by_test_id("lines")).to_contain_text("$72.00/h")
    expect(page.get_by_test_id("lines")).to_contain_text("5 %")
    total = page.get_by_test_id("total").inner_text()
    assert re.fullmatch(r"\$\d+\.\d\d", total), total
    assert total != "$0.00", total
    expect(page.get_by_test_id("invoice-status")).to_contain_text("open")
    alice.check()
    alice.shot("11-developer-invoice")

    # 8. The provider's pages: earnings, nodes; the admin's.
    page = provider.go("/earnings")
    earned = page.get_by_test_id("earned").inner_text()
    assert earned != "$0.00", earned
    provider.check()
    provider.shot("12-provider-earnings")
    provider.go("/nodes")
    provider.shot("13-provider-nodes")
    ops.go("/admin")
    expect(ops.page.get_by_test_id("accounts")).to_contain_text("alice")
    ops.check()
    ops.shot("14-admin")
    ops.go("/invoices")
    expect(ops.page.get_by_test_id("invoices")).to_contain_text(invoice_id)

    # 9. Another developer sees none of it.
    bob.sign_in()
    page = bob.page
    expect(page.get_by_text("No jobs yet.")).to_be_visible()
    for path in (f"/jobs/{sdk_job}", f"/invoices/{invoice_id}"):
        response = page.goto(broker.url + path)
        assert response is not None
        assert response.status == 404, path
        expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    assert all("status of 404" in e for e in bob.errors), bob.errors  # the two above
    bob.errors.clear()
    bob.go("/invoices")
    expect(bob.page.get_by_text("No invoices yet.")).to_be_visible()
    bob.shot("15-other-developer-sees-nothing")
    bob.check()

    # Bids no offer can fill: each says why, with the nearest figure on offer, and
    # the jobs page still fits 1280 px; the book is not made to look crossed.
    with httpx.Client(base_url=broker.url, headers=_bearer(broker, "bob")) as api:
        for body in (
            {"accelerators": 1000, "max_price_per_hour": "500", "name": "a-very-long-name-" * 3},
            {"accelerators": 1, "max_price_per_hour": "0.0001"},
        ):
            bid = {"platforms": ["cpu"], "duration_hours": 1, **body}
            assert api.post("/v1/jobs", json=bid).status_code == 201
    page = bob.go("/jobs")
    why = page.get_by_test_id("why")
    expect(why.first).to_be_visible()
    expect(page.get_by_test_id("jobs")).to_contain_text("the cheapest ask is $72.00/h")
    expect(page.get_by_test_id("jobs")).to_contain_text("the largest offer has")
    bob.check()
    bob.shot("15b-other-developer-unmatched-bids")
    page = bob.go("/market?model=cpu")
    expect(page.get_by_test_id("unfillable")).to_contain_text("$500.00/h")
    expect(page.locator("section[aria-labelledby=books-h]")).not_to_contain_text("crossed")
    bob.check()

    # 10. At phone width every page fits; wide tables scroll inside their box.
    phone.sign_in()
    for path, name in (
        ("/market?model=cpu", "market"),
        ("/jobs", "jobs"),
        ("/invoices", "invoices"),
    ):
        page = phone.go(path)
        width = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert width <= 0, f"{path} is {width}px wider than the phone"
        phone.shot(f"16-phone-{name}")
    phone.check()

    # 11. The API reference, linked from every page, works with no other host reachable.
    page = alice.go("/jobs")
    page.get_by_role("link", name="API reference").click()
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Compute Broker")
    expect(page.locator(".swagger-ui .opblock-tag").first).to_be_visible()
    assert alice.outside == [], alice.outside

    # 12. Signing out ends the session.
    page = alice.go("/jobs")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    alice.go("/jobs")
    expect(alice.page).to_have_url(re.compile(r"/signin\?next=%2Fjobs$"))
    for person in (provider, alice, ops, bob):
        person.check()


STEPS, EVERY = 40, 10


def _bearer(broker: Broker, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {broker.keys[name]}"}


def _step(state: Any) -> Any:
    import jax.numpy as jnp

    w, count = state
    return jnp.tanh(w) * 0.5 + 0.1, count + 1


def _submit_program(broker: Broker) -> str:
    import jax.numpy as jnp

    from broker.sdk import Client

    with Client(broker.url, broker.keys["alice"], retries=1) as client:
        job = client.submit(
            _step,
            (jnp.ones((4, 4), jnp.float32), jnp.int32(0)),
            steps=STEPS,
            checkpoint_every=EVERY,
            platforms=("cpu",),
            max_price_per_hour="80",
            name="sdk-train",
        )
    return str(job.id)


def _run_matched_jobs(broker: Broker) -> None:
    """The provider's machine: the program runs with the SDK's runner; the capacity
    bid is started, held a moment and reported finished, as a provider would."""
    from broker.sdk import ProviderClient, run_allocation

    with ProviderClient(broker.url, broker.keys["gpu-farm"], retries=1) as provider:
        orders = provider.work()
        assert len(orders) == 2
        program = [o for o in orders if o["artifact"]]
        capacity = [o for o in orders if not o["artifact"]]
        runs = [threading.Thread(target=run_allocation, args=(provider, o)) for o in program]
        for run in runs:
            run.start()
        for order in capacity:
            provider.start(order["allocation_id"])
        time.sleep(2.0)
        for order in capacity:
            provider.finish(order["allocation_id"], "succeeded", accelerator_seconds=2.0)
        for run in runs:
            run.join(timeout=120)


def _check_result(path: Path) -> None:
    import numpy as np

    from broker.portable import arrays

    w, count = arrays.decode(path.read_bytes())
    expected: Any = np.ones((4, 4), np.float32)
    for _ in range(STEPS):
        expected = np.tanh(expected) * 0.5 + 0.1
    np.testing.assert_allclose(w, expected, rtol=1e-5)
    assert int(count) == STEPS
