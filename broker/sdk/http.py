"""The SDK's HTTP layer: the API key, retries that are safe, and errors that say what happened."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any, Self

import httpx

# Every request the SDK sends is safe to repeat (see Http), so a 500 (a pool timeout,
# a database lock, a restart) is retried like the gateway errors.
_RETRY_STATUS = {500, 502, 503, 504}


class BrokerError(Exception):
    """The broker refused a request. ``status``, ``code`` and ``field`` come from its
    error body (``{"error": {"code", "message", "field"}}``)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})" + (f" [{field}]" if field else ""))
        self.status, self.code, self.message, self.field = status, code, message, field


class BrokerUnavailable(BrokerError):
    """The broker could not be reached, or kept answering 'try again', after retries."""


class Http:
    """An httpx client for one broker and one API key.

    Every request the SDK sends is safe to repeat (reads, uploads of
    content-addressed bytes, job submissions with an Idempotency-Key, and reports
    the broker deduplicates: a progress or usage report carries running totals, a
    checkpoint or an end the same again changes nothing), so each is retried with
    exponential backoff (capped at 30 s) when the broker is unreachable, drops the
    connection or answers 500/502/503/504: ``retries`` times, and for at least
    ``retry_seconds`` in all (a provider's agent keeps trying for a node timeout).
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 0.5,
        retry_seconds: float = 0.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.retry_seconds = retries, backoff, retry_seconds
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "broker-sdk/0.1"},
            timeout=timeout,
            transport=transport,
        )

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header this client sends (for a WebSocket of its own)."""
        return str(self._client.headers["Authorization"])

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request, retrying transient failures; BrokerError for a 4xx/5xx answer."""
        began = time.monotonic()
        attempt = 0
        while True:
            last = attempt >= self.retries and time.monotonic() - began >= self.retry_seconds
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as e:
                if last:
                    raise BrokerUnavailable(0, "unreachable", f"{self.url}: {e}") from e
                self._sleep(attempt, None)
                attempt += 1
                continue
            if response.status_code in _RETRY_STATUS and not last:
                self._sleep(attempt, response.headers.get("Retry-After"))
                attempt += 1
                continue
            if response.status_code >= 400:
                raise _error(response)
            return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def exists(self, path: str) -> bool:
        try:
            self.request("GET", path)
        except BrokerError as e:
            if e.status == 404:
                return False
            raise
        return True

    def download(self, path: str, sha256: str) -> bytes:
        """Bytes of a content-addressed blob, checked against their address."""
        data = self.request("GET", path).content
        if hashlib.sha256(data).hexdigest() != sha256:
            raise BrokerError(200, "corrupt_download", f"{path}: the bytes do not match {sha256}")
        return data

    def close(self) -> None:
        self._client.close()

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * 2**attempt
        if retry_after and retry_after.isdigit():
            delay = max(delay, float(retry_after))
        time.sleep(min(delay, 30.0))


class Connection:
    """What developer and provider clients share: one broker, one key, uploads."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 0.5,
        retry_seconds: float = 0.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        # Clients of other URLs of this broker with this key (a service's relay),
        # closed with this connection (``http_for``).
        self.others: dict[str, Http] = {}
        self.http = Http(
            url,
            api_key,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            retry_seconds=retry_seconds,
            transport=transport,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()
        for other in self.others.values():
            other.close()
        self.others.clear()

    def http_for(self, url: str) -> Http:
        """A client of ``url`` with this connection's key, made once."""
        url = url.rstrip("/")
        if url == self.http.url:
            return self.http
        if url not in self.others:
            key = self.http.authorization.removeprefix("Bearer ")
            self.others[url] = Http(url, key, retries=self.http.retries)
        return self.others[url]

    def upload_arrays(self, leaves: Sequence[Any]) -> str:
        """Upload arrays (a flat list) as a bundle, unless already there; returns its address."""
        from broker.portable import arrays

        return self.upload_bundle(arrays.encode(leaves))

    def upload_bundle(self, data: bytes) -> str:
        """Upload an encoded array bundle, unless already there; returns its address."""
        sha = hashlib.sha256(data).hexdigest()
        if not self.http.exists(f"/v1/arrays/{sha}"):
            self.check_size("arrays", len(data))
            self.http.request("POST", "/v1/arrays", content=data, headers=BINARY)
        return sha

    def check_size(self, kind: str, size: int) -> None:
        """Refuse, before sending a byte, an upload the broker would refuse after all of
        them: past its size limit for ``kind`` (``artifact`` or ``arrays``) or past what
        is left of the account's storage quota. Small uploads skip the question."""
        if size < CHECK_SIZES_FROM:
            return
        try:
            storage = self.http.json("GET", "/v1/storage")
        except BrokerError as e:
            if e.status in (404, 405):  # an older broker: let the upload find out
                return
            raise
        limit = storage.get(f"max_{kind}_bytes")
        what = "the program" if kind == "artifact" else "the input arrays"
        if limit is not None and size > limit:
            raise BrokerError(
                413,
                "upload_too_large",
                f"{what} take {_size(size)}; this broker takes at most {_size(limit)} in one "
                f"upload (BROKER_MAX_{kind.upper()}_BYTES): send smaller inputs, or read the "
                "data inside the program",
            )
        left = storage["quota_bytes"] - storage["bytes"]
        if size > left:
            raise BrokerError(
                413,
                "storage_quota",
                f"{what} take {_size(size)}, but only {_size(max(0, left))} of this account's "
                f"{_size(storage['quota_bytes'])} storage quota is left (GET /v1/storage)",
            )


# Uploads smaller than this go without asking for the limits first (one round trip less).
CHECK_SIZES_FROM = 4 * 1024 * 1024


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


BINARY = {"Content-Type": "application/octet-stream"}


def _error(response: httpx.Response) -> BrokerError:
    try:
        body = response.json()["error"]
        return BrokerError(response.status_code, body["code"], body["message"], body.get("field"))
    except (ValueError, KeyError, TypeError):
        return BrokerError(response.status_code, "http_error", response.text[:500])
