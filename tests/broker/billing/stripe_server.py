"""A local Stripe API for the billing tests: localstripe, plus what it lacks.

localstripe (from PyPI) is a real local implementation of Stripe's API; it runs
in a process of its own on 127.0.0.1 and holds the customers and invoice items.
It has no one-off invoices: it only makes invoices for subscriptions (creating
one without a subscription answers 404 "No upcoming invoices"), and it has no
``/finalize`` endpoint and no ``hosted_invoice_url``. So requests go through a
small front server that answers the invoice endpoints itself, the way Stripe
documents them (https://docs.stripe.com/api/invoices), and passes everything
else to localstripe. An invoice item for one of its invoices is created in
localstripe (which checks the customer, amount and currency) and then put on
the invoice, so the amount a finalized invoice asks for is the sum of items
that localstripe stored.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx

_LAUNCH = (
    "import sys; from aiohttp import web; from localstripe.server import app; "
    "web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]), print=None)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def localstripe() -> Iterator[str]:
    """localstripe in a process of its own; yields its base URL."""
    port = _free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, str(port)], stdout=subprocess.DEVNULL, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/v1/customers", headers=_AUTH, timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    err = log.read().decode(errors="replace")
                    raise RuntimeError(f"localstripe did not start: {err[-2000:]}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


_AUTH = {"Authorization": "Bearer sk_test_local"}


def _nested(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (``metadata[key]=value``) as a dict."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if "[" in key and key.endswith("]"):
            outer, inner = key[:-1].split("[", 1)
            out.setdefault(outer, {})[inner] = value
        else:
            out[key] = value
    return out


class FakeStripe:
    """The front server. ``fail_next(prefix, status)`` makes the next request whose path
    starts with ``prefix`` fail the way Stripe fails (for retry tests)."""

    def __init__(self, localstripe_url: str) -> None:
        self.upstream = localstripe_url
        self.invoices: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, idempotency key
        self._replies: dict[str, tuple[str, int, dict[str, Any]]] = {}
        self._failures: list[tuple[str, int]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeStripe:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail_next(self, prefix: str, status: int = 500) -> None:
        self._failures.append((prefix, status))

    def pay(self, invoice_id: str) -> dict[str, Any]:
        """The customer pays on the hosted page."""
        with self._lock:
            invoice = self.invoices[invoice_id]
            invoice["status"] = "paid"
            invoice["amount_paid"], invoice["amount_remaining"] = invoice["amount_due"], 0
            invoice["status_transitions"]["paid_at"] = int(time.time())
            return dict(invoice)

    # -- the invoice API ---------------------------------------------------------------

    def _create_invoice(self, form: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        customer = form.get("customer")
        check = httpx.get(f"{self.upstream}/v1/customers/{customer}", headers=_AUTH)
        if check.status_code != 200:
            return check.status_code, check.json()
        invoice_id = f"in_fake{next(self._ids):06d}"
        invoice = {
            "id": invoice_id,
            "object": "invoice",
            "customer": customer,
            "status": "draft",
            "currency": form.get("currency", "usd"),
            "collection_method": form.get("collection_method", "charge_automatically"),
            "auto_advance": form.get("auto_advance") == "true",
            "description": form.get("description"),
            "metadata": form.get("metadata", {}),
            "amount_due": 0,
            "amount_paid": 0,
            "amount_remaining": 0,
            "subtotal": 0,
            "total": 0,
            "attempt_count": 0,
            "hosted_invoice_url": None,
            "lines": {
                "object": "list",
                "data": [],
                "has_more": False,
                "url": f"/v1/invoices/{invoice_id}/lines",
            },
            "status_transitions": {"finalized_at": None, "paid_at": None, "voided_at": None},
            "created": int(time.time()),
            "livemode": False,
        }
        self.invoices[invoice_id] = invoice
        return 200, invoice

    def _add_item(self, form: dict[str, Any], raw: bytes) -> tuple[int, dict[str, Any]]:
        invoice = self.invoices.get(form["invoice"])
        if invoice is None:
            return 404, _error(f"No such invoice: '{form['invoice']}'", "invoice")
        if invoice["status"] != "draft":
            return 400, _error("You can only add invoice items to draft invoices.", "invoice")
        body = "&".join(p for p in raw.decode().split("&") if not p.startswith("invoice="))
        made = httpx.post(
            f"{self.upstream}/v1/invoiceitems",
            content=body,
            headers={**_AUTH, "Content-Type": "application/x-www-form-urlencoded"},
        )
        if made.status_code != 200:
            return made.status_code, made.json()
        item = made.json()
        item["invoice"] = invoice["id"]
        invoice["lines"]["data"].append(
            {
                "id": f"il_{item['id']}",
                "object": "line_item",
                "amount": item["amount"],
                "currency": item["currency"],
                "description": item["description"],
                "invoice_item": item["id"],
            }
        )
        total = sum(line["amount"] for line in invoice["lines"]["data"])
        invoice.update(subtotal=total, total=total, amount_due=total, amount_remaining=total)
        return 200, item

    @staticmethod
    def _lines(invoice: dict[str, Any], query: dict[str, Any]) -> dict[str, Any]:
        """A page of the invoice's lines, as Stripe pages lists (limit, starting_after)."""
        lines = invoice["lines"]["data"]
        after = query.get("starting_after")
        start = next((i + 1 for i, line in enumerate(lines) if line["id"] == after), 0)
        limit = int(query.get("limit", 10))
        page = lines[start : start + limit]
        return {
            "object": "list",
            "data": page,
            "has_more": start + limit < len(lines),
            "url": f"/v1/invoices/{invoice['id']}/lines",
        }

    def tamper(
        self, invoice_id: str, *, amount: int | None = None, duplicate: bool = False
    ) -> None:
        """Change a draft's first line as someone on Stripe's dashboard could: its
        amount, or the same item added once more."""
        with self._lock:
            invoice = self.invoices[invoice_id]
            lines = invoice["lines"]["data"]
            if amount is not None:
                lines[0]["amount"] = amount
            if duplicate:
                lines.append({**lines[0], "id": f"{lines[0]['id']}_again"})
            total = sum(line["amount"] for line in lines)
            invoice.update(subtotal=total, total=total, amount_due=total, amount_remaining=total)

    def _finalize(self, invoice: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if invoice["status"] != "draft":
            return 400, _error(f"This invoice is already {invoice['status']}.", None)
        invoice["status"] = "open" if invoice["amount_due"] else "paid"
        invoice["status_transitions"]["finalized_at"] = int(time.time())
        invoice["hosted_invoice_url"] = f"{self.url}/i/{invoice['id']}"
        return 200, invoice

    def _void(self, invoice: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if invoice["status"] not in ("draft", "open"):
            return 400, _error(f"You cannot void a {invoice['status']} invoice.", None)
        invoice["status"] = "void"
        invoice["status_transitions"]["voided_at"] = int(time.time())
        return 200, invoice

    def _route(
        self, method: str, path: str, form: dict[str, Any], raw: bytes
    ) -> tuple[int, dict[str, Any]] | None:
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/v1/invoiceitems" and "invoice" in form:
            return self._add_item(form, raw)
        if parts[:2] != ["v1", "invoices"]:
            return None
        if method == "POST" and len(parts) == 2:
            return self._create_invoice(form)
        invoice = self.invoices.get(parts[2]) if len(parts) > 2 else None
        if invoice is None:
            return 404, _error(f"No such invoice: '{parts[2] if len(parts) > 2 else ''}'", "id")
        if method == "GET" and len(parts) == 3:
            return 200, invoice
        if method == "GET" and parts[3:] == ["lines"]:
            return 200, self._lines(invoice, form)
        if method == "POST" and parts[3:] == ["finalize"]:
            return self._finalize(invoice)
        if method == "POST" and parts[3:] == ["void"]:
            return self._void(invoice)
        return 404, _error(f"Unrecognized request URL ({method}: {path})", None)

    def _handle(
        self, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, bytes, str]:
        key = headers.get("idempotency-key")
        self.requests.append((method, urlsplit(path).path, key))
        for i, (prefix, status) in enumerate(self._failures):
            if urlsplit(path).path.startswith(prefix):
                del self._failures[i]
                return (
                    status,
                    json.dumps(
                        _error(
                            "An error occurred with our connection to Stripe.", None, "api_error"
                        )
                    ).encode(),
                    "application/json",
                )
        digest = hashlib.sha256(raw).hexdigest()
        with self._lock:
            if key and key in self._replies:
                seen, status, reply = self._replies[key]
                if seen != digest:
                    reply = _error(
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with.",
                        None,
                        "idempotency_error",
                    )
                    status = 400
                return status, json.dumps(reply).encode(), "application/json"
            query = parse_qsl(urlsplit(path).query) if method == "GET" else []
            form = _nested([*parse_qsl(raw.decode(), keep_blank_values=True), *query])
            routed = self._route(method, urlsplit(path).path, form, raw)
            if routed is not None:
                status, reply = routed
                if key and method == "POST":
                    self._replies[key] = (digest, status, reply)
                return status, json.dumps(reply).encode(), "application/json"
        upstream = httpx.request(
            method,
            f"{self.upstream}{path}",
            content=raw,
            headers={k: v for k, v in headers.items() if k in ("authorization", "content-type")},
        )
        return (
            upstream.status_code,
            upstream.content,
            upstream.headers.get("content-type", "application/json"),
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, body, kind = fake._handle(self.command, self.path, headers, raw)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Request-Id", f"req_fake{time.monotonic_ns()}")
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = _serve  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _error(message: str, param: str | None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, "param": param}}
