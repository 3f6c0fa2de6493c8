"""Every table, imported in one place so Alembic and tests see the whole schema."""

from broker.db import Base
from broker.models.account import Account, ApiKey
from broker.models.billing import FeeSetting, Invoice, InvoiceLine, StripeCustomer, StripeEvent
from broker.models.blob import Blob, BlobGrant
from broker.models.job import Job
from broker.models.lease import Lease
from broker.models.market import Allocation, ClearingRound
from broker.models.node import Node
from broker.models.offer import Offer
from broker.models.rate_bucket import RateBucket
from broker.models.run_log import RunLogLine
from broker.models.service import Service, ServiceEvent, ServiceWindow

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
    "RunLogLine",
    "Service",
    "ServiceEvent",
    "ServiceWindow",
    "StripeCustomer",
    "StripeEvent",
]
