"""``broker serve``'s processes, started and stopped in order.

The web server (uvicorn and its workers), with several workers the relay of
services' requests (one process, which holds every replica's connection), the
scheduler process (clearing rounds,
sweeps and billing: ``broker.periodic``) and the demo (with
its agents) each run in a process group of their own, so a Ctrl-C in the terminal
reaches only ``broker serve`` (and ``make``), never them directly. On SIGINT or
SIGTERM ``broker serve`` stops them in the order that loses nothing: the demo
first, whose agents sign off while the server still answers; then the web server;
then the scheduler process, which finishes a round when it can. Whatever is still
running when its share of ``STOP_SECONDS`` is up is killed with its whole group,
so nothing outlives ``broker serve``. Each child also dies with its parent
(Linux's parent-death signal) should ``broker serve`` itself be killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("broker.serve")

STOP_SECONDS = 4.5  # within the 5 s a person waits for Ctrl-C
_DEMO_SHARE = 3.4  # of which the demo (its agents signing off) may take this much
_HTTP_SHARE = 0.7  # then the web server


@dataclass(frozen=True)
class Plan:
    host: str
    port: int
    workers: int
    demo_url: str | None  # the URL the demo reaches the server at; None: no demo
    # With several workers, the relay of services' requests runs in a process of its own
    # on this port (broker.services.relay); None: the one worker relays.
    relay_port: int | None = None


def free_port(host: str) -> int:
    """A port nothing listens on at ``host`` now (the relay's, unless one is set)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux for ``sig`` when this process's parent exits (elsewhere: nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(sig))


def _die_at_once_with_parent() -> None:
    die_with_parent(signal.SIGKILL)


def _http(host: str, port: int, workers: int) -> None:
    import uvicorn

    from broker.config import get_settings
    from broker.observability import configure_logging

    configure_logging(get_settings().log_format)
    uvicorn.run(
        "broker.app:create_served_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        log_config=None,
        access_log=False,  # the broker's own access line has the request id
        # Agents' long polls would otherwise hold a stop up for their whole wait.
        timeout_graceful_shutdown=1,
    )


def _scheduler() -> None:
    from broker import periodic
    from broker.config import get_settings
    from broker.observability import configure_logging

    configure_logging(get_settings().log_format)
    periodic.main()


def _start(role: str, *args: str) -> subprocess.Popen[bytes]:
    # The web server dies at once if this process is killed outright: a new
    # ``broker serve`` on the same port must not find the old one answering (its
    # workers die with it, see ``broker.app.create_served_app``). A normal stop
    # signals it first and waits, so this changes nothing then.
    at_once = role == "http"
    return _start_module("broker.supervise", role, *args, at_once=at_once)


def _start_module(module: str, *args: str, at_once: bool = False) -> subprocess.Popen[bytes]:
    """``python -m module args`` in a process group of its own, dying with this one
    (SIGTERM, or SIGKILL ``at_once``)."""
    return subprocess.Popen(  # noqa: S603 - our own modules
        [sys.executable, "-m", module, *args],
        process_group=0,
        # Only this thread runs here yet.
        preexec_fn=_die_at_once_with_parent if at_once else die_with_parent,
    )


def _stop(process: subprocess.Popen[bytes], seconds: float, signal_first: bool = True) -> None:
    """SIGTERM ``process`` (unless already sent), wait up to ``seconds``, then kill its
    whole group: anything it started and left behind goes with it."""
    if signal_first and process.poll() is None:
        process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=seconds)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def main(argv: list[str]) -> None:
    """The body of one of ``broker serve``'s processes: ``http HOST PORT WORKERS``,
    ``relay HOST PORT`` (one worker that holds the replicas' connections) or
    ``scheduler`` (every periodic task: ``broker.periodic``)."""
    role, *args = argv
    if role == "http":
        _http(args[0], int(args[1]), int(args[2]))
    elif role == "relay":
        os.environ["BROKER_RELAY_URL"] = ""  # this one relays: it proxies to no one
        _http(args[0], int(args[1]), 1)
    elif role == "scheduler":
        _scheduler()
    else:
        raise SystemExit(f"unknown role {role!r}")


def run(plan: Plan) -> int:
    """Start the processes ``plan`` asks for and wait for a signal; then stop them in
    order. Returns the exit status: 0 after a signal, 1 when the web server ended by
    itself (it could not bind its port, say)."""
    stopping = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stopping.set())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    relay = None
    if plan.relay_port is not None:
        # Requests to services reach a web worker, which passes them to the relay
        # process; replicas' agents connect to the relay directly.
        local = "127.0.0.1" if plan.host in ("0.0.0.0", "::") else plan.host  # noqa: S104
        os.environ["BROKER_RELAY_URL"] = f"http://{local}:{plan.relay_port}"
        os.environ.setdefault("BROKER_RELAY_PUBLIC_URL", f"ws://{local}:{plan.relay_port}")
        os.environ.setdefault("BROKER_RELAY_SECRET", secrets.token_hex(32))
        relay = _start("relay", plan.host, str(plan.relay_port))
        log.info("services' relay on port %d", plan.relay_port)
    http = _start("http", plan.host, str(plan.port), str(plan.workers))
    # Clearing, sweeps and billing: each once per database at a time, whatever the
    # number of replicas (broker.scheduler), so every replica runs one of these.
    scheduler = _start("scheduler")
    demo = None
    if plan.demo_url is not None:
        demo = _start_module("broker.demo", "--url", plan.demo_url)
    code = 0
    try:
        while not stopping.wait(0.25):
            if http.poll() is not None:
                log.error("the web server stopped by itself (exit status %s)", http.returncode)
                code = 1
                break
            if relay is not None and relay.poll() is not None:
                log.error("the relay stopped by itself (exit status %s)", relay.returncode)
                code = 1
                break
    finally:
        started = time.monotonic()
        for process in (demo, scheduler):  # the scheduler finishes its round if it can
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        if demo is not None:
            _stop(demo, _DEMO_SHARE, signal_first=False)
        _stop(http, max(0.1, _DEMO_SHARE + _HTTP_SHARE - (time.monotonic() - started)))
        if relay is not None:
            _stop(relay, max(0.1, _DEMO_SHARE + _HTTP_SHARE - (time.monotonic() - started)))
        _stop(scheduler, max(0.1, STOP_SECONDS - (time.monotonic() - started)), False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stopped in %.1f s", time.monotonic() - started)
    return code


if __name__ == "__main__":
    main(sys.argv[1:])
