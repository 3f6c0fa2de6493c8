"""The dashboard's service pages: replicas, last minute's figures per user region, scale
events; a developer sees only their own services."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from broker.config import get_settings
from broker.db import utcnow
from broker.models.account import Role
from broker.models.service import ServiceWindow
from broker.services import service as services
from tests.broker.services.test_placement import deploy, offers, upload
from tests.conftest import ClientFactory


def test_a_service_page_shows_replicas_regions_and_events(
    db: Session, browser_for: Any, client_for: ClientFactory
) -> None:
    alice, bob = browser_for(Role.developer), browser_for(Role.developer)
    api = upload(client_for(alice.key))
    offers(db, "eu", "us")
    service = deploy(api, name="chat")
    services.reconcile(db, get_settings())
    db.add(
        ServiceWindow(
            service_id=service["id"],
            scope="region:1",
            ended_at=utcnow(),
            seconds=5.0,
            requests=40,
            errors=1,
            within_slo=38,
            p50_ms=12.5,
            p95_ms=30.0,
            p99_ms=41.0,
        )
    )
    db.flush()
    listing = alice.get("/services").text
    assert "chat" in listing
    page = alice.get(f"/services/{service['id']}").text
    assert "waiting for cpu in us-east4" in page
    assert "new-york" in page
    assert "12.5 ms" in page
    assert "deployed by its owner" in page
    assert "chat" not in bob.get("/services").text
    assert bob.get(f"/services/{service['id']}").status_code == 404
