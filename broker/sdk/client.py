"""The developer's client: package a JAX function, submit it as a job, wait, read the result."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import jax

from broker.portable import arrays
from broker.portable.artifact import ALL_PLATFORMS, Artifact, package, package_step
from broker.portable.manifest import ArtifactError
from broker.sdk.http import BINARY, BrokerError, Connection

if TYPE_CHECKING:
    from broker.sdk.services import Service

_FINAL = {"succeeded", "failed", "cancelled"}


class JobFailed(RuntimeError):
    """The job ended in failure; ``job.error`` says why."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} failed: {job.error}")
        self.job = job


class JobCancelled(RuntimeError):
    """The job was cancelled before it finished."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} was cancelled")
        self.job = job


class Client(Connection):
    """A developer's connection to a broker.

    >>> client = Client("http://127.0.0.1:8000", api_key=KEY)
    >>> job = client.submit(loss_fn, params, batch, max_price_per_hour=4.0)
    >>> job.wait()
    >>> out = job.result()
    """

    # -- submitting -----------------------------------------------------------------

    def submit(
        self,
        fn: Any,
        *args: Any,
        steps: int | None = None,
        checkpoint_every: int | None = None,
        platforms: Sequence[str] = ALL_PLATFORMS,
        polymorphic_shapes: Any = None,
        **job_fields: Any,
    ) -> Job:
        """Package ``fn`` for ``platforms``, upload it and ``args``, and submit the job.

        Without ``steps`` the job computes ``fn(*args)`` once. With ``steps`` it is
        iterative: ``state = fn(state, *rest)`` ``steps`` times, where ``args`` is
        ``(state, *rest)``, checkpointed every ``checkpoint_every`` steps.

        Other keyword arguments are job fields: ``max_price_per_hour`` (required),
        ``accelerators`` (under 1: a part of one, such as 0.25), ``mig_profile`` (a MIG
        instance, such as "3g.40gb"), ``accepts_shared`` (a part may run on a shared,
        time-sliced accelerator), ``min_memory_gib``, ``vendors``, ``accelerator_models``,
        ``deadline_hours``, ``duration_hours``, ``latency_slo_ms``, ``user_lat``,
        ``user_lon``, ``data_region``, ``data_gb``, ``allowed_countries``,
        ``priority``, ``budget_usd`` (the most the job may cost, fee included), ``name``
        and ``idempotency_key``.
        """
        artifact = _package(fn, args, steps, platforms, polymorphic_shapes)
        return self.submit_artifact(
            artifact, args, steps=steps, checkpoint_every=checkpoint_every, **job_fields
        )

    def submit_artifact(
        self,
        artifact: Artifact,
        args: Sequence[Any],
        *,
        steps: int | None = None,
        checkpoint_every: int | None = None,
        idempotency_key: str | None = None,
        **job_fields: Any,
    ) -> Job:
        """Submit a job for an artifact already packaged, on inputs ``args``."""
        body = {k: _wire(k, v) for k, v in job_fields.items() if v is not None}
        body["artifact"] = self.upload_artifact(artifact)
        body["inputs"] = self.upload_arrays(jax.tree.leaves(tuple(args)))
        if steps is not None:
            body["steps"] = steps
        if checkpoint_every is not None:
            body["checkpoint_every"] = checkpoint_every
        key = idempotency_key or str(uuid.uuid4())
        data = self.http.json("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})
        return Job(self, data, artifact)

    def upload_artifact(self, artifact: Artifact) -> str:
        """Upload an artifact unless the broker has it already; returns its address."""
        if not self.http.exists(f"/v1/artifacts/{artifact.sha256}"):
            data = artifact.to_bytes()
            self.check_size("artifact", len(data))
            self.http.request("POST", "/v1/artifacts", content=data, headers=BINARY)
        return artifact.sha256

    # -- services ---------------------------------------------------------------------

    def deploy(
        self,
        fn: Any,
        *args: Any,
        users: Sequence[dict[str, Any]],
        latency_slo_ms: float,
        max_price_per_hour: float | Decimal | str,
        min_replicas: int = 1,
        max_replicas: int = 4,
        platforms: Sequence[str] = ALL_PLATFORMS,
        polymorphic_shapes: Any = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Service:
        """Package ``fn`` as ``submit`` does, on example ``args``, and deploy it as a
        service: replicas near ``users`` (``[{"lat", "lon", "share", "name"}]``), each
        region within ``latency_slo_ms`` of one where any offer allows it. Other
        keyword arguments are service fields: ``name``, ``allowed_countries``,
        ``target_queue``, ``target_p95_ms``. Call it with ``service.infer(*args)``."""
        from broker.sdk.services import Service

        artifact = _package(fn, args, None, platforms, polymorphic_shapes)
        body = {k: _wire(k, v) for k, v in fields.items() if v is not None}
        body.update(
            artifact=self.upload_artifact(artifact),
            inputs=self.upload_arrays(jax.tree.leaves(tuple(args))),
            users=list(users),
            latency_slo_ms=latency_slo_ms,
            max_price_per_hour=_wire("max_price_per_hour", max_price_per_hour),
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            platforms=list(platforms),
        )
        # A retry of a deploy whose answer was lost returns the service it made.
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        data = self.http.json("POST", "/v1/services", json=body, headers=headers)
        return Service(self, data, artifact)

    def service(self, service_id: str) -> Service:
        from broker.sdk.services import Service

        return Service(self, self.http.json("GET", f"/v1/services/{service_id}"))

    # -- reading ----------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        return Job(self, self.http.json("GET", f"/v1/jobs/{job_id}"))

    def jobs(self, state: str | None = None, limit: int = 100) -> list[Job]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        page = self.http.json("GET", "/v1/jobs", params=params)
        return [Job(self, item) for item in page["items"]]

    # -- billing ----------------------------------------------------------------------

    def invoices(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """My invoices, newest first (without their lines)."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        page = self.http.json("GET", "/v1/invoices", params=params)
        return list(page["items"])

    def invoice(self, invoice_id: str) -> dict[str, Any]:
        """One invoice with its lines, fee and total."""
        result: dict[str, Any] = self.http.json("GET", f"/v1/invoices/{invoice_id}")
        return result

    def generate_invoice(self) -> list[dict[str, Any]]:
        """Invoice my runs that ended and are not billed yet, now; returns the new
        invoices (none if there was nothing to bill)."""
        result = self.http.json("POST", "/v1/invoices/generate", json={})
        return list(result["invoices"])


class Job:
    """A submitted job, as last read from the broker (``refresh()`` reads it again)."""

    def __init__(self, client: Client, data: dict[str, Any], artifact: Artifact | None = None):
        self._client = client
        self.data = data
        self._artifact = artifact

    def __repr__(self) -> str:
        return f"Job({self.id}, {self.state})"

    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def state(self) -> str:
        return str(self.data["state"])

    @property
    def error(self) -> str | None:
        return self.data.get("error")

    def refresh(self) -> Job:
        self.data = self._client.http.json("GET", f"/v1/jobs/{self.id}")
        return self

    def cancel(self) -> Job:
        self.data = self._client.http.json("POST", f"/v1/jobs/{self.id}/cancel")
        return self

    def wait(self, timeout: float | None = None, poll: float = 1.0, progress: bool = True) -> Job:
        """Wait until the job ends. Prints progress to stderr (unless ``progress`` is
        False); raises JobFailed or JobCancelled if it did not succeed, TimeoutError if
        ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        shown = ""
        while True:
            line = self._progress_line()
            if progress and line != shown:
                print(line, file=sys.stderr, flush=True)
                shown = line
            if self.state in _FINAL:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} is still {self.state} after {timeout} s")
            time.sleep(poll)
            self.refresh()
        if self.state == "failed":
            raise JobFailed(self)
        if self.state == "cancelled":
            raise JobCancelled(self)
        return self

    def result(self) -> Any:
        """The job's output: the pytree of arrays its function returns (for an iterative
        job, the final state). The job must have succeeded."""
        if self.state != "succeeded":
            self.refresh()
        if self.state != "succeeded":
            raise BrokerError(409, "no_result", f"job {self.id} is {self.state}, not succeeded")
        sha = self.data["result"]
        data = self._client.http.download(f"/v1/arrays/{sha}/content", sha)
        leaves = [jax.numpy.asarray(x) for x in arrays.decode(data)]
        return jax.tree.unflatten(self._output_tree(), leaves)

    def _output_tree(self) -> Any:
        artifact = self._artifact
        if artifact is None:
            sha = self.data["artifact"]
            artifact = Artifact.from_bytes(
                self._client.http.download(f"/v1/artifacts/{sha}/content", sha)
            )
            self._artifact = artifact
        exported = artifact.exported
        if artifact.kind == "function":
            return exported.out_tree
        (state, *_), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
        return jax.tree.structure(state)

    def _progress_line(self) -> str:
        line = f"{self.id}: {self.state}"
        steps = self.data.get("steps")
        if steps:
            line += f", step {self.data.get('steps_done', 0)}/{steps}"
        if self.data.get("cost_usd") not in (None, "0.00"):
            line += f", cost ${self.data['cost_usd']}"
        if self.error:
            line += f": {self.error}"
        return line


def _package(
    fn: Any, args: Sequence[Any], steps: int | None, platforms: Sequence[str], shapes: Any
) -> Artifact:
    """``fn`` on ``args`` packaged for ``platforms`` (a step function with ``steps``)."""
    try:
        if steps is None:
            return package(fn, *args, platforms=platforms, polymorphic_shapes=shapes)
        return package_step(fn, args[0], *args[1:], platforms=platforms, polymorphic_shapes=shapes)
    except NotImplementedError as e:
        # What jax.export says of host callbacks (jax.pure_callback, io_callback,
        # jax.debug.callback): a Python function of this machine cannot travel.
        raise ArtifactError(
            f"cannot package {getattr(fn, '__name__', fn)!s}: {e}. A job runs on "
            "another machine, so its program must be pure JAX: no jax.pure_callback, "
            "io_callback or jax.debug.callback (compute that part before submitting, "
            "or in jax.numpy)"
        ) from None


_MONEY = {"max_price_per_hour", "budget_usd"}


def _wire(name: str, value: Any) -> Any:
    """Money goes as decimal strings, so that 0.1 stays exactly 0.1."""
    if name in _MONEY and isinstance(value, float | int | Decimal):
        return str(Decimal(repr(value)) if isinstance(value, float) else value)
    if isinstance(value, tuple | set):
        return list(value)
    return value
