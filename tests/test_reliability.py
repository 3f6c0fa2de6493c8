"""Reliability with real server processes.

Two `broker serve` processes on one database, everything at once.

Developers submit (and retry submissions on the other server), cancel and
generate invoices; providers list, reprice and withdraw offers and run the jobs
matched to them; both servers run clearing rounds and billing passes every
fraction of a second. Afterwards the database must show that no offer was
oversold, no job was assigned twice, no retry made a second job and no run was
billed twice or left out. The locks are the database's (row locks, the
clearing leader's advisory lock on PostgreSQL, the file lock beside a SQLite
database), so this runs on both; CI runs it on PostgreSQL 15 as well.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from broker.db import make_engine, transaction
from broker.migrate import upgrade
from broker.models.account import Role
from broker.models.billing import InvoiceLine
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.market import Allocation, AllocationStatus
from broker.models.offer import Offer
from tests.factories import job_body, make_account, offer_body
from tests.test_live_server import Server

SECONDS = 12
MAX_SECONDS = 120


def _runs_done(engine: Any) -> int:
    with transaction(engine, write=False) as db:
        return (
            db.scalar(
                select(func.count())
                .select_from(Allocation)
                .where(Allocation.usage_ms > 0, Allocation.status == AllocationStatus.finished)
            )
            or 0
        )


def _servers(url: str, tmp_path: Path) -> list[Server]:
    servers = []
    for i in range(2):
        (tmp_path / f"server{i}").mkdir()
        server = Server(url, tmp_path / f"server{i}", clear_interval=0.3)
        server.env.update(
            BROKER_BILLING_INTERVAL_SECONDS="0.5",
            BROKER_BILLING_PERIOD="day",
            BROKER_RATE_LIMIT_PER_SECOND="0",
        )
        servers.append(server)
    return servers


def test_two_servers_never_oversell_assign_twice_or_bill_twice(
    empty_database_url: str, tmp_path: Path
) -> None:
    upgrade("head", url=empty_database_url)
    engine = make_engine(empty_database_url)
    with transaction(engine) as db:
        developers = [make_account(db, Role.developer)[1] for _ in range(3)]
        providers = [make_account(db, Role.provider)[1] for _ in range(2)]
        admin = make_account(db, Role.admin)[1]
    servers = _servers(empty_database_url, tmp_path)
    for server in servers:
        server.start()
    stop = threading.Event()
    errors: list[str] = []
    keys: list[str] = []
    opened: list[httpx.Client] = []

    def client(key: str, i: int) -> httpx.Client:
        made = httpx.Client(
            base_url=servers[i % 2].base, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        opened.append(made)
        return made

    def check(answer: httpx.Response, *ok: int) -> Any:
        if answer.status_code not in ok:
            errors.append(
                f"{answer.request.method} {answer.request.url.path}: "
                f"{answer.status_code} {answer.text[:300]}"
            )
        return (
            answer.json()
            if answer.headers.get("content-type", "").startswith("application/json")
            else None
        )

    def developer(n: int) -> None:
        rng = random.Random(n)
        clients = [client(developers[n], 0), client(developers[n], 1)]
        i = 0
        while not stop.is_set():
            i += 1
            key = uuid.uuid4().hex
            keys.append(key)
            body = job_body(
                accelerators=rng.choice([1, 1, 2]),
                duration_hours=0.001,
                max_price_per_hour=rng.choice(["2.00", "3.00", "4.00"]),
            )
            # The same submission sent to both servers at once: one job.
            with ThreadPoolExecutor(2) as pool:
                answers = list(
                    pool.map(
                        lambda c, body=body, key=key: c.post(
                            "/v1/jobs", json=body, headers={"Idempotency-Key": key}
                        ),
                        clients,
                    )
                )
            for answer in answers:
                check(answer, 200, 201)
            if rng.random() < 0.2:
                job_id = answers[0].json()["id"]
                check(clients[i % 2].post(f"/v1/jobs/{job_id}/cancel"), 200, 409)
            if rng.random() < 0.2:
                check(clients[i % 2].post("/v1/invoices/generate", json={}), 200)
            time.sleep(rng.uniform(0, 0.05))

    def provider(n: int) -> None:
        rng = random.Random(100 + n)
        clients = [client(providers[n], 0), client(providers[n], 1)]
        offers = [
            check(
                clients[k % 2].post("/v1/offers", json=offer_body(count=3, price_per_hour="2.00")),
                201,
            )["id"]
            for k in range(3)
        ]
        i = 0
        while not stop.is_set():
            i += 1
            c = clients[i % 2]
            for order in check(c.get("/v1/allocations"), 200) or []:
                alloc = order["allocation_id"]
                started = c.post(f"/v1/allocations/{alloc}/start")
                if started.status_code != 200:
                    check(started, 409)  # cancelled meanwhile
                    continue
                c.post(
                    f"/v1/allocations/{alloc}/progress",
                    json={"steps_done": 0, "accelerator_seconds": 0.01},
                )
                done = c.post(
                    f"/v1/allocations/{alloc}/finish",
                    json={"outcome": "succeeded", "accelerator_seconds": 0.02},
                )
                check(done, 200, 409)
            if rng.random() < 0.1:
                offer = rng.choice(offers)
                price = rng.choice(["1.50", "2.00", "2.50"])
                check(c.patch(f"/v1/offers/{offer}", json={"price_per_hour": price}), 200, 409)
            time.sleep(rng.uniform(0, 0.05))

    def operator() -> None:
        clients = [client(admin, 0), client(admin, 1)]
        while not stop.is_set():
            with ThreadPoolExecutor(2) as pool:  # both servers clear at once: one wins
                for answer in pool.map(lambda c: c.post("/v1/market/clear"), clients):
                    check(answer, 200, 409)
                for answer in pool.map(lambda c: c.post("/v1/invoices/generate", json={}), clients):
                    check(answer, 200)
            time.sleep(0.2)

    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(developer, n) for n in range(3)]
            futures += [pool.submit(provider, n) for n in range(2)]
            futures.append(pool.submit(operator))
            # At least SECONDS of everything at once, and on until some jobs have run
            # (a loaded machine is slow to start the clearing processes' solvers).
            began = time.monotonic()
            while time.monotonic() - began < SECONDS or (
                _runs_done(engine) < 8 and time.monotonic() - began < MAX_SECONDS
            ):
                time.sleep(1)
            stop.set()
            for future in futures:
                future.result()
        # One last pass, after everything stopped: every ended run gets billed.
        final = httpx.post(
            f"{servers[0].base}/v1/invoices/generate",
            json={},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=60,
        )
        assert final.status_code == 200, final.text
    finally:
        for made in opened:
            made.close()
        for server in servers:
            server.stop()

    assert errors == [], "\n".join(errors[:20])
    with transaction(engine, write=False) as db:
        jobs = db.scalars(select(Job)).all()
        allocations = db.scalars(select(Allocation)).all()
        offers = db.scalars(select(Offer)).all()
        lines = db.scalars(select(InvoiceLine)).all()
        by_key = db.execute(
            select(Job.idempotency_key, func.count()).group_by(Job.idempotency_key)
        ).all()
    engine.dispose()

    assert len(jobs) > 20, "the load did not get going"
    assert sum(1 for a in allocations if a.usage_ms > 0) > 5, "no job ran"
    # No retry made a second job.
    assert all(n == 1 for _, n in by_key)
    assert {k for k, _ in by_key} == set(keys)
    # No offer oversold: what active matches hold plus what is free is what is listed.
    held = Counter[str]()
    for a in allocations:
        if a.status == AllocationStatus.active:
            held[a.offer_id] += a.accelerators
    for offer in offers:
        assert offer.count >= 0
        assert held[offer.id] + offer.count == offer.capacity, offer.id
    # No job assigned twice; a job holds a match exactly while matched or running.
    active = Counter(a.job_id for a in allocations if a.status == AllocationStatus.active)
    for job in jobs:
        expected = 1 if job.state in (JobState.matched, JobState.running) else 0
        assert active[job.id] == expected, (job.id, job.state)
        assert job.usage_ms == sum(a.usage_ms for a in allocations if a.job_id == job.id)
    # Every ended run with usage billed exactly once.
    billed = Counter(line.allocation_id for line in lines)
    assert all(n == 1 for n in billed.values())
    ended = {a.id for a in allocations if a.status != AllocationStatus.active and a.usage_ms > 0}
    assert set(billed) == ended


def test_a_lost_database_connection_is_reconnected(empty_database_url: str, tmp_path: Path) -> None:
    """PostgreSQL restarted, or a proxy dropped the broker's connections: the next
    request checks its pooled connection first and opens a new one."""
    if not empty_database_url.startswith("postgresql"):
        pytest.skip("SQLite has no server connection to lose")
    upgrade("head", url=empty_database_url)
    engine = make_engine(empty_database_url)
    with transaction(engine) as db:
        key = make_account(db, Role.developer)[1]
    server = Server(empty_database_url, tmp_path)
    server.start()
    try:
        with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {key}"}) as c:
            assert c.get("/v1/jobs").status_code == 200
            with engine.connect() as conn:
                dropped = conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalar()
            assert dropped
            assert c.get("/v1/jobs").status_code == 200
            assert c.post("/v1/jobs", json=job_body()).status_code == 201
    finally:
        server.stop()
        engine.dispose()


def test_a_crash_while_an_agent_reports_counts_its_usage_once(
    empty_database_url: str, tmp_path: Path
) -> None:
    """The broker is killed (SIGKILL) between an agent's reports, and the agent sends its
    last report again once the broker is back: the usage is counted once."""
    from broker.config import get_settings
    from broker.market.clearing import run_round

    upgrade("head", url=empty_database_url)
    engine = make_engine(empty_database_url)
    with transaction(engine) as db:
        dev_key = make_account(db, Role.developer)[1]
        provider_key = make_account(db, Role.provider)[1]
    server = Server(empty_database_url, tmp_path)
    server.start()
    dev = httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {dev_key}"})
    agent = httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {provider_key}"})
    try:
        assert agent.post("/v1/offers", json=offer_body(count=1)).status_code == 201
        job = dev.post("/v1/jobs", json=job_body()).json()
        run_round(engine, get_settings(), "manual")
        (order,) = agent.get("/v1/allocations").json()
        alloc = order["allocation_id"]
        assert agent.post(f"/v1/allocations/{alloc}/start").status_code == 200
        time.sleep(0.7)
        report = {"steps_done": 0, "accelerator_seconds": 0.5}
        assert agent.post(f"/v1/allocations/{alloc}/progress", json=report).status_code == 200

        assert server.process is not None
        server.process.kill()  # no shutdown: mid-flight state is whatever was committed
        server.process.wait()
        server.start()
        again = agent.post(f"/v1/allocations/{alloc}/progress", json=report)
        assert again.status_code == 200
        assert again.json()["accelerator_seconds"] == 0.5
        time.sleep(0.3)
        done = agent.post(
            f"/v1/allocations/{alloc}/finish",
            json={"outcome": "succeeded", "accelerator_seconds": 0.9},
        )
        assert done.status_code == 200, done.text
        assert dev.get(f"/v1/jobs/{job['id']}").json()["accelerator_seconds"] == 0.9
        (invoice,) = dev.post("/v1/invoices/generate", json={}).json()["invoices"]
        assert invoice["line_count"] == 1
        assert dev.post("/v1/invoices/generate", json={}).json()["invoices"] == []
    finally:
        dev.close()
        agent.close()
        server.stop()
        engine.dispose()
