"""Every table, imported in one place so Alembic and tests see the whole schema."""

from broker.accounts.models import Account, ApiKey
from broker.billing.models import FeeSetting, Invoice, InvoiceLine, StripeCustomer, StripeEvent
from broker.blobs.models import Blob, BlobGrant
from broker.buckets import RateBucket
from broker.db import Base
from broker.jobs.models import Job
from broker.leases import Lease
from broker.market.models import Allocation, ClearingRound
from broker.nodes.models import Node
from broker.offers.models import Offer

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
    "Lease",
    "Node",
    "Offer",
    "RateBucket",
    "StripeCustomer",
    "StripeEvent",
]
