"""Job operations. Functions take the session and never commit."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import manager_of_class

from adapters import catalog, mig
from broker.accounts import visibility
from broker.blobs.service import get_blob, get_store, leaf_specs, load_artifact
from broker.config import get_settings
from broker.db import new_id, utcnow
from broker.errors import Conflict, InvalidInput, NotFound
from broker.jobs.schemas import JobCreate, JobQuery, RunOut
from broker.ledger import active_allocation, end_job, held_label
from broker.models.account import Account
from broker.models.blob import Blob, BlobKind
from broker.models.job import Job
from broker.models.job_state import JobState
from broker.models.offer import Offer
from broker.money import micros_to_usd, usd_to_micros
from broker.offers.service import resolve_model
from broker.portable.checks import check_inputs
from broker.portable.manifest import ArtifactError, Manifest, io_bytes


class IdempotencyKeyReused(Conflict):
    status_code = 422
    code = "idempotency_key_reused"


def submit_job(
    session: Session, account: Account, data: JobCreate, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """Create a job, or return the one an earlier request with the same key created.

    Returns ``(job, created)``. Reusing a key with a different body is an error,
    so a client bug cannot silently return the wrong job.
    """
    job = prepare_job(session, account, data, idempotency_key)
    # One statement, INSERT ... ON CONFLICT DO NOTHING: the unique constraint on
    # (account, key) decides. A concurrent retry waits for the first to commit and
    # inserts nothing; then it, like any later retry, returns the first one's job.
    if insert_jobs(session, [job]) == [True]:
        make_transient_to_detached(job)
        session.add(job)
        return job, True
    # Only a used idempotency key keeps a job out.
    assert idempotency_key is not None
    assert job.request_hash is not None
    existing = _by_idempotency_key(session, account, idempotency_key)
    if existing is None:  # the first one rolled back between the insert and this read
        raise Conflict(
            "a request with this Idempotency-Key was being handled and failed; send it again",
            field="header.Idempotency-Key",
        )
    return _replay(existing, job.request_hash), False


def needs_database(data: JobCreate) -> bool:
    """Whether ``prepare_job`` reads the database for ``data``: to check its program, or
    a model the catalog does not know."""
    return data.artifact is not None or any(
        catalog.lookup(m) is None for m in data.accelerator_models
    )


def prepare_job(
    session: Session | None, account: Account, data: JobCreate, idempotency_key: str | None
) -> Job:
    """The job ``data`` asks for, checked, with every column set (not yet stored).

    ``session`` may be None when ``needs_database(data)`` is false.
    """
    program = _check_program(session, account, data)
    _check_consistent(data, program)
    _check_catalog(session, data)
    values = _new_job(account, data, program)
    # The hash covers the job as stored, so equivalent bodies (reordered lists, model
    # aliases) count as the same request.
    values["request_hash"] = _request_hash(values) if idempotency_key else None
    now = utcnow()
    values.update(
        idempotency_key=idempotency_key or None,
        # As the column defaults would set them, so that the object is what a read of
        # the inserted row would give.
        steps_done=0,
        checkpoint_step=0,
        attempts=0,
        usage_ms=0,
        checkpoint_sha256=None,
        result_sha256=None,
        error=None,
        started_at=None,
        finished_at=None,
        created_at=now,
        updated_at=now,
    )
    # Made without the ORM's attribute events (a twentieth of the cost of Job(...)):
    # it is inserted with Core (insert_jobs), not through a session's flush.
    job = _JOB_CLASS.new_instance()
    job.__dict__.update(values)
    return job


def insert_jobs(session: Session, jobs: Sequence[Job]) -> list[bool]:
    """Insert prepared jobs (``prepare_job``); for each, whether it was inserted:
    False when its account had already used its idempotency key.

    A Core INSERT, several times cheaper than the ORM's flush or its INSERT ...
    RETURNING of the whole row. The jobs stay out of the session.
    """
    if not jobs:
        return []
    rows = [{column.key: job.__dict__[column.key] for column in _JOBS.columns} for job in jobs]
    dialect = session.get_bind().dialect.name
    if len(rows) == 1:
        return [session.execute(_INSERT_UNLESS_KEY_USED[dialect], rows[0]).first() is not None]
    # Many rows: one statement run for each row in one round trip (psycopg's pipeline),
    # then a look at which keyed ones went in. An INSERT ... RETURNING of many VALUES
    # would be one statement, but a new text for every batch size, which psycopg
    # parses afresh each time: slower.
    session.execute(_INSERT_MANY_UNLESS_KEY_USED[dialect], rows)
    keyed = [job.id for job in jobs if job.idempotency_key is not None]
    stored = set(session.scalars(_STORED_JOBS, {"ids": keyed})) if keyed else set()
    return [job.idempotency_key is None or job.id in stored for job in jobs]


# Built once per dialect (both spell ON CONFLICT alike): building it per request costs
# about as much as running it.
_JOBS = cast(Table, Job.__table__)
_INSERT_MANY_UNLESS_KEY_USED = {
    name: insert(_JOBS).on_conflict_do_nothing(index_elements=["account_id", "idempotency_key"])
    for name, insert in (("postgresql", pg_insert), ("sqlite", sqlite_insert))
}
_INSERT_UNLESS_KEY_USED = {
    name: stmt.returning(_JOBS.c.id) for name, stmt in _INSERT_MANY_UNLESS_KEY_USED.items()
}
_STORED_JOBS = select(_JOBS.c.id).where(_JOBS.c.id.in_(bindparam("ids", expanding=True)))


@dataclass(frozen=True)
class _Program:
    """What a job's artifact fixes: where it can run and how much work it is."""

    platforms: list[str]
    flops: float
    bytes: float
    dtype: str
    io_bytes: float  # what a run moves: the inputs in, the results and checkpoints out
    program_bytes: int  # the serialized program's size


def _check_program(session: Session | None, account: Account, data: JobCreate) -> _Program | None:
    """Check the job's artifact and inputs; each error names the field to fix."""
    if data.artifact is None:
        if not get_settings().allow_capacity_bids:
            raise InvalidInput(
                "a job needs its program: package a JAX function and submit it with the "
                "SDK (Client.submit) or `broker jobs submit FILE.py:function`, or upload it "
                "to /v1/artifacts and its inputs to /v1/arrays. Bids for capacity alone, "
                "with nothing to run, are taken only by a broker started with "
                "BROKER_ALLOW_CAPACITY_BIDS=1 (market simulations)",
                field="body.artifact",
            )
        for name in ("inputs", "steps", "checkpoint_every"):
            if getattr(data, name) is not None:
                raise InvalidInput(
                    f"{name} needs an artifact: the program to run", field=f"body.{name}"
                )
        if data.platforms is None:
            raise InvalidInput(
                "give platforms (the backends the job runs on), or an artifact",
                field="body.platforms",
            )
        return None
    for name in ("flops", "bytes"):
        if getattr(data, name) is not None:
            raise InvalidInput(
                f"{name} comes from the artifact's cost analysis; leave it out",
                field=f"body.{name}",
            )
    if session is None:
        raise TypeError("checking a job's artifact needs a session")
    artifact_blob = _referenced(session, account, data.artifact, BlobKind.artifact, "artifact")
    manifest = Manifest.model_validate(artifact_blob.meta)
    if data.inputs is None:
        raise InvalidInput(
            "a job with an artifact needs its inputs: upload them to /v1/arrays",
            field="body.inputs",
        )
    inputs_blob = _referenced(session, account, data.inputs, BlobKind.arrays, "inputs")
    try:
        check_inputs(load_artifact(get_store(), data.artifact), leaf_specs(inputs_blob))
    except ArtifactError as e:
        raise InvalidInput(str(e), field="body.inputs") from None
    if manifest.kind == "iterative" and data.steps is None:
        raise InvalidInput("an iterative artifact needs steps: how many to run", field="body.steps")
    if manifest.kind == "function" and (data.steps or data.checkpoint_every):
        raise InvalidInput(
            "steps and checkpoint_every are for iterative artifacts (package_step); "
            "this artifact is a plain function",
            field="body.steps",
        )
    if data.checkpoint_every and data.steps and data.checkpoint_every > data.steps:
        raise InvalidInput("checkpoint_every is more than steps", field="body.checkpoint_every")
    platforms = data.platforms or manifest.platforms
    missing = sorted(set(platforms) - set(manifest.platforms))
    if missing:
        raise InvalidInput(
            f"the artifact was not exported for {', '.join(missing)} (it has "
            f"{', '.join(manifest.platforms)})",
            field="body.platforms",
        )
    runs = data.steps or 1
    return _Program(
        platforms=list(platforms),
        flops=manifest.flops * runs,
        bytes=manifest.bytes * runs,
        dtype=manifest.dtype,
        io_bytes=io_bytes(manifest, inputs_blob.size, data.steps, data.checkpoint_every),
        program_bytes=manifest.program_size,
    )


def _check_catalog(session: Session | None, data: JobCreate) -> None:
    """Models and vendors a bid names must exist: in the hardware catalog, or listed by
    some offer (a model outside the catalog); a typo would otherwise wait forever."""
    unknown = [m for m in data.accelerator_models if catalog.lookup(m) is None]
    if unknown and session is not None:
        listed = set(
            session.scalars(
                select(Offer.accelerator)
                .where(Offer.accelerator.in_([catalog.normalize_key(m) for m in unknown]))
                .distinct()
            )
        )
        unknown = [m for m in unknown if catalog.normalize_key(m) not in listed]
    if unknown:
        known = ", ".join(spec.key for spec in catalog.all_specs())
        raise InvalidInput(
            f"unknown accelerator model {unknown[0]!r}: no such model in the catalog or "
            f"on offer; known models: {known} (GET /v1/catalog lists them with aliases)",
            field="body.accelerator_models",
        )
    vendors = [v for v in data.vendors if v not in catalog.VENDORS]
    if vendors:
        raise InvalidInput(
            f"unknown vendor {vendors[0]!r}; vendors: {', '.join(catalog.VENDORS)}",
            field="body.vendors",
        )


def _referenced(session: Session, account: Account, sha256: str, kind: BlobKind, name: str) -> Blob:
    try:
        return get_blob(session, account, sha256, kind)
    except NotFound:
        upload = "/v1/artifacts" if kind == BlobKind.artifact else "/v1/arrays"
        raise InvalidInput(
            f"no {kind.value} {sha256} of yours: upload it to {upload} first", field=f"body.{name}"
        ) from None


_JOB_CLASS = manager_of_class(Job)


def _new_job(account: Account, data: JobCreate, program: _Program | None) -> dict[str, Any]:
    """The columns of the job ``data`` asks for that it decides."""
    platforms = program.platforms if program else (data.platforms or [])
    flops = program.flops if program else data.flops
    work_bytes = program.bytes if program else data.bytes
    dtype = program.dtype if program else data.dtype
    return dict(
        id=new_id("job"),
        account_id=account.id,
        name=data.name,
        state=JobState.open,
        accelerators=max(1, round(data.accelerators)),
        fraction_milli=fraction_milli(data.accelerators),
        mig_profile=data.mig_profile,
        accepts_shared=data.accepts_shared,
        min_memory_gib=data.min_memory_gib,
        vendors=sorted(set(data.vendors)),
        accelerator_models=sorted({resolve_model(m) for m in data.accelerator_models}),
        platforms=sorted(set(platforms)),
        max_price_per_hour_micros=usd_to_micros(data.max_price_per_hour),
        duration_hours=data.duration_hours,
        flops=flops,
        bytes=work_bytes,
        io_bytes=program.io_bytes if program else None,
        program_bytes=program.program_bytes if program else None,
        dtype=dtype or ("bf16" if data.duration_hours is None else None),
        deadline_hours=data.deadline_hours,
        max_gco2=data.max_gco2,
        carbon_usd_per_t=data.carbon_usd_per_t,
        latency_slo_ms=data.latency_slo_ms,
        user_lat=data.user_lat,
        user_lon=data.user_lon,
        data_region=data.data_region,
        data_gb=data.data_gb,
        allowed_countries=sorted(set(data.allowed_countries)),
        priority=data.priority,
        service_id=None,
        pinned_offer_id=None,
        budget_micros=None if data.budget_usd is None else usd_to_micros(data.budget_usd),
        artifact_sha256=data.artifact,
        inputs_sha256=data.inputs,
        steps=data.steps,
        checkpoint_every=data.checkpoint_every,
    )


def fraction_milli(accelerators: float) -> int | None:
    """Thousandths of one accelerator for a fraction; None for whole accelerators."""
    return round(accelerators * 1000) if accelerators < 1 else None


def _check_fraction(data: JobCreate) -> None:
    """A whole number of accelerators, or a fraction of one in thousandths, or one MIG
    instance of a profile the models it may run on have."""
    n = data.accelerators
    if n >= 1 and n != int(n):
        raise InvalidInput(
            f"accelerators {n:g}: a whole number, or a fraction of one accelerator (more "
            "than 0 and less than 1, e.g. 0.5)",
            field="body.accelerators",
        )
    if n < 1 and (abs(n * 1000 - round(n * 1000)) > 1e-6 or round(n * 1000) < 1):
        raise InvalidInput(
            f"accelerators {n:g}: a fraction is given in thousandths (0.001 to 0.999)",
            field="body.accelerators",
        )
    if data.mig_profile is None:
        return
    if n != 1:
        raise InvalidInput(
            "a job asks for a MIG profile or for accelerators, not both: leave accelerators "
            "out (one MIG instance)",
            field="body.accelerators",
        )
    models = {resolve_model(m) for m in data.accelerator_models} or set(mig.models())
    having = sorted(m for m in models if data.mig_profile in {p.name for p in mig.profiles(m)})
    if not having:
        names = sorted({p.name for m in models for p in mig.profiles(m)})
        known = f"; they have {', '.join(names)}" if names else " (none of them has MIG)"
        raise InvalidInput(
            f"MIG profile {data.mig_profile} is not one of the models' it may run on "
            f"({', '.join(sorted(models))}){known}",
            field="body.mig_profile",
        )


def _check_consistent(data: JobCreate, program: _Program | None) -> None:
    """Rules that span fields; each error names the field to fix."""
    _check_fraction(data)
    if data.duration_hours is None and program is None and not (data.flops or data.bytes):
        raise InvalidInput(
            "give the runtime: duration_hours, or the job's work as flops and/or bytes",
            field="body.duration_hours",
        )
    if data.budget_usd is not None and data.budget_usd <= 0:
        raise InvalidInput(
            "budget_usd must be more than 0 (leave it out for no budget)", field="body.budget_usd"
        )
    if (data.user_lat is None) != (data.user_lon is None):
        raise InvalidInput("give both user_lat and user_lon, or neither", field="body.user_lon")
    if data.latency_slo_ms is not None and data.user_lat is None:
        raise InvalidInput(
            "latency_slo_ms needs the users' location (user_lat, user_lon)",
            field="body.latency_slo_ms",
        )
    if data.data_gb and data.data_region is None:
        raise InvalidInput(
            "data_gb needs data_region: where the data lives", field="body.data_region"
        )
    if (
        data.duration_hours is not None
        and data.deadline_hours is not None
        and data.duration_hours > data.deadline_hours
    ):
        raise InvalidInput(
            f"duration_hours ({data.duration_hours}) is longer than deadline_hours "
            f"({data.deadline_hours}): no offer could finish it in time",
            field="body.deadline_hours",
        )


_HASHED_FIELDS = tuple(
    c.key
    for c in Job.__table__.columns
    if c.key
    not in {
        "id",
        "account_id",
        "state",
        "idempotency_key",
        "request_hash",
        "created_at",
        "updated_at",
        "finished_at",
        # progress, which changes after the job was created
        "steps_done",
        "checkpoint_sha256",
        "checkpoint_step",
        "result_sha256",
        "attempts",
        "error",
        "started_at",
        # derived from the artifact and the inputs, which are hashed
        "io_bytes",
        "program_bytes",
        # where a service's replica is placed this round (it moves)
        "pinned_offer_id",
    }
)


# Columns added after requests were first hashed: hashed only when set, so that a
# request stored before them still matches its replay.
_HASHED_WHEN_SET = frozenset(
    {"max_gco2", "carbon_usd_per_t", "fraction_milli", "mig_profile", "service_id"}
)
_HASHED_WHEN_TRUE = frozenset({"accepts_shared"})


def _request_hash(job: Mapping[str, Any]) -> str:
    # A column the request does not decide (usage_ms) is hashed as None, as it always was.
    fields = {
        name: job.get(name)
        for name in _HASHED_FIELDS
        if (name not in _HASHED_WHEN_SET or job.get(name) is not None)
        and (name not in _HASHED_WHEN_TRUE or job.get(name) is True)
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _by_idempotency_key(session: Session, account: Account, key: str) -> Job | None:
    return session.scalar(
        select(Job).where(Job.account_id == account.id, Job.idempotency_key == key)
    )


def _replay(job: Job, request_hash: str) -> Job:
    if job.request_hash != request_hash:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used for a different job request; "
            "use a new key for a new job",
            field="header.Idempotency-Key",
        )
    return job


def get_job(session: Session, viewer: Account, job_id: str, *, lock: bool = False) -> Job:
    """A job the viewer may see: its own, or any for an admin; others answer 404."""
    stmt = visibility.readable_jobs(viewer).where(Job.id == job_id)
    if lock:
        # populate_existing: the row as it is once locked, not as first read.
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    job = session.scalar(stmt)
    if job is None:
        raise NotFound(f"no job {job_id!r} of yours")
    return job


def cancel_job(session: Session, viewer: Account, job_id: str) -> Job:
    """Cancel a job that has not finished. Cancelling twice is harmless."""
    job = get_job(session, viewer, job_id)
    # Rows are locked offer first, then job, everywhere (clearing, withdrawal),
    # so cancelling cannot deadlock with them.
    allocation = active_allocation(session, job.id)
    if allocation is not None:
        session.scalar(select(Offer).where(Offer.id == allocation.offer_id).with_for_update())
    job = get_job(session, viewer, job_id, lock=True)
    if job.state != JobState.cancelled:
        end_job(session, job, JobState.cancelled)
    return job


def change_bid(session: Session, viewer: Account, job_id: str, max_price_per_hour: Decimal) -> Job:
    """Change an open job's bid (its limit price per accelerator-hour).

    Only an open job's bid can change: a matched job already holds an ask locked
    at its match. A clearing round solving meanwhile sees the job changed and
    leaves it for the next round, which uses the new bid.
    """
    job = get_job(session, viewer, job_id, lock=True)
    if job.state != JobState.open:
        raise Conflict(
            f"job {job_id} is {job.state.value}; only an open job's bid can change",
            field="body.max_price_per_hour",
        )
    job.max_price_per_hour_micros = usd_to_micros(max_price_per_hour)
    job.updated_at = utcnow()
    session.flush()
    return job


def list_jobs(session: Session, viewer: Account, query: JobQuery) -> tuple[list[Job], int]:
    conditions = visibility.own_rows(viewer, Job.account_id)
    if not conditions and query.account_id:
        conditions.append(Job.account_id == query.account_id)
    if query.state:
        conditions.append(Job.state == query.state)
    total = session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0
    rows = session.scalars(
        select(Job)
        .where(*conditions)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(query.limit)
        .offset(query.offset)
    ).all()
    return list(rows), total


def job_runs(session: Session, job: Job) -> list[RunOut]:
    """Every allocation of ``job``, oldest first, with its offer and node (one query)."""
    from broker.models.market import Allocation
    from broker.models.node import Node

    rows = session.execute(
        select(Allocation, Offer, Node.name)
        .join(Offer, Offer.id == Allocation.offer_id)
        .outerjoin(Node, Node.id == Offer.node_id)
        .where(Allocation.job_id == job.id)
        .order_by(Allocation.created_at, Allocation.id)
    ).all()
    return [
        RunOut(
            allocation_id=a.id,
            status=a.status.value,
            node=node,
            accelerator=o.accelerator,
            accelerators=a.accelerators,
            held=held_label(o.accelerator, a),
            slice=a.slice,
            share=a.share_num / a.share_den,
            platform=o.platform,
            emulated=o.emulated,
            region=o.region,
            country=o.country,
            price_per_hour=micros_to_usd(a.price_per_hour_micros),
            estimated_runtime_hours=a.runtime_hours,
            created_at=a.created_at,
            started_at=a.started_at,
            ended_at=a.ended_at,
            accelerator_seconds=a.usage_ms / 1000,
            end_reason=a.end_reason,
        )
        for a, o, node in rows
    ]
