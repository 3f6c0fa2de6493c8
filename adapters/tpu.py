"""Google Cloud TPUs: the TPU VM this agent runs on, or a provider's whole fleet.

On a TPU VM the GCE metadata server names the slice (``accelerator-type``, the
same string as the node's ``acceleratorType``, e.g. ``v5litepod-8``). For a fleet,
the Cloud TPU v2 API lists the nodes of a project in a zone (``-`` for all zones),
page by page, and each READY node is offered.

The number after the dash counts TensorCores on v2, v3, v4 and v5p, which have two
per chip (``v4-8`` and ``v5p-8`` are 4 chips), and chips on v5e (``v5litepod-N``)
and v6e, which have one (Google's per-version "supported configurations" pages).
Where the API gives ``acceleratorConfig.topology`` (``2x2x1``) the chips are its
product.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import httpx

from adapters import catalog
from adapters.base import AdapterError, Device

log = logging.getLogger(__name__)

METADATA_URL = (
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/accelerator-type"
)
API_BASE = "https://tpu.googleapis.com"

# Generations whose accelerator-type suffix counts TensorCores, two per chip.
_TENSORCORE_COUNTED = {"v2", "v3", "v4", "v5p"}
# Chips one TPU VM host drives; a slice with more spans several hosts.
_CHIPS_PER_HOST = {"v2": 4, "v3": 4, "v4": 4, "v5p": 4, "v5litepod": 8, "v5e": 8, "v6e": 8}
_HEALTHY = {None, "HEALTHY", "HEALTH_UNSPECIFIED"}
_TYPE = re.compile(r"^(?P<generation>[a-z0-9]+)-(?P<size>\d+)$")


def chips(accelerator_type: str, topology: str | None = None) -> int:
    """TPU chips in a slice of ``accelerator_type`` (``v4-8`` -> 4), or the
    product of ``topology`` (``2x2x1`` -> 4) when the API gives one."""
    if topology:
        return math.prod(int(n) for n in topology.lower().split("x"))
    match = _TYPE.match(accelerator_type.strip().lower())
    if not match:
        raise AdapterError(f"unrecognised TPU accelerator type {accelerator_type!r}")
    size = int(match["size"])
    return max(1, size // 2) if match["generation"] in _TENSORCORE_COUNTED else size


def _generation(accelerator_type: str) -> str:
    return accelerator_type.strip().lower().rsplit("-", 1)[0]


def _model(accelerator_type: str) -> str | None:
    spec = catalog.lookup(_generation(accelerator_type))
    return spec.key if spec is not None and spec.platform == "tpu" else None


def parse_accelerator_type(text: str) -> Device:
    """The local TPU VM's slice, from the metadata server's ``accelerator-type``."""
    accelerator_type = text.strip()
    count = chips(accelerator_type)
    model = _model(accelerator_type)
    reasons = []
    if model is None:
        reasons.append(f"{accelerator_type} is not in the hardware catalog")
    per_host = _CHIPS_PER_HOST.get(_generation(accelerator_type))
    if per_host is not None and count > per_host:
        # This VM drives only its own chips; a multi-host slice is offered whole,
        # by the fleet (API) mode, or not at all.
        reasons.append(f"a multi-host slice ({count} chips); offer it with the TPU API fleet mode")
    return Device(
        id="local",
        name=accelerator_type,
        model=model,
        platform="tpu",
        count=count,
        offerable=not reasons,
        reason="; ".join(reasons) or None,
        extra={"accelerator_type": accelerator_type},
    )


def parse_node(node: dict[str, Any]) -> Device:
    """One node of a ``projects.locations.nodes.list`` response."""
    full_name = str(node.get("name", ""))
    accelerator_type = str(node.get("acceleratorType", ""))
    config = node.get("acceleratorConfig") or {}
    topology = config.get("topology")
    state, health = node.get("state"), node.get("health")
    model = _model(accelerator_type)
    reasons = []
    if model is None:
        reasons.append(f"{accelerator_type} is not in the hardware catalog")
    if state != "READY":
        reasons.append(f"node is {state or 'in an unknown state'}, not READY")
    if health not in _HEALTHY:
        detail = node.get("healthDescription")
        reasons.append(f"node health is {health}" + (f": {detail}" if detail else ""))
    # name is projects/{project}/locations/{zone}/nodes/{node}
    parts = full_name.split("/")
    extra = {
        "zone": parts[3] if len(parts) > 3 else "",
        "state": str(state),
        "accelerator_type": accelerator_type,
        "topology": str(topology or ""),
        "runtime_version": str(node.get("runtimeVersion", "")),
    }
    return Device(
        id=parts[-1],
        name=accelerator_type,
        model=model,
        platform="tpu",
        count=chips(accelerator_type, topology),
        healthy=health in _HEALTHY,
        offerable=not reasons,
        reason="; ".join(reasons) or None,
        extra={k: v for k, v in extra.items() if v},
    )


def _google_error(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        detail = f"{error.get('status', '')}: {error.get('message', '')}"
    except (ValueError, KeyError, TypeError):
        detail = response.text.strip()[:200]
    hint = " (check the access token: gcloud auth print-access-token)"
    return f"{response.status_code} {detail}" + (hint if response.status_code == 401 else "")


class TpuAdapter:
    """Cloud TPUs: the fleet of ``project`` through the TPU API, else this TPU VM."""

    name: ClassVar[str] = "tpu"
    vendor: ClassVar[str] = "google"
    platform: ClassVar[str] = "tpu"
    limits: ClassVar[tuple[str, ...]] = (
        "utilisation is not reported: the TPU API and metadata server do not give it",
        "a multi-host slice is offered only through the TPU API fleet mode",
        "only READY, healthy nodes are offered; queued resources are not listed",
    )

    def __init__(
        self,
        project: str | None = None,
        zone: str | None = None,
        token: str | None = None,
        api_base: str = API_BASE,
        metadata_url: str = METADATA_URL,
        timeout: float = 10.0,
    ) -> None:
        self.project = project
        self.zone = zone or "-"
        self.token = token
        self.api_base = api_base.rstrip("/")
        self.metadata_url = metadata_url
        self.timeout = timeout

    def present(self) -> bool:
        """Fleet mode when a project is set, else whether this is a TPU VM."""
        if self.project:
            return True
        # A TPU VM's chips are PCI devices of Google (vendor 0x1ae0), as JAX checks.
        return any(
            vendor.read_text().strip() == "0x1ae0"
            for vendor in Path("/sys/bus/pci/devices").glob("*/vendor")
        )

    def discover(self) -> Sequence[Device]:
        """List the fleet's nodes, or this VM's slice; AdapterError on any HTTP failure."""
        try:
            with httpx.Client(timeout=self.timeout) as client:
                return self._fleet(client) if self.project else [self._local(client)]
        except httpx.HTTPError as exc:
            raise AdapterError(f"TPU discovery failed: {exc}") from None

    def _local(self, client: httpx.Client) -> Device:
        response = client.get(self.metadata_url, headers={"Metadata-Flavor": "Google"})
        if response.status_code != 200:
            raise AdapterError(
                f"metadata server answered {response.status_code} at {self.metadata_url}"
            )
        # The real server tags its answers; anything else is not the metadata server.
        if response.headers.get("Metadata-Flavor") != "Google":
            raise AdapterError(f"{self.metadata_url} is not a GCE metadata server")
        return parse_accelerator_type(response.text)

    def _fleet(self, client: httpx.Client) -> list[Device]:
        if not self.token:
            raise AdapterError("the TPU API needs an access token (--tpu-token)")
        url = f"{self.api_base}/v2/projects/{self.project}/locations/{self.zone}/nodes"
        headers = {"Authorization": f"Bearer {self.token}"}
        devices: list[Device] = []
        params: dict[str, str] = {}
        for _ in range(1000):  # a bound, so a server that repeats a page cannot loop forever
            response = client.get(url, headers=headers, params=params)
            if response.status_code != 200:
                raise AdapterError(f"TPU API answered {_google_error(response)}")
            try:
                page = response.json()
            except ValueError:
                page = None
            if not isinstance(page, dict):
                raise AdapterError(f"TPU API answered 200 without a JSON object at {url}")
            devices.extend(parse_node(node) for node in page.get("nodes", []))
            if page.get("unreachable"):
                log.warning("TPU API could not reach %s", ", ".join(page["unreachable"]))
            token = page.get("nextPageToken")
            if not token:
                return devices
            params = {"pageToken": token}
        raise AdapterError("TPU API kept returning pages; stopped after 1000")
