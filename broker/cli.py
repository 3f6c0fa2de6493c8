"""The ``broker`` command.

Developers' and providers' commands talk to a broker over HTTP and need only the
client install (``broker jobs``, ``offers``, ``market``, ``invoices list|show``,
``agent``: ``broker.devcli``). The operator's commands work on the broker's
database and need the server install (``serve``, ``db``, ``accounts``, ``keys``,
``invoices generate``, ``calibrate``, ``solve``).
"""

from __future__ import annotations

import enum
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from broker import devcli, servicecli

app = typer.Typer(help="The compute broker.", no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database schema migrations (operators).", no_args_is_help=True)
accounts_app = typer.Typer(help="Accounts and API keys (operators).", no_args_is_help=True)
keys_app = typer.Typer(
    help="API keys: list, create, rotate, revoke (operators).", no_args_is_help=True
)
invoices_app = typer.Typer(
    help="Invoices: yours over HTTP (list, show); every account's (generate, operators).",
    no_args_is_help=True,
)
app.add_typer(devcli.jobs_app, name="jobs")
app.add_typer(devcli.offers_app, name="offers")
app.add_typer(devcli.market_app, name="market")
app.add_typer(servicecli.services_app, name="services")
app.add_typer(db_app, name="db")
app.add_typer(accounts_app, name="accounts")
app.add_typer(keys_app, name="keys")
app.add_typer(invoices_app, name="invoices")
invoices_app.command("list")(devcli.invoices_list)
invoices_app.command("show")(devcli.invoices_show)


class RoleName(enum.StrEnum):
    """broker.models.account.Role, spelled here so the client install (no SQLAlchemy)
    can load this module."""

    developer = "developer"
    provider = "provider"
    admin = "admin"


agent_key = devcli.api_key  # the agent reads its key as the developer commands do


def main() -> None:
    """The ``broker`` console script: an operator's command on the client install says
    what to install instead of a traceback."""
    try:
        app()
    except ModuleNotFoundError as exc:
        # The server's libraries, or the repository's modules the client install leaves out.
        server_only = {"sqlalchemy", "alembic", "uvicorn", "fastapi", "ortools", "stripe"}
        server_only |= {"psycopg", "pydantic_settings", "jinja2", "adapters", "solver", "web"}
        name = exc.name or ""
        if name.split(".")[0] in server_only or (
            name.startswith("broker.") and name != "broker.sdk"
        ):
            typer.echo(
                f"error: this command needs the broker's full install ({name} is missing; "
                "this is the client install): pip install -e . from the repository root",
                err=True,
            )
            sys.exit(1)
        raise


def recommended_workers() -> int:
    """Worker processes ``broker serve`` starts unless told otherwise: one per core."""
    return max(1, len(os.sched_getaffinity(0)))


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind [BROKER_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [BROKER_PORT]")] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Worker processes [one per core]", show_default=False),
    ] = None,
    access_log: Annotated[bool, typer.Option(help="Log every request")] = True,
    migrate: Annotated[bool, typer.Option(help="Apply migrations first")] = True,
    demo: Annotated[
        bool,
        typer.Option(
            help="Also run the demo market (broker.demo): providers at real cloud prices, "
            "emulated on this CPU and labelled so, a real CPU agent and demo developers; "
            "logs as text unless BROKER_LOG_FORMAT says otherwise"
        ),
    ] = False,
) -> None:
    """Serve the HTTP API and the dashboard; with BROKER_CLEAR_INTERVAL_SECONDS > 0,
    clear the market in a process of its own. Ctrl-C or SIGTERM stops everything it
    started within seconds: the demo first (its agents sign off while the server
    still answers), then the web server, then the scheduler process (rounds, sweeps,
    billing)."""
    from broker.config import get_settings
    from broker.migrate import upgrade

    if demo:
        # The demo's providers are emulated; a broker accepts them only when told to.
        os.environ["BROKER_ALLOW_EMULATION"] = "1"
        os.environ.setdefault("BROKER_CLEAR_INTERVAL_SECONDS", "3")
        os.environ.setdefault("BROKER_LOG_FORMAT", "text")
        get_settings.cache_clear()
    settings = get_settings()
    if migrate:
        upgrade()
    os.environ["BROKER_CONFIGURE_LOGGING"] = "1"
    os.environ["BROKER_ACCESS_LOG"] = "1" if access_log else "0"
    from broker.observability import configure_logging

    configure_logging(settings.log_format)
    count = workers or recommended_workers()
    if count > 1:
        # The workers share their metrics through files (prometheus_client's
        # multiprocess mode); start each server with an empty directory.
        shared = settings.data_dir / "prometheus"
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared)
    bind_host, bind_port = host or settings.host, port or settings.port
    from broker import supervise

    local = "127.0.0.1" if bind_host in ("0.0.0.0", "::") else bind_host  # noqa: S104
    code = supervise.run(
        supervise.Plan(
            host=bind_host,
            port=bind_port,
            workers=count,
            demo_url=f"http://{local}:{bind_port}" if demo else None,
            relay_port=(settings.relay_port or supervise.free_port(bind_host))
            if count > 1
            else None,
        )
    )
    if code:
        raise typer.Exit(code)


@app.command()
def calibrate(
    save: Annotated[
        bool, typer.Option(help="Save the figures to DATA_DIR/calibration.json")
    ] = True,
    quick: Annotated[bool, typer.Option(help="Small problems: a rough figure in seconds")] = False,
) -> None:
    """Measure this machine's CPU (FLOP/s, bandwidth) and how well runtimes are predicted."""
    from broker.config import get_settings
    from broker.portable import calibrate as calibration

    typer.echo("measuring the cpu backend (about a minute)...", err=True)
    result = calibration.calibrate(quick=quick)
    typer.echo(calibration.report(result))
    if save:
        path = calibration.save(result, get_settings().data_dir)
        typer.echo(f"saved to {path}", err=True)
    typer.echo(
        "how estimates held on the market's runs, per model: broker market estimates", err=True
    )


@app.command()
def agent(
    broker: Annotated[
        str, typer.Option(envvar="BROKER_URL", help="The broker's URL [BROKER_URL]")
    ] = "http://127.0.0.1:8000",
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            envvar="BROKER_API_KEY_FILE",
            help="A file holding the provider's API key, readable by its owner only "
            "(chmod 600) [BROKER_API_KEY_FILE]; or set BROKER_API_KEY",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(hidden=True, help="Refused: a key on the command line is visible in ps"),
    ] = None,
    adapter: Annotated[
        str, typer.Option(help="auto, or one of: nvidia, amd, tpu, edge, cpu, kubernetes")
    ] = "auto",
    price: Annotated[
        list[str] | None,
        typer.Option(help="MODEL=USD per accelerator-hour; repeat; '*' for any model"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Node name [this host's name]")] = None,
    region: Annotated[
        str, typer.Option(help="Region the node is in, e.g. europe-west4 or a data centre's name")
    ] = "local",
    country: Annotated[
        str | None, typer.Option(help="ISO country code of where the node is (required)")
    ] = None,
    lat: Annotated[
        float | None, typer.Option(min=-90, max=90, help="Latitude of the node (required)")
    ] = None,
    lon: Annotated[
        float | None, typer.Option(min=-180, max=180, help="Longitude of the node (required)")
    ] = None,
    cpu_slots: Annotated[int, typer.Option(min=1, max=256, help="Jobs the CPU runs at once")] = 1,
    shares: Annotated[
        int | None,
        typer.Option(
            min=2,
            max=64,
            help="Sell each accelerator (or CPU slot) as this many shares, time-sliced with "
            "a memory cap each (compute not isolated); jobs that accept shared capacity "
            "buy them, whole jobs take all of one",
        ),
    ] = None,
    edge_config: Annotated[
        str | None, typer.Option(help="JSON file describing edge devices and where they are")
    ] = None,
    tpu_project: Annotated[str | None, typer.Option(help="GCP project of a TPU fleet")] = None,
    tpu_zone: Annotated[str | None, typer.Option(help="Zone of a TPU fleet")] = None,
    tpu_token: Annotated[
        str | None,
        typer.Option(envvar="BROKER_TPU_TOKEN", help="OAuth bearer token [BROKER_TPU_TOKEN]"),
    ] = None,
    emulate: Annotated[
        list[str] | None,
        typer.Option(
            help="With --adapter emulated (demos): MODEL=COUNT of a catalog model to "
            "emulate on this CPU, labelled as emulated; repeat for several"
        ),
    ] = None,
    discover_seconds: Annotated[
        float, typer.Option(min=1, help="Seconds between hardware discoveries")
    ] = 60.0,
    poll_seconds: Annotated[
        float,
        typer.Option(
            min=0.5, max=60, help="Longest wait of one poll for work; a stop waits for it too"
        ),
    ] = 5.0,
    measure_startup: Annotated[
        bool,
        typer.Option(
            help="Time a tiny program in the sandbox after signing on and state it as the "
            "offers' start-up (clearing adds it to every estimate on them)"
        ),
    ] = True,
    kubeconfig: Annotated[
        Path | None, typer.Option(help="kubernetes: a kubeconfig [~/.kube/config]")
    ] = None,
    in_cluster: Annotated[
        bool, typer.Option(help="kubernetes: use the pod's service account")
    ] = False,
    namespace: Annotated[str, typer.Option(help="kubernetes: where the Jobs run")] = "default",
    image: Annotated[
        str, typer.Option(help="kubernetes: the Jobs' image (the broker installed)")
    ] = "compute-broker:latest",
    toleration: Annotated[
        list[str] | None,
        typer.Option(help="kubernetes: KEY[=VALUE][:EFFECT] taint to tolerate; repeat"),
    ] = None,
    service_account: Annotated[
        str | None, typer.Option(help="kubernetes: the Jobs' service account")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Log debug detail")] = False,
    debug: Annotated[bool, typer.Option(help="Show the traceback of an error")] = False,
) -> None:
    """Run a provider agent: offer this machine's accelerators and run the jobs matched to them.

    Say where the machine is (--country, --lat, --lon; --region): the market matches
    bids by their countries and their users' latency from it."""
    import logging
    import os
    import signal
    import socket
    import sys
    import threading

    from broker.logformat import configure_text_logging

    configure_text_logging(logging.DEBUG if verbose else logging.INFO, debug_http=verbose)
    if api_key is not None:
        typer.echo(
            "error: --api-key is refused: a key on the command line is visible to every user "
            "of this machine (ps); set BROKER_API_KEY or give --api-key-file (chmod 600)",
            err=True,
        )
        raise typer.Exit(2)
    try:
        key = agent_key(os.environ.get("BROKER_API_KEY", ""), api_key_file)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    missing = [
        f"--{flag}" for flag, value in (("country", country), ("lat", lat), ("lon", lon))
        if value is None
    ]  # fmt: skip
    if missing:
        typer.echo(
            f"error: say where this machine is: {', '.join(missing)} missing (e.g. --country NL "
            "--lat 52.37 --lon 4.90; a cloud region's coordinates will do); bids choose "
            "offers by country and by their users' latency from there",
            err=True,
        )
        raise typer.Exit(2)
    assert country is not None
    assert lat is not None
    assert lon is not None
    if adapter == "kubernetes":
        from broker.agent.kube_cli import main as kube_agent

        kube_agent(
            broker=broker,
            key=key,
            name=name,
            region=region,
            country=country,
            lat=lat,
            lon=lon,
            price=price,
            namespace=namespace,
            image=image,
            toleration=toleration,
            service_account=service_account,
            poll_seconds=poll_seconds,
            kubeconfig=kubeconfig,
            in_cluster=in_cluster,
            debug=debug,
        )
        return
    if adapter in ("cpu", "emulated"):
        # Run jobs on the CPU backend even where JAX would pick a GPU.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from adapters import registry
    from broker.agent import AgentConfig, AgentStopped, NodeAgent, parse_prices
    from broker.agent.node import agent_error
    from broker.config import get_settings

    if adapter != "auto" and adapter not in registry.names():
        typer.echo(
            f"error: --adapter must be auto or one of {', '.join(registry.names())}", err=True
        )
        raise typer.Exit(2)
    from adapters.base import AdapterError
    from adapters.emulated import parse_emulate

    if bool(emulate) != (adapter == "emulated"):
        typer.echo("error: --emulate goes with --adapter emulated, and it needs one", err=True)
        raise typer.Exit(2)
    try:
        prices = parse_prices(price or [])
        emulated = parse_emulate(emulate or [])
    except (ValueError, AdapterError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    settings = get_settings()
    options = registry.Options(
        data_dir=settings.data_dir,
        cpu_slots=cpu_slots,
        edge_config=Path(edge_config) if edge_config else None,
        tpu_project=tpu_project,
        tpu_zone=tpu_zone,
        tpu_token=tpu_token,
        emulate=emulated,
    )
    config = AgentConfig(
        broker=broker,
        api_key=key,
        name=name or socket.gethostname().split(".")[0] or "node",
        region=region,
        country=country.upper(),
        lat=lat,
        lon=lon,
        prices=prices,
        adapter=adapter,
        options=options,
        discover_seconds=discover_seconds,
        poll_seconds=poll_seconds,
        cache_dir=settings.data_dir / "xla-cache",
        measure_startup=measure_startup,
        shares=shares,
    )
    from broker.sdk.http import BrokerError

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        NodeAgent(config).run(stop)
        # Runs stopped, the sandbox closed, the node signed off: nothing is left to
        # clean up, and the interpreter's teardown with XLA loaded takes seconds on a
        # busy machine, which a stop (make run's Ctrl-C) would wait for.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except (AgentStopped, BrokerError, AdapterError) as exc:
        if debug:
            raise
        typer.echo(f"error: {agent_error(exc)} (--debug shows the traceback)", err=True)
        raise typer.Exit(1) from None


@app.command()
def solve(
    market_file: Annotated[str, typer.Argument(metavar="MARKET.json", help="A market file")],
    time_limit: Annotated[
        float, typer.Option(min=0.1, max=3600, help="Seconds the solver may take")
    ] = 10.0,
) -> None:
    """Clear a market file offline and print the answer as JSON."""
    import json

    from solver import solve as clear
    from solver.market import MarketFileError, load_market_file

    try:
        market = load_market_file(market_file)
    except (OSError, MarketFileError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(clear(market, time_limit=time_limit).to_json(), indent=2))


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from broker.migrate import upgrade

    upgrade(revision)
    typer.echo(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="e.g. -1 or base")]) -> None:
    """Revert migrations down to REVISION."""
    from broker.migrate import downgrade

    downgrade(revision)
    typer.echo(f"database at {revision}")


@invoices_app.command("generate")
def invoices_generate(
    account: Annotated[
        str | None, typer.Option(help="Only this account (default: every account)")
    ] = None,
    period_end: Annotated[
        bool,
        typer.Option(
            "--period-end",
            help="Bill only runs that ended before this billing period began, as the "
            "server's pass does at each period's end (default: everything up to now)",
        ),
    ] = False,
) -> None:
    """Invoice every ended, unbilled run, now; with Stripe configured, push the new
    invoices to Stripe. Running it again creates nothing new."""
    from broker.billing import sync
    from broker.config import get_settings
    from broker.db import session_scope

    report = sync.generate(
        lambda write=True: session_scope(write=write),
        get_settings(),
        account_id=account,
        period_end=period_end,
    )
    typer.echo(f"{len(report.invoices)} invoice(s) created")
    for invoice_id in report.invoices:
        typer.echo(invoice_id)
    for invoice_id, error in report.sync_errors.items():
        typer.echo(f"error: invoice {invoice_id} was not synced to Stripe: {error}", err=True)
    if report.sync_errors:
        raise typer.Exit(1)


@accounts_app.command("list")
def accounts_list(
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 200,
) -> None:
    """Every account: name, role, id, created, enabled or disabled."""
    from broker.accounts.service import list_accounts
    from broker.db import session_scope

    with session_scope(write=False) as session:
        rows, total = list_accounts(session, limit=limit, offset=0)
        lines = [
            (a.name, a.role.value, a.id, f"{a.created_at:%Y-%m-%d %H:%M}", a.disabled_at)
            for a in rows
        ]
    typer.echo("name\trole\tid\tcreated\tstatus")
    for name, role, account_id, created, disabled in lines:
        status = "enabled" if disabled is None else f"disabled {disabled:%Y-%m-%d %H:%M}"
        typer.echo("\t".join((name, role, account_id, created, status)))
    typer.echo(f"{len(lines)} of {total} accounts", err=True)


@accounts_app.command("create")
def accounts_create(
    name: Annotated[str, typer.Argument(help="Account name, unique")],
    role: Annotated[RoleName, typer.Option(help="What the account may do")] = RoleName.developer,
) -> None:
    """Create an account; its API key is printed once, on the last line."""
    from broker.accounts.service import create_account
    from broker.db import session_scope
    from broker.errors import BrokerError
    from broker.models.account import Role

    try:
        with session_scope() as session:
            account, key = create_account(session, name, Role(role.value))
            account_id = account.id
    except BrokerError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"created {role.value} account {name!r} ({account_id})", err=True)
    typer.echo("API key (shown once; the broker stores only its hash):", err=True)
    typer.echo(key)


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {getattr(exc, 'message', exc)}", err=True)
    return typer.Exit(1)


def _set_disabled(name: str, disabled: bool) -> None:
    from broker.accounts.service import find_account, set_disabled
    from broker.db import session_scope
    from broker.errors import BrokerError

    try:
        with session_scope() as session:
            account = set_disabled(session, None, find_account(session, name).id, disabled)
            what = f"account {account.name!r} ({account.id})"
    except BrokerError as exc:
        raise _fail(exc) from None
    typer.echo(f"{what} {'disabled: its keys are refused' if disabled else 'enabled'}")


@accounts_app.command("disable")
def accounts_disable(
    name: Annotated[str, typer.Argument(help="Account name or id")],
) -> None:
    """Disable an account: every key of it (its nodes' too) is refused at once, in every
    server process, and its dashboard sessions end."""
    _set_disabled(name, True)


@accounts_app.command("enable")
def accounts_enable(name: Annotated[str, typer.Argument(help="Account name or id")]) -> None:
    """Enable a disabled account again."""
    _set_disabled(name, False)


@keys_app.command("list")
def keys_list(name: Annotated[str, typer.Argument(help="Account name or id")]) -> None:
    """An account's keys (its nodes' included): id, prefix, created, last used, revoked."""
    from broker.accounts.service import find_account, list_keys
    from broker.db import session_scope
    from broker.errors import BrokerError

    try:
        with session_scope(write=False) as session:
            account = find_account(session, name)
            rows = [
                (k.id, k.prefix, k.node_id, k.created_at, k.last_used_at, k.revoked_at)
                for k in list_keys(session, account)
            ]
    except BrokerError as exc:
        raise _fail(exc) from None

    def when(value: object) -> str:
        return "-" if value is None else f"{value:%Y-%m-%d %H:%M}"

    typer.echo("id\tprefix\tnode\tcreated\tlast used\trevoked")
    for key_id, prefix, node, created, used, revoked in rows:
        cells = [key_id, prefix + "...", node or "-", when(created), when(used), when(revoked)]
        typer.echo("\t".join(cells))


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Argument(help="Account name or id")]) -> None:
    """Give an account a new key; it is printed once, on the last line."""
    from broker.accounts.service import create_key, find_account
    from broker.db import session_scope
    from broker.errors import BrokerError

    try:
        with session_scope() as session:
            account = find_account(session, name)
            row, key = create_key(session, account)
            key_id = row.id
    except BrokerError as exc:
        raise _fail(exc) from None
    typer.echo(f"created key {key_id} for {name!r} (shown once):", err=True)
    typer.echo(key)


@keys_app.command("rotate")
def keys_rotate(key_id: Annotated[str, typer.Argument(help="The key's id (key_...)")]) -> None:
    """Revoke a key and print its replacement, once, on the last line."""
    from broker.accounts.service import rotate_key
    from broker.db import session_scope
    from broker.errors import BrokerError

    try:
        with session_scope() as session:
            row, key = rotate_key(session, None, key_id)
            new_id = row.id
    except BrokerError as exc:
        raise _fail(exc) from None
    typer.echo(f"revoked {key_id}; its replacement {new_id} (shown once):", err=True)
    typer.echo(key)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (key_...)")]) -> None:
    """Revoke a key: refused at once in every server process; its sessions end."""
    from broker.accounts.service import revoke_key
    from broker.db import session_scope
    from broker.errors import BrokerError

    try:
        with session_scope() as session:
            revoke_key(session, None, key_id)
    except BrokerError as exc:
        raise _fail(exc) from None
    typer.echo(f"revoked {key_id}")


if __name__ == "__main__":
    main()
