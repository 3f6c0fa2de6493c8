"""The ``broker`` command: serve the API, migrate the database, manage accounts."""

from __future__ import annotations

from typing import Annotated

import typer

from broker.accounts.models import Role

app = typer.Typer(help="The compute broker.", no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
accounts_app = typer.Typer(help="Accounts and API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(accounts_app, name="accounts")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind [BROKER_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [BROKER_PORT]")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes")] = 1,
    migrate: Annotated[bool, typer.Option(help="Apply migrations first")] = True,
) -> None:
    """Serve the HTTP API."""
    import uvicorn

    from broker.config import get_settings
    from broker.migrate import upgrade

    settings = get_settings()
    if migrate:
        upgrade()
    uvicorn.run(
        "broker.app:app",
        host=host or settings.host,
        port=port or settings.port,
        workers=workers,
        log_level="info",
    )


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


@accounts_app.command("create")
def accounts_create(
    name: Annotated[str, typer.Argument(help="Account name, unique")],
    role: Annotated[Role, typer.Option(help="What the account may do")] = Role.developer,
) -> None:
    """Create an account; its API key is printed once, on the last line."""
    from broker.accounts.service import create_account
    from broker.db import session_scope
    from broker.errors import BrokerError

    try:
        with session_scope() as session:
            account, key = create_account(session, name, role)
            account_id = account.id
    except BrokerError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"created {role.value} account {name!r} ({account_id})", err=True)
    typer.echo("API key (shown once; the broker stores only its hash):", err=True)
    typer.echo(key)


if __name__ == "__main__":
    app()
