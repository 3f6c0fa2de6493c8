"""Every vendor adapter by name, which of them apply here, and discovery across them.

The agent turns its command-line options into one ``Options``, picks adapters
with ``detect`` ("auto" or a name) and runs ``discover_all``: each adapter's
blocking ``discover`` runs in its own thread under its own time limit, all at
once, and an adapter that fails, hangs or crashes yields a ``Discovery`` with an
error while the others carry on. ``offerable_counts`` turns the devices into the numbers the
agent offers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from adapters.amd import AmdAdapter
from adapters.base import Adapter, AdapterError, Device
from adapters.cpu import CpuAdapter
from adapters.edge import EdgeAdapter
from adapters.emulated import EmulatedAdapter
from adapters.nvidia import NvidiaAdapter
from adapters.tpu import API_BASE, METADATA_URL, TpuAdapter


@dataclass(frozen=True, slots=True)
class Options:
    """Everything the agent's command line can tell the adapters."""

    data_dir: Path | None = None  # where `broker calibrate` saved calibration.json
    cpu_slots: int = 1
    edge_config: Path | None = None
    tpu_project: str | None = None  # set: list the project's TPU fleet through the API
    tpu_zone: str | None = None  # None or "-": every zone
    tpu_token: str | None = None  # OAuth access token for the TPU API
    tpu_api_base: str = API_BASE
    tpu_metadata_url: str = METADATA_URL
    nvidia_smi: str = "nvidia-smi"
    amd_smi: str = "amd-smi"
    rocm_smi: str = "rocm-smi"
    tegrastats: str = "tegrastats"
    timeout: float = 10.0  # per tool call or HTTP request
    # --emulate MODEL=COUNT: catalog models the emulated adapter stands in for (demos).
    emulate: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Registration:
    """An adapter class and how to build it from the options."""

    cls: type[Adapter]
    make: Callable[[Options], Adapter]


_REGISTRY: dict[str, Registration] = {}


def register(cls: type[Adapter], make: Callable[[Options], Adapter]) -> None:
    """Add an adapter under ``cls.name``; a name is registered once."""
    if cls.name in _REGISTRY:
        raise ValueError(f"an adapter named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = Registration(cls, make)


# Order matters: "auto" lists accelerators in this order, and cpu comes last.
register(NvidiaAdapter, lambda o: NvidiaAdapter(tool=o.nvidia_smi, timeout=o.timeout))
register(
    AmdAdapter, lambda o: AmdAdapter(amd_smi=o.amd_smi, rocm_smi=o.rocm_smi, timeout=o.timeout)
)
register(
    TpuAdapter,
    lambda o: TpuAdapter(
        project=o.tpu_project,
        zone=o.tpu_zone,
        token=o.tpu_token,
        api_base=o.tpu_api_base,
        metadata_url=o.tpu_metadata_url,
        timeout=o.timeout,
    ),
)
register(
    EdgeAdapter,
    lambda o: EdgeAdapter(config=o.edge_config, tegrastats=o.tegrastats, timeout=o.timeout),
)
register(EmulatedAdapter, lambda o: EmulatedAdapter(o.emulate))
register(CpuAdapter, lambda o: CpuAdapter(data_dir=o.data_dir, slots=o.cpu_slots))

CPU = "cpu"


def names() -> list[str]:
    """The registered adapter names, accelerators first and cpu last."""
    return list(_REGISTRY)


def create(name: str, options: Options | None = None) -> Adapter:
    """The adapter called ``name``, configured from ``options``."""
    registration = _REGISTRY.get(name)
    if registration is None:
        raise ValueError(f"unknown adapter {name!r}; choose auto or one of {', '.join(names())}")
    return registration.make(options or Options())


def detect(choice: str, options: Options | None = None) -> list[Adapter]:
    """The adapters to use: for "auto" every accelerator adapter whose hardware is
    present, or the CPU alone when none is; for a name, that adapter whether or
    not it looks present (so discovery can say what is missing)."""
    if choice != "auto":
        return [create(choice, options)]
    found = [
        adapter
        for adapter in (create(name, options) for name in names() if name != CPU)
        if adapter.present()
    ]
    return found or [create(CPU, options)]


@dataclass(frozen=True, slots=True)
class Discovery:
    """What one adapter found, or why it found nothing."""

    adapter: str
    platform: str
    devices: tuple[Device, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _in_thread(work: Callable[[], Sequence[Device]]) -> asyncio.Future[Sequence[Device]]:
    """``work()`` in a daemon thread, as a future of this loop.

    Not ``asyncio.to_thread``: its pool is the loop's default executor, which
    ``asyncio.run`` joins on the way out and the interpreter joins at exit, so an
    adapter stuck past its timeout would hang the agent with it. A daemon thread
    is abandoned instead (the tools' own timeouts end it soon after).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Sequence[Device]] = loop.create_future()

    def settle(result: Sequence[Device] | None, error: Exception | None) -> None:
        if future.done():
            return  # timed out and cancelled meanwhile
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result or [])

    def run() -> None:
        try:
            result, error = work(), None
        except Exception as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed while this adapter was stuck
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="adapter-discovery", daemon=True).start()
    return future


async def _discover_one(adapter: Adapter, timeout: float) -> Discovery:
    try:
        devices = await asyncio.wait_for(_in_thread(adapter.discover), timeout)
    except TimeoutError:
        error = f"{adapter.name} discovery did not finish within {timeout:g} s"
        return Discovery(adapter.name, adapter.platform, error=error)
    except AdapterError as exc:
        return Discovery(adapter.name, adapter.platform, error=str(exc))
    except Exception as exc:  # an adapter's bug must not stop the others
        error = f"{adapter.name} discovery crashed: {type(exc).__name__}: {exc}"
        return Discovery(adapter.name, adapter.platform, error=error)
    return Discovery(adapter.name, adapter.platform, tuple(devices))


async def discover_all(adapters: Sequence[Adapter], timeout: float = 30.0) -> list[Discovery]:
    """Run every adapter's discovery at once, each within ``timeout`` seconds, in order."""
    return list(await asyncio.gather(*(_discover_one(a, timeout) for a in adapters)))


def discover(adapters: Sequence[Adapter], timeout: float = 30.0) -> list[Discovery]:
    """``discover_all`` for synchronous callers (the CLI); not from a running event loop."""
    return asyncio.run(discover_all(adapters, timeout))


def offerable_counts(devices: Iterable[Device]) -> dict[str, int]:
    """Offerable accelerators per catalog model key (a TPU node counts its chips)."""
    counts: Counter[str] = Counter()
    for device in devices:
        if device.offerable and device.model is not None:
            counts[device.model] += device.count
    return dict(counts)


@dataclass(frozen=True, slots=True)
class SummaryRow:
    """One line of the agent's discovery table."""

    adapter: str
    device: str
    name: str
    model: str
    count: int
    memory_gib: str
    utilization: str
    status: str = "offered"


def summary(discoveries: Iterable[Discovery]) -> list[SummaryRow]:
    """A row per device, and one per failed adapter, for people to read."""
    rows = []
    for found in discoveries:
        if found.error is not None:
            rows.append(SummaryRow(found.adapter, "-", "-", "-", 0, "-", "-", found.error))
        for d in found.devices:
            rows.append(
                SummaryRow(
                    adapter=found.adapter,
                    device=d.id,
                    name=d.name,
                    model=d.model or "-",
                    count=d.count,
                    memory_gib=f"{d.memory_gib:.1f}" if d.memory_gib is not None else "-",
                    utilization=f"{d.utilization:.0%}" if d.utilization is not None else "-",
                    status="offered" if d.offerable else f"not offered: {d.reason}",
                )
            )
    return rows
