"""The one place that talks to Stripe: its official SDK, a pinned API version, and
an idempotency key on every create, so a retried call never charges twice.

Invoices follow Stripe's flow for one-off invoices: create a draft invoice for
the customer, add one invoice item per line (and one for the broker's fee) to
that invoice, then finalize it, which gives the page where the developer pays
(``hosted_invoice_url``). Every key is derived from the broker's own ids, so a
sync that died half way and runs again gets the same Stripe objects back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import stripe

from broker.config import Settings

log = logging.getLogger(__name__)

# Pinned: the version this code was written and tested against (the SDK's own).
API_VERSION = "2026-10-28.endive"
WEBHOOK_TOLERANCE_SECONDS = 300


class PaymentsError(Exception):
    """Stripe refused a call or could not be reached; the message says which."""


@dataclass(frozen=True, slots=True)
class StripeInvoice:
    id: str
    status: str
    hosted_invoice_url: str | None
    amount_due: int
    currency: str = "usd"
    # The amount of each line, in cents (``lines``: read them all, past the first page).
    line_amounts: tuple[int, ...] = ()


class Stripe:
    """A Stripe account, through the official SDK."""

    def __init__(self, api_key: str, api_base: str | None = None) -> None:
        self._client = stripe.StripeClient(
            api_key,
            stripe_version=API_VERSION,
            base_addresses={"api": api_base} if api_base else {},
            max_network_retries=2,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Stripe | None:
        """The configured Stripe account, or None when billing is local only."""
        if settings.stripe_api_key is None:
            return None
        return cls(settings.stripe_api_key.get_secret_value(), settings.stripe_api_base)

    def create_customer(self, account_id: str, name: str) -> str:
        customer = self._call(
            self._client.v1.customers.create,
            params={"name": name, "metadata": {"broker_account_id": account_id}},
            options={"idempotency_key": f"customer-{account_id}"},
        )
        return str(customer.id)

    def create_invoice(self, customer: str, invoice_id: str, description: str) -> StripeInvoice:
        invoice = self._call(
            self._client.v1.invoices.create,
            params={
                "customer": customer,
                "currency": "usd",
                "collection_method": "send_invoice",
                "days_until_due": 30,
                "auto_advance": False,  # the broker finalizes it once its items are on
                "pending_invoice_items_behavior": "exclude",
                "description": description,
                "metadata": {"broker_invoice_id": invoice_id},
            },
            options={"idempotency_key": f"invoice-{invoice_id}"},
        )
        return _invoice(invoice)

    def add_item(
        self, customer: str, invoice: str, key: str, amount_cents: int, description: str
    ) -> str:
        item = self._call(
            self._client.v1.invoice_items.create,
            params={
                "customer": customer,
                "invoice": invoice,
                "amount": amount_cents,
                "currency": "usd",
                "description": description[:500],
                "metadata": {"broker_line": key},
            },
            options={"idempotency_key": f"item-{key}"},
        )
        return str(item.id)

    def retrieve(self, invoice: str) -> StripeInvoice:
        """Stripe's copy of an invoice with the amount of every line on it."""
        found = _invoice(self._call(self._client.v1.invoices.retrieve, invoice))
        lines = self._call(self._client.v1.invoices.line_items.list, invoice, params={"limit": 100})
        # Reading the pages past the first calls Stripe too.
        amounts = tuple(
            self._call(lambda: [int(line["amount"]) for line in lines.auto_paging_iter()])
        )
        return StripeInvoice(
            found.id,
            found.status,
            found.hosted_invoice_url,
            found.amount_due,
            found.currency,
            amounts,
        )

    def finalize(self, invoice: str) -> StripeInvoice:
        return _invoice(
            self._call(
                self._client.v1.invoices.finalize_invoice,
                invoice,
                options={"idempotency_key": f"finalize-{invoice}"},
            )
        )

    def void(self, invoice: str) -> StripeInvoice:
        return _invoice(
            self._call(
                self._client.v1.invoices.void_invoice,
                invoice,
                options={"idempotency_key": f"void-{invoice}"},
            )
        )

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except stripe.StripeError as e:
            message = getattr(e, "user_message", None) or str(e) or type(e).__name__
            raise PaymentsError(f"Stripe: {message}") from e


def _invoice(obj: Any) -> StripeInvoice:
    data = obj.to_dict()
    return StripeInvoice(
        id=str(data["id"]),
        status=str(data.get("status")),
        hosted_invoice_url=data.get("hosted_invoice_url"),
        amount_due=int(data.get("amount_due") or 0),
        currency=str(data.get("currency") or "usd"),
    )


def verify_event(payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    """A webhook event, if Stripe signed it with ``secret`` less than five minutes ago;
    raises ValueError saying what is wrong otherwise."""
    if not signature:
        raise ValueError("no Stripe-Signature header")
    try:
        event = stripe.Webhook.construct_event(
            payload, signature, secret, tolerance=WEBHOOK_TOLERANCE_SECONDS
        )
    except stripe.SignatureVerificationError as e:
        raise ValueError(f"bad signature: {e.user_message or e}") from None
    except ValueError as e:  # not JSON
        raise ValueError(f"the payload is not a Stripe event: {e}") from None
    result: dict[str, Any] = event.to_dict()
    return result
