"""``broker agent --adapter kubernetes``: the command line's side of the cluster agent."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

from adapters.kubernetes import DEFAULT_TOLERATIONS, Toleration
from broker.agent.kube import KubeAgent, KubeConfig
from broker.agent.node import AgentStopped, agent_error, parse_prices
from broker.sdk.http import BrokerError

log = logging.getLogger(__name__)


class KubeSetupError(Exception):
    """The cluster agent cannot start: a bad option, or no way to reach the cluster."""


def load_api(kubeconfig: str | None = None, in_cluster: bool = False) -> Any:
    """An API client: the pod's service account (``in_cluster``), else a kubeconfig
    (the given file, or ``$KUBECONFIG`` / ``~/.kube/config``)."""
    from kubernetes import client, config

    if in_cluster:
        config.load_incluster_config()
        return client.ApiClient()
    return config.new_client_from_config(config_file=kubeconfig)


def config_from_options(
    *,
    broker: str,
    api_key: str,
    cluster: str,
    region: str,
    country: str,
    lat: float,
    lon: float,
    prices: list[str],
    namespace: str,
    image: str,
    tolerations: list[str],
    service_account: str | None,
    poll_seconds: float,
) -> KubeConfig:
    try:
        parsed = tuple(Toleration.parse(t) for t in tolerations)
        priced = parse_prices(prices)
    except ValueError as e:
        raise KubeSetupError(str(e)) from None
    return KubeConfig(
        broker=broker,
        api_key=api_key,
        cluster=cluster,
        region=region,
        country=country,
        lat=lat,
        lon=lon,
        prices=priced,
        namespace=namespace,
        image=image,
        tolerations=DEFAULT_TOLERATIONS + parsed,
        service_account=service_account,
        poll_seconds=poll_seconds,
    )


def run(config: KubeConfig, kubeconfig: Path | None, in_cluster: bool) -> None:
    """Run the cluster agent until SIGINT or SIGTERM."""
    if kubeconfig is not None and in_cluster:
        raise KubeSetupError("give --kubeconfig or --in-cluster, not both")
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        raise KubeSetupError(
            "the Kubernetes agent needs the kubernetes client: "
            "pip install 'compute-broker[kubernetes]'"
        ) from None
    try:
        api = load_api(str(kubeconfig) if kubeconfig else None, in_cluster)
    except Exception as e:  # the loaders raise ConfigException, OSError, TypeError...
        where = "the pod's service account" if in_cluster else (kubeconfig or "~/.kube/config")
        raise KubeSetupError(f"cannot reach the cluster through {where}: {e}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    KubeAgent(config, api).run(stop)


def main(**o: Any) -> None:
    """``broker agent --adapter kubernetes``: one agent for a whole cluster."""
    import socket

    import typer

    try:
        config = config_from_options(
            broker=o["broker"],
            api_key=o["key"],
            cluster=o["name"] or socket.gethostname().split(".")[0] or "cluster",
            region=o["region"],
            country=o["country"].upper(),
            lat=o["lat"],
            lon=o["lon"],
            prices=o["price"] or [],
            namespace=o["namespace"],
            image=o["image"],
            tolerations=o["toleration"] or [],
            service_account=o["service_account"],
            poll_seconds=o["poll_seconds"],
        )
        run(config, o["kubeconfig"], o["in_cluster"])
    except KubeSetupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (AgentStopped, BrokerError) as exc:
        if o["debug"]:
            raise
        typer.echo(f"error: {agent_error(exc)} (--debug shows the traceback)", err=True)
        raise typer.Exit(1) from None
