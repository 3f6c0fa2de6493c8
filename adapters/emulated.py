"""Emulated capacity, for demos: catalog models this machine stands in for.

A broker demo on a laptop has no H100, MI300X or TPU, yet the market is only
interesting with them. This adapter lists the models it is told to
(``--emulate h100-sxm=8``) with the catalog's figures, so the market prices and
estimates them as the real thing, and marks every device ``emulated_on="cpu"``:
the agent offers them as emulated (the broker accepts that only when started
with ``BROKER_ALLOW_EMULATION=1``, and labels the offers), and runs their jobs
on this machine's CPU from the artifact's cpu version, saying so in its log.

It is never chosen by ``--adapter auto``: emulation is asked for by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from adapters import catalog
from adapters.base import AdapterError, Device


def parse_emulate(items: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """``["h100-sxm=8", "tpu-v5e=4"]`` -> ``(("h100-sxm", 8), ("tpu-v5e", 4))``, with
    each model resolved through the catalog."""
    parsed = []
    for item in items:
        model, sep, count = item.partition("=")
        spec = catalog.lookup(model.strip())
        if spec is None:
            raise AdapterError(f"--emulate {item!r}: {model.strip()!r} is not in the catalog")
        if not sep or not count.strip().isdigit() or not 1 <= int(count) <= 4096:
            raise AdapterError(f"--emulate {item!r}: give MODEL=COUNT, COUNT from 1 to 4096")
        parsed.append((spec.key, int(count)))
    return tuple(parsed)


class EmulatedAdapter:
    """Catalog models emulated on this machine's CPU (demos only)."""

    name: ClassVar[str] = "emulated"
    vendor: ClassVar[str] = "emulated"
    platform: ClassVar[str] = "cpu"  # where the jobs really run
    limits: ClassVar[tuple[str, ...]] = (
        "not real hardware: jobs run on this machine's CPU, at the CPU's speed",
        "figures are the catalog's, so the market prices and schedules the real model",
        "never picked by --adapter auto; ask for it by name, with --emulate MODEL=COUNT",
    )

    def __init__(self, models: Sequence[tuple[str, int]] = ()) -> None:
        self.models = tuple(models)

    def present(self) -> bool:
        return False  # only by name

    def discover(self) -> Sequence[Device]:
        if not self.models:
            raise AdapterError("nothing to emulate: give --emulate MODEL=COUNT")
        devices = []
        for key, count in self.models:
            spec = catalog.lookup(key)
            if spec is None:
                raise AdapterError(f"{key!r} is not in the catalog")
            devices.append(
                Device(
                    id=f"emulated-{spec.key}",
                    name=f"{spec.name} (emulated on this machine's CPU)",
                    model=spec.key,
                    platform=spec.platform,
                    memory_gib=spec.memory_gib,
                    count=count,
                    emulated_on="cpu",
                    extra={"emulated": "yes"},
                )
            )
        return devices
