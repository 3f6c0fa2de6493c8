"""Every table, imported in one place so Alembic and tests see the whole schema."""

from broker.accounts.models import Account, ApiKey
from broker.billing.models import FeeSetting, Invoice, InvoiceLine, StripeCustomer, StripeEvent
from broker.blobs.models import Blob, BlobGrant
from broker.db import Base
from broker.jobs.models import Job
from broker.market.models import Allocation, ClearingRound
from broker.nodes.models import Node
from broker.offers.models import Offer
from broker.runs.models import RunLogLine

__all__ = [
    "Account",
    "Allocation",
    "ApiKey",
    "Base",
    "Blob",
    "BlobGrant",
    "ClearingRound",
    "FeeSetting",
    "Invoice",
    "InvoiceLine",
    "Job",
    "Node",
    "Offer",
    "RunLogLine",
    "StripeCustomer",
    "StripeEvent",
]
