"""``broker services``: deploy a JAX function as an inference service, list, show, call
and undeploy services, over HTTP (the developer's commands; see ``broker.devcli``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.devcli import (
    DEFAULT_URL,
    AsJson,
    BrokerUrl,
    Debug,
    KeyFile,
    UserError,
    _client,
    _errors,
    _plain,
    _print_json,
    _table,
    load_function,
    parse_args,
)

services_app = typer.Typer(
    help="Inference services (developers): deploy a JAX function near its users, call it.",
    no_args_is_help=True,
)


def parse_users(items: list[str]) -> list[dict[str, Any]]:
    """``NAME=LAT,LON[,SHARE]`` each, e.g. ``lagos=6.5,3.4,2``."""
    users = []
    for item in items:
        name, _, place = item.rpartition("=")
        parts = place.split(",")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            numbers = [float(p) for p in parts]
        except ValueError:
            raise UserError(f"--users {item!r}: give NAME=LAT,LON or NAME=LAT,LON,SHARE") from None
        user: dict[str, Any] = {"lat": numbers[0], "lon": numbers[1]}
        if name:
            user["name"] = name
        if len(numbers) == 3:
            user["share"] = numbers[2]
        users.append(user)
    return users


@services_app.command("deploy")
def deploy(
    target: Annotated[str, typer.Argument(metavar="FILE.py:FUNCTION", help="The JAX function")],
    args: Annotated[
        str,
        typer.Option(
            "--args",
            help="Example arguments as a JSON list (shapes and types of every request); "
            '"@x.npy" loads an array from a file',
        ),
    ],
    users: Annotated[
        list[str],
        typer.Option(help="Where requests come from: NAME=LAT,LON[,SHARE]; repeat"),
    ],
    latency_slo_ms: Annotated[
        float, typer.Option(min=0.001, help="Round trip from each user region to a replica")
    ],
    max_price: Annotated[float, typer.Option(min=0, help="The most you pay, USD per replica-hour")],
    min_replicas: Annotated[int, typer.Option(min=1)] = 1,
    max_replicas: Annotated[int, typer.Option(min=1)] = 4,
    platform: Annotated[
        list[str] | None,
        typer.Option(help="A backend it may run on (cuda, rocm, tpu, cpu); repeat [all]"),
    ] = None,
    country: Annotated[
        list[str] | None, typer.Option(help="A country replicas may run in; repeat [any]")
    ] = None,
    target_queue: Annotated[
        float, typer.Option(min=0.001, help="Scale up above this many requests per replica")
    ] = 2.0,
    target_p95_ms: Annotated[
        float | None, typer.Option(help="Scale up above this p95 time in a replica")
    ] = None,
    name: Annotated[str | None, typer.Option(help="A name to know it by")] = None,
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Package a JAX function on example arguments and deploy it as a service. Prints
    the service's id (last line); call it with ``broker services infer``."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # packaging needs no accelerator
    with _errors(debug):
        fn = load_function(target)
        example = parse_args(args, Path.cwd())
        fields: dict[str, Any] = {
            "name": name or target.rpartition(":")[2],
            "allowed_countries": [c.upper() for c in country] if country else None,
            "target_queue": target_queue,
            "target_p95_ms": target_p95_ms,
        }
        if platform:
            fields["platforms"] = tuple(platform)
        with _client(broker, api_key_file) as client:
            service = client.deploy(
                fn,
                *example,
                users=parse_users(users),
                latency_slo_ms=latency_slo_ms,
                max_price_per_hour=max_price,
                min_replicas=min_replicas,
                max_replicas=max_replicas,
                **fields,
            )
            typer.echo(f"deployed {service.id} ({service.state})", err=True)
            if as_json:
                _print_json(service.data)
            else:
                typer.echo(service.id)


@services_app.command("list")
def list_services(
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Your services: state, replicas up of those wanted, SLO."""
    with _errors(debug), _client(broker, api_key_file) as client:
        page = client.http.json("GET", "/v1/services", params={"limit": 100})
        if as_json:
            _print_json(page)
            return
        _table(
            ("id", "name", "state", "replicas", "slo ms", "created"),
            [
                (
                    s["id"],
                    s["name"] or "",
                    s["state"],
                    f"{sum(r['healthy'] for r in s['replicas'])}/{s['desired_replicas']}",
                    f"{s['latency_slo_ms']:g}",
                    s["created_at"][:19],
                )
                for s in page["items"]
            ],
        )


@services_app.command("show")
def show(
    service_id: str,
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """A service: its replicas, last minute's latency per user region, scale events."""
    with _errors(debug), _client(broker, api_key_file) as client:
        s = client.service(service_id).data
        if as_json:
            _print_json(s)
            return
        typer.echo(f"{s['id']} {s['name'] or ''}: {s['state']}, endpoint {s['endpoint']}")
        if s.get("unmatched"):
            typer.echo(f"not placed: {s['unmatched']}")
        if s.get("error"):
            typer.echo(f"error: {s['error']}")
        typer.echo(
            f"{s['requests_per_second']:.1f} requests/s, {s['errors']} errors; "
            f"p50/p95/p99 {_ms(s['p50_ms'])}/{_ms(s['p95_ms'])}/{_ms(s['p99_ms'])} ms"
        )
        _table(
            ("replica", "state", "where", "healthy", "queued", "requests"),
            [
                (
                    r["job_id"],
                    r["state"],
                    f"{r['accelerator']} in {r['region']}"
                    if r["region"]
                    else r["waiting_for"] or "",
                    "yes" if r["healthy"] else "no",
                    "" if r["queued"] is None else f"{r['queued']:.2f}",
                    r["requests"],
                )
                for r in s["replicas"]
            ],
        )
        _table(
            ("user region", "requests", "within slo", "p50", "p95", "p99"),
            [
                (
                    g["region"],
                    g["requests"],
                    g["within_slo"],
                    _ms(g["p50_ms"]),
                    _ms(g["p95_ms"]),
                    _ms(g["p99_ms"]),
                )
                for g in s["regions"]
            ],
        )
        for e in s["events"][:10]:
            change = f"{e['replicas_from']} -> {e['replicas_to']}"
            typer.echo(f"{e['at'][:19]} {e['kind']} {change}: {e['reason']}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


@services_app.command("infer")
def infer(
    service_id: str,
    args: Annotated[str, typer.Option("--args", help="The arguments, as for deploy")],
    at: Annotated[
        str | None, typer.Option(help="Where you are, LAT,LON: the nearest replica answers")
    ] = None,
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    debug: Debug = False,
) -> None:
    """Call a service on arguments; prints what it returns (as JSON)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with _errors(debug):
        inputs = parse_args(args, Path.cwd())
        location = None
        if at is not None:
            try:
                lat, lon = (float(v) for v in at.split(","))
            except ValueError:
                raise UserError(f"--at {at!r}: give LAT,LON") from None
            location = (lat, lon)
        with _client(broker, api_key_file) as client:
            service = client.service(service_id)
            typer.echo(json.dumps(_plain(service.infer(*inputs, location=location))))


@services_app.command("undeploy")
def undeploy(
    service_id: str,
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    debug: Debug = False,
) -> None:
    """Take a service down; its replicas stop and are billed for what they ran."""
    with _errors(debug), _client(broker, api_key_file) as client:
        typer.echo(f"{service_id}: {client.service(service_id).undeploy().state}")
