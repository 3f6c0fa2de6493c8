"""The TPU adapter: chip counting, and the TPU API and metadata server on 127.0.0.1.

The local server answers as Google's do: the TPU API wants ``Authorization:
Bearer``, pages with ``nextPageToken`` and fails in Google's error JSON; the
metadata server wants ``Metadata-Flavor: Google`` and tags its answers with it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from adapters.base import AdapterError
from adapters.registry import offerable_counts
from adapters.tpu import TpuAdapter, chips, parse_accelerator_type, parse_node
from tests.adapters.conftest import sample

TOKEN = "ya29.test-token"
NO_ROLE_TOKEN = "ya29.valid-but-without-tpu-viewer"
NODES_PATH = "/v2/projects/acme-ml/locations/-/nodes"
METADATA_PATH = "/computeMetadata/v1/instance/attributes/accelerator-type"


class FakeGoogle(BaseHTTPRequestHandler):
    """The TPU API's nodes.list and the metadata server's accelerator-type."""

    requests: list[tuple[str, dict[str, str]]] = []
    delay = 0.0

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        type(self).requests.append((self.path, dict(self.headers)))
        time.sleep(self.delay)
        if url.path == METADATA_PATH:
            if self.headers.get("Metadata-Flavor") != "Google":
                self._send(403, "Missing Metadata-Flavor:Google header.", "text/html")
            else:
                self._send(200, sample("tpu/metadata-accelerator-type.txt"), "application/text")
        elif url.path == NODES_PATH:
            auth = self.headers.get("Authorization")
            if auth == f"Bearer {NO_ROLE_TOKEN}":
                self._send(403, sample("tpu/error-403.json"))
            elif auth != f"Bearer {TOKEN}":
                self._send(401, sample("tpu/error-401.json"))
            elif parse_qs(url.query).get("pageToken") == ["Cg50cmFpbi12NC0xEgJ2NA"]:
                self._send(200, sample("tpu/nodes-page2.json"))
            else:
                self._send(200, sample("tpu/nodes-page1.json"))
        else:
            self._send(404, json.dumps({"error": {"code": 404, "status": "NOT_FOUND"}}))

    def _send(self, status: int, body: str, content_type: str = "application/json") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.path.startswith("/computeMetadata"):
            self.send_header("Metadata-Flavor", "Google")
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):  # the client gave up (the timeout test)
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean


@pytest.fixture
def google() -> Iterator[str]:
    FakeGoogle.requests = []
    FakeGoogle.delay = 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGoogle)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("accelerator_type", "topology", "expected"),
    [
        ("v4-8", None, 4),  # v4 counts TensorCores, two per chip
        ("v5p-8", None, 4),
        ("v2-8", None, 4),
        ("v3-32", None, 16),
        ("v5litepod-8", None, 8),  # v5e counts chips
        ("v5litepod-256", None, 256),
        ("v6e-8", None, 8),
        ("v4-8", "2x2x1", 4),
        ("v5litepod-8", "2x4", 8),
        ("v5p-128", "4x4x4", 64),
    ],
)
def test_chips(accelerator_type: str, topology: str | None, expected: int) -> None:
    assert chips(accelerator_type, topology) == expected


def test_an_unrecognised_type_is_refused() -> None:
    with pytest.raises(AdapterError, match="unrecognised TPU accelerator type"):
        chips("tpu")


def test_a_multi_host_slice_is_not_offered_from_one_vm() -> None:
    device = parse_accelerator_type("v4-32")

    assert (device.model, device.count, device.offerable) == ("tpu-v4", 16, False)
    assert device.reason is not None
    assert "multi-host slice" in device.reason


def test_fleet_listing_pages_and_offers_only_ready_nodes(google: str) -> None:
    adapter = TpuAdapter(project="acme-ml", token=TOKEN, api_base=google)

    devices = adapter.discover()

    assert [d.id for d in devices] == [
        "serve-v5e-1",
        "train-v4-1",
        "train-v5p-1",
        "serve-v6e-1",
        "old-v3",
    ]
    assert offerable_counts(devices) == {"tpu-v5e": 8, "tpu-v4": 4, "tpu-v5p": 4}
    creating = devices[3]
    assert (creating.model, creating.count, creating.offerable) == ("tpu-v6e", 8, False)
    assert creating.reason == "node is CREATING, not READY"
    assert devices[4].reason == "v3-8 is not in the hardware catalog"
    assert devices[0].extra["zone"] == "us-west4-a"
    assert devices[0].extra["topology"] == "2x4"
    assert all(d.platform == "tpu" for d in devices)
    # Two pages, each with the bearer token.
    assert len(FakeGoogle.requests) == 2
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for _, h in FakeGoogle.requests)
    assert FakeGoogle.requests[1][0].endswith("pageToken=Cg50cmFpbi12NC0xEgJ2NA")


def test_an_unhealthy_ready_node_is_not_offered() -> None:
    node = json.loads(sample("tpu/nodes-page1.json"))["nodes"][1]
    node["health"] = "UNHEALTHY_MAINTENANCE"

    device = parse_node(node)

    assert not device.healthy
    assert not device.offerable
    assert device.reason == "node health is UNHEALTHY_MAINTENANCE"


def test_a_bad_token_gets_googles_message(google: str) -> None:
    adapter = TpuAdapter(project="acme-ml", token="expired", api_base=google)

    with pytest.raises(AdapterError) as caught:
        adapter.discover()

    message = str(caught.value)
    assert message.startswith("TPU API answered 401 UNAUTHENTICATED: Request had invalid")
    assert "gcloud auth print-access-token" in message


def test_no_token_is_refused_before_calling() -> None:
    with pytest.raises(AdapterError, match="needs an access token"):
        TpuAdapter(project="acme-ml").discover()


def test_permission_denied_is_reported(google: str) -> None:
    adapter = TpuAdapter(project="acme-ml", token=NO_ROLE_TOKEN, api_base=google)

    with pytest.raises(AdapterError, match=r"403 PERMISSION_DENIED: Permission 'tpu\.nodes\.list'"):
        adapter.discover()


def test_metadata_server_names_the_local_slice(google: str) -> None:
    adapter = TpuAdapter(metadata_url=f"{google}{METADATA_PATH}")

    [device] = adapter.discover()

    assert (device.name, device.model, device.count, device.offerable) == (
        "v5litepod-8",
        "tpu-v5e",
        8,
        True,
    )
    _, headers = FakeGoogle.requests[0]
    assert headers["Metadata-Flavor"] == "Google"


def test_something_else_at_the_metadata_address_is_refused(google: str) -> None:
    adapter = TpuAdapter(metadata_url=f"{google}/elsewhere")

    with pytest.raises(AdapterError, match="metadata server answered 404"):
        adapter.discover()


def test_an_unreachable_api_is_an_adapter_error() -> None:
    # Port 9 on loopback: nothing listens there.
    adapter = TpuAdapter(project="acme-ml", token=TOKEN, api_base="http://127.0.0.1:9", timeout=2)

    with pytest.raises(AdapterError, match="TPU discovery failed"):
        adapter.discover()


def test_a_slow_api_times_out(google: str) -> None:
    FakeGoogle.delay = 2.0
    adapter = TpuAdapter(project="acme-ml", token=TOKEN, api_base=google, timeout=0.3)

    with pytest.raises(AdapterError, match="TPU discovery failed"):
        adapter.discover()
