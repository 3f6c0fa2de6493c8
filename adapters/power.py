"""Power readings: what the hardware says it draws, for the energy a run really used.

Each vendor's tool is read the way its adapter reads the rest:

- NVIDIA: ``nvidia-smi --query-gpu=index,power.draw --format=csv,noheader,nounits``
  (watts per GPU; ``[N/A]`` or ``[Not Supported]`` where the board does not say);
- AMD: ``amd-smi metric --power --json`` (``power.socket_power`` per GPU, in W);
- Jetson: ``tegrastats``' input rail (``adapters.edge.parse_tegrastats``);
- a CPU: Linux's RAPL counters (``/sys/class/powercap/intel-rapl:N/energy_uj``,
  microjoules since boot per package, wrapping at ``max_energy_range_uj``),
  where the agent may read them (often root only).

A reader returns watts per device, or None when nothing can be read: the agent
then reports no measurement and the bill keeps the estimate, labelled so. A
reader never raises for a machine that cannot say; it raises ``AdapterError``
only for output it cannot parse.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adapters.base import AdapterError
from adapters.edge import parse_tegrastats

#: ``nvidia-smi`` arguments of one reading.
NVIDIA_QUERY = ["--query-gpu=index,power.draw", "--format=csv,noheader,nounits"]
RAPL = Path("/sys/class/powercap")


def parse_nvidia_power(text: str) -> dict[int, float | None]:
    """Watts per GPU index from ``NVIDIA_QUERY``'s output; None where not reported."""
    watts: dict[int, float | None] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0].isdigit():
            raise AdapterError(f"nvidia-smi power: unexpected line {line!r}")
        watts[int(parts[0])] = _watts(parts[1])
    return watts


def parse_amd_power(text: str) -> dict[int, float | None]:
    """Watts per GPU from ``amd-smi metric --power --json``; None where ``N/A``."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterError(f"amd-smi metric --power: not JSON ({e})") from None
    if isinstance(entries, dict):  # some versions wrap the list
        entries = entries.get("gpu_data", [entries])
    if not isinstance(entries, list):
        raise AdapterError("amd-smi metric --power: expected a list of GPUs")
    watts: dict[int, float | None] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("gpu"), int):
            raise AdapterError("amd-smi metric --power: an entry without its gpu index")
        power = entry.get("power")
        reading = power.get("socket_power") if isinstance(power, dict) else None
        watts[entry["gpu"]] = _amd_value(reading)
    return watts


def parse_tegrastats_power(line: str) -> float | None:
    """The board's input power (W) from one ``tegrastats`` line, if it reports it."""
    value = parse_tegrastats(line).get("power_w")
    return float(value) if value is not None else None


def _watts(text: str) -> float | None:
    if text.startswith("[") or text in ("N/A", ""):
        return None
    try:
        value = float(text)
    except ValueError:
        raise AdapterError(f"power reading {text!r} is not a number") from None
    return value if value >= 0 else None


def _amd_value(reading: Any) -> float | None:
    if isinstance(reading, dict):
        value, unit = reading.get("value"), str(reading.get("unit", "W"))
        if isinstance(value, int | float) and value >= 0:
            return float(value) / 1000 if unit == "mW" else float(value)
    return None


class RaplCounter:
    """The packages' energy counters under ``root``: joules used since the first
    reading, across wrap-arounds. ``joules()`` is None where they cannot be read."""

    def __init__(self, root: Path = RAPL) -> None:
        self.zones = sorted(
            p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1
        )  # packages; their subzones (core, dram) are counted within them
        self._last: dict[Path, int] = {}
        self._total = 0.0

    def joules(self) -> float | None:
        if not self.zones:
            return None
        for zone in self.zones:
            try:
                now = int((zone / "energy_uj").read_text())
                span = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                return None  # unreadable (not root) or gone
            before = self._last.get(zone)
            if before is not None:
                self._total += ((now - before) % (span + 1)) / 1e6
            self._last[zone] = now
        return self._total


def tool_reader(
    command: list[str], parse: Callable[[str], dict[int, float | None]]
) -> Callable[[], dict[int, float | None] | None]:
    """A reader that runs ``command`` (a second at most) and parses its output; None when
    the tool is missing, fails or says nothing."""

    def read() -> dict[int, float | None] | None:
        try:
            done = subprocess.run(  # noqa: S603 - the vendor's own tool, no shell
                command, capture_output=True, text=True, timeout=1.0, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode:
            return None
        try:
            return parse(done.stdout) or None
        except AdapterError:
            return None

    return read


class EnergyMeter:
    """Integrates what a run's devices draw over the run, sampling every ``every`` s.

    ``watts`` returns watts per device (None: no reading), or ``joules`` a growing
    counter (RAPL). While a run goes, ``sample`` is called now and then (the agent's
    sampling thread); ``kwh`` says what the run used, counting the ``devices``
    busiest devices at each sample (a run's accelerators draw the most), or None
    when readings covered less than ``COVERAGE`` of the run."""

    COVERAGE = 0.8

    def __init__(
        self,
        devices: int,
        *,
        watts: Callable[[], Mapping[int, float | None] | None] | None = None,
        joules: Callable[[], float | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (watts is None) == (joules is None):
            raise ValueError("give watts or joules, one of them")
        self.devices = max(1, devices)
        self._watts, self._joules, self._clock = watts, joules, clock
        self._started = clock()
        self._last: tuple[float, float] | None = None  # (time, watts or joules)
        self._energy_j = 0.0
        self._covered_s = 0.0
        self.sample()

    def sample(self) -> None:
        now = self._clock()
        value = self._read()
        if value is None:
            self._last = None
            return
        if self._last is not None:
            then, before = self._last
            if self._joules is not None:
                self._energy_j += max(0.0, value - before)
            else:
                self._energy_j += (value + before) / 2 * (now - then)  # trapezoid
            self._covered_s += now - then
        self._last = (now, value)

    def _read(self) -> float | None:
        if self._joules is not None:
            return self._joules()
        assert self._watts is not None
        readings = self._watts()
        if not readings:
            return None
        known = sorted((w for w in readings.values() if w is not None), reverse=True)
        if len(known) < self.devices:
            return None
        return sum(known[: self.devices])

    def kwh(self) -> float | None:
        """The run's energy so far (the devices, not the site), in kWh; None when the
        readings do not cover the run."""
        self.sample()
        elapsed = self._clock() - self._started
        if elapsed <= 0 or self._covered_s < self.COVERAGE * elapsed:
            return None
        return self._energy_j / 3.6e6


def reader_for(
    adapter: Any,
) -> dict[str, Callable[[], Any]] | None:
    """How to read the power of ``adapter``'s hardware: ``{"watts": ...}`` or
    ``{"joules": ...}`` for ``EnergyMeter``; None where the agent cannot read it
    (TPUs through a cloud API, emulated devices, a Jetson whose tegrastats streams
    rather than answers once, a CPU without readable RAPL counters)."""
    name = getattr(adapter, "name", "")
    if name == "nvidia":
        return {"watts": tool_reader([adapter.tool, *NVIDIA_QUERY], parse_nvidia_power)}
    if name == "amd" and getattr(adapter, "amd_smi", None):
        command = [adapter.amd_smi, "metric", "--power", "--json"]
        return {"watts": tool_reader(command, parse_amd_power)}
    if name == "cpu":
        counter = RaplCounter()
        if counter.joules() is not None:
            return {"joules": counter.joules}
    return None
