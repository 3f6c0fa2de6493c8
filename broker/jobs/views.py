"""Jobs as the API and the dashboard show them, with what they cost.

Built by hand, not by pydantic's ``from_attributes``: a job's costs come from
billing (one query for a page of jobs), and its money columns are micro-dollars
under other names; aliases and validators for each would be this mapping again,
spread over the schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from sqlalchemy.orm import Session

from broker.billing import service as billing
from broker.billing.amounts import ppm_to_percent
from broker.jobs.schemas import JobOut
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.money import micros_to_usd


def job_out(session: Session, job: Job) -> JobOut:
    return job_outs(session, [job])[0]


def job_outs(session: Session, jobs: Sequence[Job]) -> list[JobOut]:
    """Jobs as the API shows them, with their costs (one query for all of them)."""
    costs = billing.job_costs(session, [j.id for j in jobs])
    return [job_out_of(j, costs[j.id]) for j in jobs]


UNMATCHED = billing.JobCost(
    price_per_hour_micros=None, fee_ppm=None, estimated_micros=None, metered_micros=0
)


def _usd(micros: int | None) -> Decimal | None:
    return None if micros is None else micros_to_usd(micros)


def job_out_of(job: Job, cost: billing.JobCost) -> JobOut:
    return JobOut(
        id=job.id,
        account_id=job.account_id,
        name=job.name,
        state=JobState(job.state),
        accelerators=job.accelerators if job.fraction_milli is None else job.fraction_milli / 1000,
        mig_profile=job.mig_profile,
        accepts_shared=job.accepts_shared,
        min_memory_gib=job.min_memory_gib,
        vendors=job.vendors,
        accelerator_models=job.accelerator_models,
        platforms=job.platforms,
        max_price_per_hour=micros_to_usd(job.max_price_per_hour_micros),
        budget_usd=_usd(job.budget_micros),
        price_per_hour=_usd(cost.price_per_hour_micros),
        fee_percent=None if cost.fee_ppm is None else ppm_to_percent(cost.fee_ppm),
        estimated_cost_usd=_usd(cost.estimated_micros),
        cost_usd=micros_to_usd(cost.metered_micros),
        duration_hours=job.duration_hours,
        flops=job.flops,
        bytes=job.bytes,
        io_bytes=job.io_bytes,
        program_bytes=job.program_bytes,
        dtype=job.dtype,
        deadline_hours=job.deadline_hours,
        max_gco2=job.max_gco2,
        carbon_usd_per_t=job.carbon_usd_per_t,
        latency_slo_ms=job.latency_slo_ms,
        user_lat=job.user_lat,
        user_lon=job.user_lon,
        data_region=job.data_region,
        data_gb=job.data_gb,
        allowed_countries=job.allowed_countries,
        priority=job.priority,
        artifact=job.artifact_sha256,
        inputs=job.inputs_sha256,
        steps=job.steps,
        checkpoint_every=job.checkpoint_every,
        steps_done=job.steps_done,
        checkpoint=job.checkpoint_sha256,
        checkpoint_step=job.checkpoint_step,
        result=job.result_sha256,
        attempts=job.attempts,
        accelerator_seconds=job.usage_ms / 1000,
        error=job.error,
        started_at=job.started_at,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
    )
