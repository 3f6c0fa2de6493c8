"""The one settings object. Every setting reads from a ``BROKER_*`` variable."""

from __future__ import annotations

from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Broker settings; defaults give the embedded set-up (SQLite under ``var/``)."""

    model_config = SettingsConfigDict(env_prefix="BROKER_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        default=REPO_ROOT / "var",
        description="Where the broker keeps its files (the SQLite database by default).",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; empty means SQLite at DATA_DIR/broker.db. "
        "For PostgreSQL: postgresql+psycopg://user:password@host:5432/dbname",
    )
    clear_interval_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Seconds between automatic clearing rounds; 0 turns them off",
    )
    clear_time_limit_seconds: float = Field(
        default=10.0, gt=0, le=600, description="Time the solver may take per round"
    )
    book_cache_seconds: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="How old the order book served by GET /v1/market/book may be: each "
        "worker computes it at most once in this time; 0 computes it on every request",
    )
    group_commit_linger_ms: float = Field(
        default=3.0,
        ge=0,
        le=100,
        description="Under load, how long a batch of submissions (group commit) waits for "
        "more before it is written: fuller batches cost less CPU a request, each request "
        "waits up to this long more; a lone request never waits",
    )
    placement_value_usd: Decimal = Field(default=Decimal("10000"), gt=0)
    egress_usd_per_gb: Decimal = Field(default=Decimal("0.09"), ge=0)
    latency_usd_per_ms: Decimal = Field(default=Decimal("0"), ge=0)
    slice_idle_weight: Decimal = Field(
        default=Decimal("0.25"),
        ge=0,
        le=1,
        description="Fractions: a match's value drops by this share of the placement value "
        "per GPU of compute its slice holds beyond the job's ask, so that rounds prefer "
        "jobs that fill their slices (0: count jobs only)",
    )
    carbon_usd_per_t: Decimal = Field(
        default=Decimal("0"),
        ge=0,
        description="The market's carbon price, USD per tonne of CO2e, added to the cost "
        "clearing minimises (not charged): 0 counts energy and carbon without pricing them",
    )
    max_artifact_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest artifact upload, in bytes"
    )
    max_arrays_bytes: int = Field(
        default=1024 * 1024 * 1024,
        ge=1024,
        description="Largest array bundle upload (inputs, checkpoint, result), in bytes",
    )
    max_infer_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Largest request to a service (POST /v1/services/{id}/infer), in bytes",
    )
    infer_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="How long a request to a service may take"
    )
    relay_simulate_rtt: bool = Field(
        default=False,
        description="Benchmarks: the relay delays each request by the market's modelled "
        "round trip between its caller and the replica (loopback has none)",
    )
    relay_url: str = Field(
        default="",
        description="Set by `broker serve` for its web workers: the relay process that "
        "holds the replicas' connections (empty: this process relays)",
    )
    relay_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="`broker serve` with several workers: the relay process's port "
        "(0: a free one, which the work orders name to agents)",
    )
    relay_secret: SecretStr = Field(
        default=SecretStr(""),
        description="Set by `broker serve` for its processes: web workers sign the caller "
        "they checked with it, so the relay does not check the key again",
    )
    relay_public_url: str = Field(
        default="",
        description="Where replicas' agents reach the relay, when not at the broker's own "
        "URL (`broker serve` with several workers sets it to its relay process)",
    )
    service_window_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="How often the relay writes what it measured of each service (the "
        "autoscaler's and the dashboard's figures, and a replica's heartbeat)",
    )
    service_start_grace_s: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="A replica's time to start (fetch, compile, warm up) before the relay "
        "not hearing from it counts as losing it",
    )
    service_scale_up_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A service adds a replica when its load stays above target this long",
    )
    service_scale_down_s: float = Field(
        default=120.0,
        gt=0,
        le=86_400,
        description="A service drops a replica after its load stays well below target this long",
    )
    node_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="A node that sends no heartbeat for this long is offline: its offers "
        "leave the book and its jobs go back to the market",
    )
    start_timeout_s: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="A match its provider has not started within this long goes back to the "
        "order book (docs/market.md)",
    )
    max_unstarted: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="An offer that leaves this many matches in a row unstarted is suspended",
    )
    run_margin_s: float = Field(
        default=120.0,
        ge=0,
        le=86_400,
        description="A run this long past its job's deadline or its offer's available hours "
        "is ended by the broker (agents stop it themselves a little earlier)",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Starts a job may have; one that fails or loses its node this many "
        "times fails for good, with the last reason",
    )
    fee_percent: Decimal = Field(
        default=Decimal("5"),
        ge=0,
        le=100,
        decimal_places=4,
        description="The broker's fee, as a percentage of usage charges, until an admin "
        "sets one (PUT /v1/billing/fee)",
    )
    billing_period: Literal["month", "week", "day"] = Field(
        default="month", description="Invoices cover calendar periods of this length (UTC)"
    )
    billing_interval_seconds: float = Field(
        default=60.0,
        ge=0,
        description="Seconds between the server's billing passes (invoices for ended periods, "
        "Stripe sync, webhook retries); 0 turns them off",
    )
    stripe_api_key: SecretStr | None = Field(
        default=None, description="Stripe secret key; unset means invoices stay local"
    )
    stripe_webhook_secret: SecretStr | None = Field(
        default=None, description="Signing secret of the Stripe webhook endpoint (whsec_...)"
    )
    stripe_api_base: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Where the Stripe SDK sends requests (default: Stripe's API)",
    )
    rate_limit_per_second: float = Field(
        default=100.0,
        ge=0,
        description="Requests a second one API key may send on average (per server process "
        "unless RATE_LIMIT_STORE is shared); 0 turns rate limits off",
    )
    rate_limit_burst: int = Field(
        default=200, ge=1, description="Requests one API key may send at once"
    )
    rate_limit_anonymous_per_second: float = Field(
        default=10.0,
        gt=0,
        description="Requests a second one client address may send without a key this "
        "process has seen authenticate (none, a new one, a made-up one), per server "
        "process; they are refused before any database work",
    )
    rate_limit_anonymous_burst: int = Field(
        default=50, ge=1, description="Requests one client address may send at once without a key"
    )
    rate_limit_store: Literal["auto", "memory", "database"] = Field(
        default="auto",
        description="Where rate limits are counted: 'database' shares them across every "
        "process and replica (PostgreSQL only), 'memory' counts per server process; 'auto' "
        "is 'database' on PostgreSQL and 'memory' on SQLite",
    )
    lease_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How long a process's lease on a periodic task (clearing, sweeps, "
        "billing) lasts unrenewed: how soon another process or replica takes the task over "
        "from one that died",
    )
    blob_store: Literal["local", "s3"] = Field(
        default="local",
        description="Where uploads are stored: 'local' (DATA_DIR/blobs, one machine) or "
        "'s3' (an S3-compatible bucket every replica shares)",
    )
    s3_bucket: str = Field(default="", description="The bucket, with BLOB_STORE=s3")
    s3_prefix: str = Field(default="blobs/", description="Key prefix of the blobs in the bucket")
    s3_endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="An S3-compatible server (MinIO, Ceph, R2...); unset means AWS. "
        "Credentials come from the usual AWS_* variables or the instance's role",
    )
    s3_region: str | None = Field(default=None, description="The bucket's region")
    metrics_token: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="A bearer token /metrics asks for ('Authorization: Bearer <token>'); "
        "unset, /metrics answers only clients on this machine (loopback)",
    )
    metrics_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="How old the market figures /metrics reads from the database may be: "
        "each worker reads them at most once in this time",
    )
    storage_quota_bytes: int = Field(
        default=20 * 1024**3,
        ge=0,
        description="Bytes of distinct uploads (artifacts and array bundles) one account may "
        "keep stored; an upload past it is refused with 413",
    )
    storage_quota_blobs: int = Field(
        default=10_000,
        ge=0,
        description="Distinct uploads one account may keep stored; past it, 429",
    )
    blob_grace_hours: float = Field(
        default=24.0,
        gt=0,
        description="An upload no job refers to is deleted this long after it was last "
        "uploaded (the garbage collector runs with the billing passes)",
    )
    log_format: Literal["json", "text"] = Field(
        default="json", description="broker serve's logs: JSON lines, or text for people"
    )
    package_worker: bool = Field(
        default=True,
        description="Packaging runs XLA's cost analysis in a worker process, beside the "
        "export (started after a process's first package()); false runs it in-process",
    )
    allow_emulation: bool = Field(
        default=False,
        description="Accept offers of hardware emulated on a CPU (labelled as such): for "
        "demos and tests, never for a real market",
    )
    allow_capacity_bids: bool = Field(
        default=False,
        description="Accept bids without a program (capacity alone: platforms and a runtime "
        "or the work): for market simulations, load tests and tests of the market, never for "
        "a real market. Nothing runs on them: an agent matched to one fails it at once, "
        "saying so. By default a bid must name its program (artifact and inputs)",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        min_length=32,
        description="Signs the dashboard's session cookies and CSRF tokens; empty means a "
        "random key generated once and kept in DATA_DIR/secret_key",
    )
    cookie_secure: bool = Field(
        default=False,
        description="Mark the dashboard's cookies Secure even when the request looks like "
        "plain http (a TLS proxy that does not forward the scheme); over https they always are",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    @field_validator("secret_key", "metrics_token", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, url: str) -> str:
        if url and not url.startswith(("sqlite", "postgresql")):
            raise ValueError("BROKER_DATABASE_URL must be a sqlite:// or postgresql+psycopg:// URL")
        if url.startswith(("postgresql://", "postgres://")):
            # psycopg 3 is the driver we ship; plain URLs would ask for psycopg2.
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url

    @property
    def blob_dir(self) -> Path:
        """Where artifacts and array bundles are stored, by content address."""
        return self.data_dir / "blobs"

    @property
    def shared_rate_limits(self) -> bool:
        """Whether rate limits are counted in the database (across replicas)."""
        if self.rate_limit_store == "auto":
            return self.effective_database_url.startswith("postgresql")
        return self.rate_limit_store == "database"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'broker.db'}"


@cache
def get_settings() -> Settings:
    return Settings()
