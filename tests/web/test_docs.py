"""The API reference at /docs works offline: Swagger UI from the broker's own files."""

from __future__ import annotations

import re

from tests.conftest import ClientFactory


def test_docs_load_nothing_from_elsewhere(client_for: ClientFactory) -> None:
    client = client_for(None)
    docs = client.get("/docs")
    assert docs.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert "/static/swagger-ui/swagger-ui-bundle.js" in sources
    assert "/static/swagger-ui/swagger-ui.css" in sources
    assert [s for s in sources if "//" in s] == []  # no CDN, no other host
    for path in sources:
        assert client.get(path).status_code == 200, path
    assert client.get("/openapi.json").json()["info"]["title"] == "Compute Broker"
    assert client.get("/redoc").status_code == 404


def test_the_dashboard_links_the_api_reference(client_for: ClientFactory) -> None:
    page = client_for(None).get("/signin").text
    assert 'href="/docs"' in page
