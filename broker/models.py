"""Every table, imported in one place so Alembic and tests see the whole schema."""

from broker.accounts.models import Account, ApiKey
from broker.db import Base
from broker.jobs.models import Job
from broker.offers.models import Offer

__all__ = ["Account", "ApiKey", "Base", "Job", "Offer"]
