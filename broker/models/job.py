from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from broker.db import Base, UtcDateTime, utcnow
from broker.models.job_state import FINAL_STATES, JobState, check_transition
from broker.types import StrList


class Job(Base):
    """A bid: work a developer wants run, and what it will pay per accelerator-hour."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("accelerators >= 1", name="accelerators_positive"),
        CheckConstraint(
            "fraction_milli IS NULL OR (fraction_milli >= 1 AND fraction_milli <= 999)",
            name="fraction_in_range",
        ),
        CheckConstraint("priority >= 1", name="priority_positive"),
        CheckConstraint("max_price_per_hour_micros >= 0", name="price_not_negative"),
        CheckConstraint("steps >= 1", name="steps_positive"),
        CheckConstraint("checkpoint_every >= 1", name="checkpoint_every_positive"),
        CheckConstraint("budget_micros > 0", name="budget_positive"),
        UniqueConstraint("account_id", "idempotency_key"),
        Index("ix_jobs_account_created", "account_id", "created_at"),
        Index("ix_jobs_state_price", "state", "max_price_per_hour_micros"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, name="job_state", native_enum=False, length=16), default=JobState.open
    )
    accelerators: Mapped[int] = mapped_column(Integer)
    # Part of one accelerator (docs/market.md, fractions): thousandths of its compute
    # and memory (the trace's ``gpu_milli``), or a MIG profile; None for whole ones.
    # ``accelerators`` is then 1.
    fraction_milli: Mapped[int | None] = mapped_column(Integer, default=None)
    mig_profile: Mapped[str | None] = mapped_column(String(32), default=None)
    # May run on shared (time-sliced, not isolated) capacity.
    accepts_shared: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    min_memory_gib: Mapped[float] = mapped_column(Float, default=0.0)
    vendors: Mapped[list[str]] = mapped_column(StrList, default=list)
    accelerator_models: Mapped[list[str]] = mapped_column(StrList, default=list)
    platforms: Mapped[list[str]] = mapped_column(StrList)
    max_price_per_hour_micros: Mapped[int] = mapped_column(BigInteger)
    duration_hours: Mapped[float | None] = mapped_column(Float, default=None)
    flops: Mapped[float | None] = mapped_column(Float, default=None)
    bytes: Mapped[float | None] = mapped_column(Float, default=None)
    # Bytes a run moves besides its work: the inputs in, the results and checkpoints out.
    io_bytes: Mapped[float | None] = mapped_column(Float, default=None)
    # The size of its serialized program (what compiling it takes grows with it).
    program_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    dtype: Mapped[str | None] = mapped_column(String(8), default=None)
    deadline_hours: Mapped[float | None] = mapped_column(Float, default=None)
    # The most CO2e (g) its run may emit, and its own carbon price (docs/market.md).
    max_gco2: Mapped[float | None] = mapped_column(Float, default=None)
    carbon_usd_per_t: Mapped[float | None] = mapped_column(Float, default=None)
    latency_slo_ms: Mapped[float | None] = mapped_column(Float, default=None)
    user_lat: Mapped[float | None] = mapped_column(Float, default=None)
    user_lon: Mapped[float | None] = mapped_column(Float, default=None)
    data_region: Mapped[str | None] = mapped_column(String(64), default=None)
    data_gb: Mapped[float | None] = mapped_column(Float, default=None)
    allowed_countries: Mapped[list[str]] = mapped_column(StrList, default=list)
    priority: Mapped[int] = mapped_column(Integer, default=1)
    # A replica of an inference service (broker.services), and the offer the service's
    # placement chose for it this round (None: any the rules allow).
    service_id: Mapped[str | None] = mapped_column(
        ForeignKey("services.id"), default=None, index=True
    )
    pinned_offer_id: Mapped[str | None] = mapped_column(String(32), default=None)
    # The most the developer will pay for the job, fee included, over all its runs.
    budget_micros: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # The program and its inputs (content addresses), for jobs the broker runs.
    artifact_sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"), default=None)
    inputs_sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"), default=None)
    steps: Mapped[int | None] = mapped_column(Integer, default=None)
    checkpoint_every: Mapped[int | None] = mapped_column(Integer, default=None)
    # Progress, reported by the provider running it.
    steps_done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    checkpoint_sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"), default=None)
    checkpoint_step: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    result_sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Metered accelerator-milliseconds over all its allocations.
    usage_ms: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)
    # A retried POST with the same key returns this job; the hash spots a reused key.
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)

    def move_to(self, new: JobState) -> None:
        """Change state through the state machine; raises InvalidTransition."""
        check_transition(self.state, new)
        self.state = new
        self.updated_at = utcnow()
        if new in FINAL_STATES:
            self.finished_at = self.updated_at
