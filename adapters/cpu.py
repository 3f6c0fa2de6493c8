"""This machine's CPU, offered so that a broker with no accelerator can still run jobs.

Its speed is what ``broker calibrate`` measured here and saved as
``DATA_DIR/calibration.json`` (keys ``cpu``, ``cores``, ``memory_gib``,
``tflops_fp32``, ``tflops_bf16``, ``mem_bw_gbps``, ...); without that file the
catalog's ``cpu`` row stands in. The file is read as plain JSON: adapters know
nothing of the broker package that wrote it.

The host is cut into ``slots`` equal shares, one job each: a slot gets 1/slots of
the memory (read now from ``/proc/meminfo``), of the measured FLOP/s and of the
bandwidth, since concurrent jobs split all three.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from adapters import catalog
from adapters.base import AdapterError, Device

CALIBRATION_FILE = "calibration.json"
_FIGURES = ("tflops_fp32", "tflops_bf16", "mem_bw_gbps")


def parse_calibration(text: str, source: str = CALIBRATION_FILE) -> dict[str, Any]:
    """The calibration figures, checked: each peak a positive number."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterError(
            f"{source} is not valid JSON ({exc}); run `broker calibrate` again"
        ) from None
    if not isinstance(data, dict):
        raise AdapterError(f"{source} is not a calibration; run `broker calibrate` again")
    for key in _FIGURES:
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise AdapterError(
                f"{source}: {key} must be a positive number; run `broker calibrate` again"
            )
    return data


def memory_gib(meminfo: str) -> float | None:
    """MemTotal from ``/proc/meminfo`` text, in GiB."""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20  # kB
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_device(calibration: dict[str, Any] | None, memory: float | None, slots: int) -> Device:
    """The host as ``slots`` equal CPU slots, with calibrated or catalog figures."""
    if slots < 1:
        raise AdapterError("cpu slots must be at least 1")
    spec = catalog.lookup("cpu")
    assert spec is not None, "the catalog has a cpu row"
    peaks = (
        {key: float(calibration[key]) for key in _FIGURES}
        if calibration
        else {key: float(getattr(spec, key)) for key in _FIGURES}
    )
    if memory is None and os.name == "posix":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    extra = {"slots": str(slots), "calibrated": "yes" if calibration else "no"}
    if calibration:
        extra["cores"] = str(calibration.get("cores", ""))
        extra["measured_at"] = str(calibration.get("measured_at", ""))
    name = str(calibration.get("cpu")) if calibration and calibration.get("cpu") else _cpu_name()
    return Device(
        id="host",
        name=name,
        model=spec.key,
        platform="cpu",
        memory_gib=memory / slots if memory is not None else None,
        utilization=None,
        tflops_fp32=peaks["tflops_fp32"] / slots,
        tflops_bf16=peaks["tflops_bf16"] / slots,
        mem_bw_gbps=peaks["mem_bw_gbps"] / slots,
        count=slots,
        extra={k: v for k, v in extra.items() if v},
    )


class CpuAdapter:
    """The local CPU as ``slots`` job slots: the embedded default's accelerator."""

    name: ClassVar[str] = "cpu"
    vendor: ClassVar[str] = "cpu"
    platform: ClassVar[str] = "cpu"
    limits: ClassVar[tuple[str, ...]] = (
        "figures are the calibration's (or the catalog's): run `broker calibrate` on this host",
        "slots share the host evenly; the adapter does not measure current load",
    )

    def __init__(
        self,
        data_dir: Path | None = None,
        slots: int = 1,
        meminfo: Path = Path("/proc/meminfo"),
    ) -> None:
        self.data_dir = data_dir
        self.slots = slots
        self.meminfo = meminfo

    def present(self) -> bool:
        """Always: every machine has a CPU."""
        return True

    def discover(self) -> Sequence[Device]:
        """The host, with the saved calibration if there is one."""
        calibration = None
        if self.data_dir is not None:
            path = self.data_dir / CALIBRATION_FILE
            try:
                calibration = parse_calibration(path.read_text(), str(path))
            except FileNotFoundError:
                calibration = None  # never calibrated: the catalog row stands in
            except OSError as exc:
                raise AdapterError(f"cannot read {path}: {exc}") from None
        try:
            memory = memory_gib(self.meminfo.read_text())
        except OSError:
            memory = None  # not Linux: os.sysconf below
        return [cpu_device(calibration, memory, self.slots)]
