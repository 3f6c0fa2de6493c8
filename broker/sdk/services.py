"""A deployed service, as the developer's client sees it: call it, watch it, take it down."""

from __future__ import annotations

import time
from typing import Any

import jax

from broker.portable import arrays
from broker.portable.artifact import Artifact
from broker.sdk.http import BINARY, BrokerError, Connection, Http


class Service:
    """A service as last read from the broker (``refresh()`` reads it again)."""

    def __init__(self, client: Connection, data: dict[str, Any], artifact: Artifact | None = None):
        self._client = client
        self.data = data
        self._artifact = artifact
        self.last_replica: str | None = None  # which replica answered the last call

    def __repr__(self) -> str:
        return f"Service({self.id}, {self.state}, {len(self.replicas)} replica(s))"

    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def state(self) -> str:
        return str(self.data["state"])

    @property
    def replicas(self) -> list[dict[str, Any]]:
        return list(self.data.get("replicas", []))

    def refresh(self) -> Service:
        self.data = self._client.http.json("GET", f"/v1/services/{self.id}")
        return self

    def undeploy(self) -> Service:
        self.data = self._client.http.json("DELETE", f"/v1/services/{self.id}")
        return self

    def wait_ready(self, replicas: int = 1, timeout: float = 120.0, poll: float = 0.5) -> Service:
        """Wait until ``replicas`` replicas are connected and answering; raises
        TimeoutError (with what the service says) if they are not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if self.state in ("failed", "undeployed"):
                raise BrokerError(409, "service_" + self.state, f"{self}: {self.data.get('error')}")
            if sum(r["healthy"] for r in self.replicas) >= replicas:
                return self
            if time.monotonic() >= deadline:
                why = self.data.get("unmatched") or "its replicas are starting"
                raise TimeoutError(f"{self} is not ready after {timeout:g} s: {why}")
            time.sleep(poll)

    def infer_bytes(self, body: bytes, location: tuple[float, float] | None = None) -> bytes:
        """One request as bytes (an arrays bundle of the arguments) and its answer."""
        headers = dict(BINARY)
        if location is not None:
            headers["X-Broker-Location"] = f"{location[0]},{location[1]}"
        response = self._to_relay().request(
            "POST", f"/v1/services/{self.id}/infer", content=body, headers=headers
        )
        self.last_replica = response.headers.get("X-Broker-Replica")
        return response.content

    def _to_relay(self) -> Http:
        """Requests go straight to the relay process where the broker names one (a hop
        less than through its web workers), else to the broker."""
        relay = self.data.get("relay")
        return self._client.http_for(relay) if relay else self._client.http

    def infer(self, *args: Any, location: tuple[float, float] | None = None) -> Any:
        """Call the service on ``args`` (as the example it was deployed with: same
        shapes and types); returns what the function returns. ``location``: the
        caller's (lat, lon), which picks the replica nearest it."""
        body = arrays.encode([jax.numpy.asarray(x) for x in jax.tree.leaves(tuple(args))])
        leaves = [jax.numpy.asarray(x) for x in arrays.decode(self.infer_bytes(body, location))]
        return jax.tree.unflatten(self._output_tree(), leaves)

    def _output_tree(self) -> Any:
        if self._artifact is None:
            sha = self._client.http.json("GET", f"/v1/services/{self.id}")["artifact"]
            data = self._client.http.download(f"/v1/artifacts/{sha}/content", sha)
            self._artifact = Artifact.from_bytes(data)
        return self._artifact.exported.out_tree
