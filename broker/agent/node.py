"""One node's agent: discover, register, publish offers, beat, pick up work, run it.

The agent talks to the broker over HTTP only (the broker never reaches into
the provider's network). Three kinds of thread share the work:

- the main loop long-polls the broker for allocations on this node and starts a
  runner thread for each, while the node has free accelerators for it;
- a heartbeat thread keeps the node online, reports the usage of every running
  allocation, re-publishes the offers when the broker had declared the node
  lost, and re-runs discovery now and then so offers follow the hardware;
- runner threads run one allocation each through ``run_allocation``, each in a
  sandboxed child process of its own (``broker.sandbox``): a program that
  crashes, loops or eats memory ends its own run, never the agent or the others.

An allocation is run at most once per agent. A restarted agent registers the
node again, and the broker hands the earlier agent's jobs back to the market
first, so no allocation is ever run twice. On the way out (``stop`` set), the
agent stops its runs (their children are killed) and signs the node off: the jobs go back to
the market and resume from their last checkpoint elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import httpx

from adapters import catalog, power, registry
from adapters.base import Device
from broker.agent.energy import RunEnergy
from broker.agent.placement import mig_device, place
from broker.agent.probe import Overheads, measure_startup
from broker.agent.serving import serve_allocation
from broker.portable import _xla
from broker.sandbox import Placement, Sandbox, SandboxConfig
from broker.sdk.http import BrokerError, BrokerUnavailable
from broker.sdk.provider import (
    FinishUnreported,
    ProviderClient,
    RunHandle,
    held_accelerators,
    run_allocation,
)

log = logging.getLogger(__name__)

VERSION = "0.1.0"
ANY_MODEL = "*"
# Backends whose runs the agent can hold to a share: the CPU (cores and memory), GPUs
# (one device, a memory fraction). A TPU's chips are sold whole.
SHAREABLE = ("cpu", "cuda", "rocm")


def agent_error(exc: Exception) -> str:
    """Why the agent could not start or go on, in one line a provider can act on."""
    if isinstance(exc, BrokerError) and exc.status == 401:
        return (
            f"the broker refused the API key: {exc.message}; check BROKER_API_KEY or the key file"
        )
    if isinstance(exc, BrokerError) and exc.status == 403:
        return f"the broker refused this account: {exc.message} (is it a provider account?)"
    return str(exc)


def _offer_text(o: dict[str, Any]) -> str:
    """An offer as the agent's log says it: "1 x cpu in 2 shares at $0.10/h"."""
    what = f"{o['count']} x {o['accelerator']}"
    if o.get("kind") == "shared":
        what += f" in {o['shares']} shares each"
    elif o.get("kind") == "mig":
        what += f" (MIG: {', '.join(o['mig_instances']) or 'nothing cut'})"
    return f"{what} at ${o['price_per_hour']}/h"


class AgentStopped(Exception):
    """The agent cannot go on: its node key was revoked, or nothing can be offered."""


def parse_prices(items: list[str]) -> dict[str, Decimal]:
    """``MODEL=USD_PER_HOUR`` pairs (``*`` for any model) into catalog keys and prices."""
    prices: dict[str, Decimal] = {}
    for item in items:
        model, sep, usd = item.partition("=")
        try:
            price = Decimal(usd.strip())
        except InvalidOperation:
            price = Decimal(-1)
        if not sep or not model.strip() or not price.is_finite() or price < 0:
            raise ValueError(f"--price {item!r}: write MODEL=USD_PER_HOUR, e.g. h100-sxm=2.50")
        spec = catalog.lookup(model)
        key = ANY_MODEL if model.strip() == ANY_MODEL else (spec.key if spec else model.strip())
        prices[key] = price
    return prices


@dataclass
class AgentConfig:
    broker: str
    api_key: str  # the provider's key; the agent swaps it for a node key on registering
    name: str
    region: str
    country: str
    lat: float
    lon: float
    prices: dict[str, Decimal]  # catalog key (or "*") -> USD per accelerator-hour
    adapter: str = "auto"
    options: registry.Options = field(default_factory=registry.Options)
    discover_seconds: float = 60.0
    poll_seconds: float = 5.0
    stop_seconds: float = 30.0  # how long runs may take to stop when the agent exits
    cache_dir: Path | None = None
    # The backend jobs run on here; None: JAX's default backend in this process.
    platform: str | None = None
    # How runs are confined (each in a child process of its own, with limits).
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    # Measure a run's start-up with a tiny program after signing on, and state it with
    # the offers (broker.agent.probe).
    measure_startup: bool = True
    # Sell each accelerator (a CPU slot) as this many time-sliced shares (None: whole).
    shares: int | None = None
    transport: httpx.BaseTransport | None = None  # tests


@dataclass
class _Run:
    handle: RunHandle
    thread: threading.Thread
    energy: RunEnergy | None = None
    cpus: tuple[int, ...] = ()  # the cores a run on a share of the CPU holds


class NodeAgent:
    """The agent of one node. ``run`` blocks until ``stop`` is set."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.adapters = registry.detect(config.adapter, config.options)
        self.node_id: str | None = None
        self.client: ProviderClient | None = None
        self.capacity = 0
        self.heartbeat_seconds = 15.0
        self._devices: list[Device] = []
        self._offers: list[dict[str, Any]] = []
        self._runs: dict[str, _Run] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._unpriced: set[str] = set()
        self._remote: set[str] = set()
        # Runs whose end could not be reported: the finish to send once the broker answers.
        self._unreported: dict[str, dict[str, Any]] = {}
        self._sandbox: Sandbox | None = None
        self.overheads: Overheads | None = None  # measured (broker.agent.probe)
        self._stopping = threading.Event()  # set by shutdown: the probe gives up quietly
        # How to read the hardware's power for runs' measured energy (None: it cannot be).
        self.power_reader = next(
            (r for a in self.adapters if (r := power.reader_for(a)) is not None), None
        )

    @property
    def sandbox(self) -> Sandbox:
        """Where runs go: started with the first run (it keeps a spare child warm)."""
        with self._lock:
            if self._sandbox is None:
                self._sandbox = Sandbox(self.config.sandbox, self.config.cache_dir)
            return self._sandbox

    # -- discovery and offers -------------------------------------------------

    def discover(self) -> list[Device]:
        # The per-call timeout bounds each tool; an adapter may call a few (AMD falls
        # back from amd-smi to rocm-smi), so the whole discovery gets several.
        found = registry.discover(self.adapters, 4 * self.config.options.timeout)
        devices: list[Device] = []
        for discovery in found:
            if discovery.error:
                log.warning("adapter %s: %s", discovery.adapter, discovery.error)
            devices.extend(discovery.devices)
        return devices

    def offers(self, devices: list[Device]) -> list[dict[str, Any]]:
        """What to publish: each offerable model at the provider's price, for devices
        this agent can run jobs on (its own backend). Others, such as a TPU fleet
        listed through the cloud API from elsewhere, are reported, not offered."""
        platform = self.config.platform or _xla.local_platform()
        local = [d for d in devices if platform in (d.platform, d.emulated_on)]
        for d in devices:
            if d.offerable and d not in local and d.id not in self._remote:
                self._remote.add(d.id)
                log.warning(
                    "%s (%s) is listed, not offered: this agent runs jobs on %s; "
                    "run an agent on the machine that has it",
                    d.name,
                    d.platform,
                    platform,
                )
        offers = []
        whole = [d for d in local if d.mig is None]
        for model, count in sorted(registry.offerable_counts(whole).items()):
            first = next(d for d in whole if d.model == model and d.offerable)
            offer = self._offer(model, count, first)
            if offer is None:
                continue
            runs_on = first.emulated_on or first.platform
            if self.config.shares and first.memory_gib and runs_on in SHAREABLE:
                n = self.config.shares
                offer["kind"], offer["shares"] = "shared", n
                # Rounded down: the shares' memory never adds up to more than the device's.
                offer["memory_per_share_gib"] = math.floor(first.memory_gib / n * 1000) / 1000
            offers.append(offer)
        for d in local:
            if d.mig is None or not d.offerable or d.model is None:
                continue
            offer = self._offer(d.model, 1, d)
            if offer is not None:
                offer["kind"] = "mig"
                offer["device"] = mig_device(d)
                offer["mig_instances"] = sorted(spec for spec, _ in d.mig)
                offers.append(offer)
        return offers

    def _offer(self, model: str, count: int, first: Device) -> dict[str, Any] | None:
        """One offer of ``count`` accelerators like ``first`` at the provider's price;
        None when the provider gave no price for the model."""
        price = self.config.prices.get(model, self.config.prices.get(ANY_MODEL))
        if price is None:
            if model not in self._unpriced:
                self._unpriced.add(model)
                log.warning(
                    "no --price for %s; its %d accelerator(s) are not offered", model, count
                )
            return None
        offer: dict[str, Any] = {
            "accelerator": model,
            "count": count,
            "price_per_hour": str(price),
        }
        for name in ("memory_gib", "tflops_fp32", "tflops_bf16", "mem_bw_gbps"):
            value = getattr(first, name)
            if value is not None and value > 0:
                offer[name] = value
        if first.emulated_on is not None:
            offer["emulated"] = True
        if self.overheads is not None:
            offer["startup_seconds"] = round(self.overheads.startup_seconds, 3)
            offer["transfer_s_per_gb"] = round(self.overheads.transfer_s_per_gb, 3)
            offer["compile_s_per_kb"] = round(self.overheads.compile_s_per_kb, 4)
        return offer

    @staticmethod
    def device_reports(devices: list[Device]) -> list[dict[str, Any]]:
        return [
            {
                "id": d.id[:64],
                "name": d.name[:200],
                "model": d.model,
                "platform": d.platform,
                "count": d.count,
                "memory_gib": d.memory_gib,
                "healthy": d.healthy,
                "utilization": d.utilization,
                "offerable": d.offerable,
                "reason": (d.reason or None) and d.reason[:200],
            }
            for d in devices[:1024]
        ]

    # -- the broker -----------------------------------------------------------

    def register(self) -> None:
        """Sign the node on (with the provider's key) and publish its offers."""
        self._devices = self.discover()
        config = self.config
        with ProviderClient(config.broker, config.api_key, transport=config.transport) as provider:
            answer = provider.register(
                {
                    "name": config.name,
                    "region": config.region,
                    "country": config.country,
                    "lat": config.lat,
                    "lon": config.lon,
                    "adapters": [a.name for a in self.adapters],
                    "devices": self.device_reports(self._devices),
                    "agent_version": VERSION,
                }
            )
        self.node_id = answer["node"]["id"]
        self.heartbeat_seconds = float(answer["heartbeat_seconds"])
        # Reports are retried for a node timeout: a broker (or its database) that comes
        # back within it finds the runs still going, not abandoned.
        self.client = ProviderClient(
            config.broker,
            answer["api_key"],
            retry_seconds=float(answer.get("timeout_seconds", 60.0)),
            transport=config.transport,
        )
        self.publish(self.offers(self._devices))
        self.sandbox  # noqa: B018  (its spare child starts importing JAX now, not at the first run)
        if config.measure_startup and self.overheads is None and self._offers:
            threading.Thread(target=self._measure_startup, name="probe", daemon=True).start()
        log.info(
            "node %s (%s) registered; offering %s",
            config.name,
            self.node_id,
            ", ".join(_offer_text(o) for o in self._offers) or "nothing",
        )

    def _measure_startup(self) -> None:
        """Measure a run's start-up here, then publish the offers again with it."""
        client, node = self.client, self.node_id
        assert client is not None
        assert node is not None
        platform = self.config.platform or _xla.local_platform()
        try:
            measured = measure_startup(self.sandbox, platform, lambda: client.heartbeat(node, {}))
        except Exception as e:  # a thread of its own: say why, never crash
            if not self._stopping.is_set():
                log.warning("could not measure a run's start-up on this machine: %s", e)
            return
        if self._stopping.is_set():
            return
        self.overheads = measured
        log.info(
            "a run's start-up on this machine: %.3f s, %.3f s per KB of program and %.2f s "
            "per GB of data (stated with the offers)",
            measured.startup_seconds,
            measured.compile_s_per_kb,
            measured.transfer_s_per_gb,
        )
        with contextlib.suppress(BrokerError, RuntimeError):  # the next rediscovery
            self.publish(self.offers(self._devices))  # publishes them anyway

    def publish(self, offers: list[dict[str, Any]]) -> None:
        assert self.client is not None
        assert self.node_id is not None
        for listed in self.client.publish(self.node_id, offers):
            if listed.get("status") == "suspended":
                log.error(
                    "offer %s (%s): %s",
                    listed["id"],
                    listed["accelerator"],
                    listed.get("suspended_reason"),
                )
        with self._lock:
            self._offers = offers
            self.capacity = sum(int(o["count"]) for o in offers)

    def beat(self) -> None:
        """One heartbeat: usage of running allocations; re-publish if the node was lost."""
        assert self.client is not None
        assert self.node_id is not None
        with self._lock:
            runs = dict(self._runs)
        usage = {a: r.handle.accelerator_seconds() for a, r in runs.items() if r.handle.started}
        answer = self.client.heartbeat(self.node_id, usage)
        for allocation in answer["ended"]:
            if allocation in runs:
                log.info("the broker ended allocation %s; stopping it", allocation)
                runs[allocation].handle.stop.set()
        if answer["resync"]:
            log.warning(
                "the broker had declared node %s lost; publishing offers again", self.config.name
            )
            self.publish(self._offers)
        self.hand_back_unreported()

    def hand_back_unreported(self) -> None:
        """Send the ends of runs that could not reach the broker: their finish (a result
        is not lost to an outage), or, for runs cut off, a failure to retry elsewhere."""
        assert self.client is not None
        with self._lock:
            pending = dict(self._unreported)
        for allocation, report in pending.items():
            try:
                self.client.finish(allocation, **report)
            except BrokerError as e:
                if e.status not in (404, 409):  # 404/409: it ended meanwhile anyway
                    raise
            with self._lock:
                self._unreported.pop(allocation, None)
            log.info(
                "allocation %s: its end (%s) reached the broker", allocation, report["outcome"]
            )

    def rediscover(self) -> None:
        devices = self.discover()
        offers = self.offers(devices)
        if offers != self._offers or devices != self._devices:
            assert self.client is not None
            assert self.node_id is not None
            self._devices = devices
            self.client.heartbeat(self.node_id, {}, self.device_reports(devices))
            if offers != self._offers:
                log.info("capacity changed; publishing %d offer(s)", len(offers))
                self.publish(offers)

    # -- running work ---------------------------------------------------------

    def take(self, orders: list[dict[str, Any]]) -> int:
        """Start a runner thread for each new allocation that fits; returns how many."""
        started = 0
        for order in orders:
            allocation = order["allocation_id"]
            with self._lock:
                if allocation in self._seen:
                    continue
                held = held_accelerators(order)
                busy = sum(r.handle.accelerators for r in self._runs.values())
                if busy + held > max(self.capacity, 1) + 1e-9:
                    continue  # the market matched more than is free now; take it later
                self._seen.add(allocation)
                placement = self.placement(order)
                handle = RunHandle(allocation, held)
                energy = None
                if (reader := self.power_reader) is not None:
                    energy = RunEnergy(reader, max(1, math.ceil(held)))
                    handle.energy = energy.kwh
                    if self._runs:  # readings are the node's: runs side by side share them
                        energy.shared = True
                        for other in self._runs.values():
                            if other.energy is not None:
                                other.energy.shared = True
                thread = threading.Thread(
                    target=self._run,
                    args=(order, handle, placement),
                    name=f"run-{allocation}",
                    daemon=True,
                )
                cpus = placement.cpus or () if isinstance(placement, Placement) else ()
                self._runs[allocation] = _Run(handle, thread, energy, cpus)
            if energy is not None:
                energy.start()
            thread.start()
            started += 1
        return started

    def placement(self, order: dict[str, Any]) -> Placement | str | None:
        """Where on this node a fractional run goes (lock held; ``placement.place``)."""
        busy = [c for r in self._runs.values() for c in r.cpus]
        return place(order, self._devices, busy)

    def _run(
        self, order: dict[str, Any], handle: RunHandle, placement: Placement | str | None = None
    ) -> None:
        assert self.client is not None
        allocation = order["allocation_id"]
        log.info("running job %s (allocation %s)", order["job_id"], allocation)
        try:
            if order.get("service_id"):  # a replica: serve until the allocation ends
                outcome = serve_allocation(
                    self.client,
                    order,
                    handle=handle,
                    sandbox=self.sandbox,
                    placement=placement,
                    emulate=bool(self.config.options.emulate),
                )
            else:
                outcome = run_allocation(
                    self.client,
                    order,
                    cache_dir=self.config.cache_dir,
                    handle=handle,
                    emulate=bool(self.config.options.emulate),
                    sandbox=self.sandbox,
                    placement=placement,
                )
            log.info("allocation %s: %s", allocation, outcome)
        except FinishUnreported as e:
            log.error("allocation %s ended, but the broker did not hear it: %s", allocation, e)
            with self._lock:
                self._unreported[allocation] = e.report  # sent again with the heartbeats
        except BrokerError as e:
            # The broker was unreachable or refused a report. The run is over here;
            # hand the job back (to resume from its last checkpoint) once it answers.
            log.error("allocation %s: could not report to the broker: %s", allocation, e)
            with self._lock:
                if handle.started is None:
                    self._seen.discard(allocation)  # never started here: take it again
                else:
                    self._unreported[allocation] = {
                        "outcome": "failed",
                        "error": f"the agent lost contact with the broker: {e}",
                        "retry": True,
                    }
        except Exception:
            log.exception("allocation %s: the run failed", allocation)
        finally:
            with self._lock:
                self._runs.pop(allocation, None)

    def running(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    # -- the whole life -------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Register, then pick up work until ``stop`` is set; then stop the runs and
        sign off. Waits out an unreachable broker with backoff."""
        self._retrying(stop, self.register)
        if stop.is_set():
            return
        beats = threading.Thread(
            target=self._beat_forever, args=(stop,), name="heartbeat", daemon=True
        )
        beats.start()
        delay = 1.0
        try:
            while not stop.is_set():
                assert self.client is not None
                try:
                    orders = self.client.work(wait=self.config.poll_seconds)
                    delay = 1.0
                except BrokerError as e:
                    if isinstance(e, BrokerUnavailable) or e.status >= 500:
                        log.warning("broker unavailable (%s); retrying in %.0f s", e, delay)
                        stop.wait(delay)
                        delay = min(delay * 2, 30.0)
                        continue
                    if e.status == 401:
                        raise AgentStopped(
                            f"the broker revoked this node's key ({e}): another agent registered "
                            f"node {self.config.name}"
                        ) from None
                    raise
                if orders and not self.take(orders):
                    stop.wait(1.0)  # nothing new fits yet; don't spin on the same orders
        finally:
            stop.set()
            self.shutdown()
            beats.join(timeout=5)

    def shutdown(self) -> None:
        """Stop the runs between steps, then sign the node off so their jobs resume
        elsewhere from their last checkpoint."""
        self._stopping.set()
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.handle.stop.set()
        deadline = time.monotonic() + self.config.stop_seconds
        for run in runs:
            run.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.client is not None and self.node_id is not None:
            try:
                self.client.sign_off(self.node_id)
                log.info("node %s signed off", self.config.name)
            except BrokerError as e:
                log.warning("could not sign off (%s); the broker will declare the node lost", e)
            self.client.close()
        # After signing off: an idle spare child can take a second or two to exit.
        with self._lock:
            sandbox, self._sandbox = self._sandbox, None
        if sandbox is not None:
            sandbox.close()

    def _beat_forever(self, stop: threading.Event) -> None:
        last_discovery = time.monotonic()
        while not stop.wait(self.heartbeat_seconds):
            try:
                self.beat()
                if time.monotonic() - last_discovery >= self.config.discover_seconds:
                    last_discovery = time.monotonic()
                    self.rediscover()
            except BrokerError as e:
                log.warning("heartbeat failed: %s", e)
            except Exception:
                log.exception("heartbeat failed")

    @staticmethod
    def _retrying(stop: threading.Event, action: Any) -> None:
        delay = 1.0
        while not stop.is_set():
            try:
                action()
                return
            except BrokerUnavailable as e:
                log.warning("broker unreachable (%s); retrying in %.0f s", e, delay)
                stop.wait(delay)
                delay = min(delay * 2, 30.0)
