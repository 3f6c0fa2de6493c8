"""What every vendor adapter implements, and what discovery returns.

An adapter looks at one kind of hardware on the provider's machine (or, for
the TPU fleet, in the provider's cloud project) and says what is there: each
accelerator's catalog model, memory, health and utilisation, and whether it
may be offered. It never touches the broker's database or HTTP API; the agent
turns what adapters find into offers.

Adapters are synchronous and may block (subprocesses, HTTP); ``discover_all``
in ``adapters.registry`` runs them off the event loop with a timeout each, so
one failing or hanging tool never stops the others.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable


class AdapterError(Exception):
    """Discovery failed: the tool is missing, timed out, or said something we cannot read."""


@dataclass(frozen=True, slots=True)
class Location:
    """Where a device is, when it is not where the agent says the node is (edge boards)."""

    lat: float
    lon: float
    country: str
    region: str | None = None


@dataclass(frozen=True, slots=True)
class Device:
    """One accelerator as the vendor's tool reports it.

    ``model`` is a hardware-catalog key (``adapters.catalog``), or None when the
    device is not in the catalog (it is then listed but never offered).
    ``offerable`` is False for devices the market must not sell, with the reason
    in ``reason``: unhealthy, busy with someone else's work, or unknown to the
    catalog. Figures left None come from the catalog.
    """

    id: str  # stable per machine: index, UUID, node name
    name: str  # as the tool spells it
    model: str | None
    platform: str  # the JAX/XLA backend: cuda, rocm, tpu or cpu
    memory_gib: float | None = None
    healthy: bool = True
    utilization: float | None = None  # 0..1, when the tool reports it
    offerable: bool = True
    reason: str | None = None
    # Overrides of the catalog's peak figures (the CPU adapter's calibration).
    tflops_fp32: float | None = None
    tflops_bf16: float | None = None
    mem_bw_gbps: float | None = None
    count: int = 1  # accelerators this entry stands for (a TPU node has several chips)
    location: Location | None = None
    power_w: float | None = None
    extra: dict[str, str] = field(default_factory=dict)
    # Set only by the emulated adapter (demos): the backend this device's jobs
    # really run on, such as "cpu" for an emulated H100.
    emulated_on: str | None = None
    # A GPU in MIG mode: its instances, each as ("PROFILE@START", "MIG-..." UUID, or ""
    # when the listing gave none); None: not partitioned. Such a GPU is sold as MIG
    # instances, one offer per GPU (``id`` names it).
    mig: tuple[tuple[str, str], ...] | None = None


@runtime_checkable
class Adapter(Protocol):
    """One vendor's discovery. Implementations register with ``adapters.registry``."""

    name: ClassVar[str]  # the --adapter name: nvidia, amd, tpu, edge, cpu
    vendor: ClassVar[str]  # the catalog's vendor
    platform: ClassVar[str]  # the JAX platform its devices run
    # What this adapter cannot do, said up front rather than found by crashing.
    limits: ClassVar[tuple[str, ...]]

    def present(self) -> bool:
        """Whether this kind of hardware may be here (its tool or file exists); cheap."""
        ...

    def discover(self) -> Sequence[Device]:
        """The devices, offerable or not. Raises AdapterError when discovery fails."""
        ...


def run_tool(argv: Sequence[str], timeout: float = 10.0) -> str:
    """Run a vendor tool and return its stdout; AdapterError if it fails or hangs."""
    try:
        done = subprocess.run(  # noqa: S603 (argv is fixed by the adapter, no shell)
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise AdapterError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise AdapterError(f"{argv[0]} did not answer within {timeout:g} s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise AdapterError(
            f"{argv[0]} exited with {done.returncode}: {detail[-1] if detail else 'no output'}"
        )
    return done.stdout
