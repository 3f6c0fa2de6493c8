from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from broker.models.account import Role
from broker.types import IdField


class AccountOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    role: Role
    created_at: datetime
    disabled_at: datetime | None = Field(
        default=None,
        description="Set while the account is disabled: its keys are refused",
    )


class AccountCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, examples=["acme-labs"])
    role: Role


class AccountCreated(AccountOut):
    api_key: str = Field(description="Shown once: the broker keeps only its hash.")


class KeyOut(BaseModel):
    """An API key as listings show it: never the key itself, which is shown once."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    account_id: str
    prefix: str = Field(description="The key's first characters, to tell keys apart")
    node_id: str | None = Field(description="Set for a node key: its agent's, for that node only")
    created_at: datetime
    last_used_at: datetime | None = Field(
        description="When it last authenticated a request (to the minute or so)"
    )
    revoked_at: datetime | None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_id: IdField | None = Field(
        default=None, description="Admins: the account to give a key to (default: your own)"
    )


class KeyCreated(KeyOut):
    api_key: str = Field(description="Shown once: the broker keeps only its hash.")
