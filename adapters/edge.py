"""Edge devices: the NVIDIA Jetson board this agent runs on, and devices a config file lists.

A Jetson names itself in ``/proc/device-tree/model`` ("NVIDIA Jetson AGX Orin
Developer Kit", "NVIDIA Orin Nano Developer Kit"); ``tegrastats`` prints one line
a second with RAM and the GPU's load (``GR3D_FREQ 0%``). The model string does not
tell a 32 GB AGX Orin from a 64 GB one, so the RAM decides: the catalog's rows are
the 64 GB AGX Orin and the 8 GB Orin Nano, and smaller variants are not offered.

The config file (JSON) gives where the devices are and their power budget::

    {
      "board": {"location": {"lat": 52.52, "lon": 13.40, "country": "DE"},
                "power_budget_w": 40},
      "devices": [
        {"id": "gate-7", "model": "jetson-orin-nano", "count": 1,
         "location": {"lat": 48.14, "lon": 11.58, "country": "DE", "region": "Munich"},
         "power_budget_w": 15}
      ]
    }

``board`` describes the Jetson running this agent; ``devices`` are other boards the
provider runs jobs on through this agent. A device without a location is listed,
not offered: edge capacity is sold by place.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from adapters import catalog
from adapters.base import AdapterError, Device, Location

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
# Below this share of GR3D (the GPU engine) the board is idle; a desktop alone
# reads a few percent.
BUSY_UTILIZATION = 0.10
# (substring of the model string, catalog key, GiB of RAM below which it is a smaller variant)
_JETSONS = (("agx orin", "jetson-agx-orin", 48.0), ("orin nano", "jetson-orin-nano", 6.0))
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%")
_POWER = re.compile(r"\b(VDD_GPU_SOC|VDD_CPU_CV|VIN_SYS_5V0|VDD_IN) (\d+)mW")


def parse_tegrastats(line: str) -> dict[str, float]:
    """RAM (MiB), GPU load (0..1) and rail power (W) from one ``tegrastats`` line."""
    figures: dict[str, float] = {}
    if ram := _RAM.search(line):
        figures["ram_used_mib"], figures["ram_total_mib"] = float(ram[1]), float(ram[2])
    # JetPack 7 prints "GR3D_FREQ 12%@[1300,1300]", older ones "GR3D_FREQ 0%@1377"
    # or "GR3D_FREQ 0%"; the load is the percentage in all three.
    if gr3d := _GR3D.search(line):
        figures["gpu_load"] = float(gr3d[1]) / 100
    rails = {name: float(mw) / 1000 for name, mw in _POWER.findall(line)}
    if rails:
        # VDD_IN is the whole module where it exists; else the Orin rails add up.
        figures["power_w"] = rails.get("VDD_IN", sum(rails.values()))
    return figures


def jetson_model(model_string: str, ram_gib: float | None) -> str | None:
    """The catalog key of a Jetson from its device-tree model and RAM, or None."""
    text = model_string.replace("\x00", "").lower()
    for needle, key, least_ram in _JETSONS:
        if needle in text:
            return key if ram_gib is not None and ram_gib >= least_ram else None
    return None


def _first_line(argv: Sequence[str], timeout: float) -> str:
    """The first line a never-ending tool prints (tegrastats), then stop it."""
    try:
        proc = subprocess.Popen(  # noqa: S603 (argv is the configured tool, no shell)
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
    except FileNotFoundError:
        raise AdapterError(f"{argv[0]} is not installed") from None
    lines: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    timed_out = reader.is_alive()
    proc.kill()  # it would print a line a second forever
    proc.wait()
    reader.join(1.0)  # the kill ends the read with EOF (bounded: a child may hold the pipe)
    stdout.close()
    if not lines or not lines[0].strip():
        if timed_out:
            raise AdapterError(f"{argv[0]} printed nothing within {timeout:g} s")
        raise AdapterError(f"{argv[0]} exited with {proc.returncode} before printing a line")
    return lines[0].strip()


def _location(raw: Any, where: str) -> Location | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise AdapterError(f"{where}.location must be an object with lat, lon and country")
    lat, lon, country = raw.get("lat"), raw.get("lon"), raw.get("country")
    if not isinstance(lat, int | float) or not -90 <= lat <= 90:
        raise AdapterError(f"{where}.location.lat must be a number from -90 to 90")
    if not isinstance(lon, int | float) or not -180 <= lon <= 180:
        raise AdapterError(f"{where}.location.lon must be a number from -180 to 180")
    if not isinstance(country, str) or len(country) != 2:
        raise AdapterError(f"{where}.location.country must be a two-letter ISO 3166 code")
    region = raw.get("region")
    return Location(float(lat), float(lon), country.upper(), str(region) if region else None)


def _power(raw: dict[str, Any], where: str) -> float | None:
    value = raw.get("power_budget_w")
    if value is None:
        return None
    if not isinstance(value, int | float) or value <= 0:
        raise AdapterError(f"{where}.power_budget_w must be a positive number of watts")
    return float(value)


def parse_config(text: str, source: str = "edge config") -> tuple[dict[str, Any], list[Device]]:
    """The ``board`` section and the listed devices of an edge config file."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise AdapterError(f"{source} must be a JSON object with 'board' and 'devices'")
    board = doc.get("board") or {}
    raw_devices = doc.get("devices") or []
    if not isinstance(board, dict) or not isinstance(raw_devices, list):
        raise AdapterError(f"{source}: 'board' must be an object and 'devices' a list")
    devices = []
    for i, raw in enumerate(raw_devices):
        where = f"{source}: devices[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
            raise AdapterError(f"{where} must be an object with a string 'id'")
        spec = catalog.lookup(str(raw.get("model", "")))
        count = raw.get("count", 1)
        if not isinstance(count, int) or count < 1:
            raise AdapterError(f"{where}.count must be a whole number of at least 1")
        location = _location(raw.get("location"), where)
        reasons = []
        if spec is None:
            reasons.append(f"{raw.get('model')!r} is not in the hardware catalog")
        if location is None:
            reasons.append("no location configured")
        devices.append(
            Device(
                id=raw["id"],
                name=str(raw.get("name") or (spec.name if spec else raw.get("model"))),
                model=spec.key if spec else None,
                platform=spec.platform if spec else str(raw.get("platform", "cuda")),
                count=count,
                offerable=not reasons,
                reason="; ".join(reasons) or None,
                location=location,
                power_w=_power(raw, where),
                extra={"source": "config"},
            )
        )
    return board, devices


def meminfo_mib(text: str) -> float | None:
    """MemTotal from ``/proc/meminfo``, in MiB."""
    match = re.search(r"^MemTotal:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) / 1024 if match else None


def jetson_device(
    model_string: str,
    tegrastats_line: str | None,
    board: dict[str, Any],
    error: str | None = None,
    ram_mib: float | None = None,
) -> Device:
    """This Jetson, from its device-tree model, one tegrastats line (RAM falls back to
    ``ram_mib``, from /proc/meminfo) and the config's board."""
    name = model_string.replace("\x00", "").strip()
    figures = parse_tegrastats(tegrastats_line) if tegrastats_line else {}
    ram_total = figures.get("ram_total_mib", ram_mib)
    ram_gib = ram_total / 1024 if ram_total is not None else None
    model = jetson_model(name, ram_gib)
    location = _location(board.get("location"), "edge config: board")
    load = figures.get("gpu_load")
    reasons = []
    if model is None:
        ram = f"{ram_gib:.0f} GiB" if ram_gib else "RAM unknown"
        reasons.append(f"{name} ({ram}) is not in the hardware catalog")
    if error:
        reasons.append(error)
    if load is not None and load >= BUSY_UTILIZATION:
        reasons.append(f"busy: GR3D at {load:.0%}")
    if location is None:
        reasons.append("no location configured (board.location in the edge config)")
    extra = {"source": "device-tree"}
    if "power_w" in figures:
        extra["power_now_w"] = f"{figures['power_w']:.1f}"
    return Device(
        id="jetson",
        name=name,
        model=model,
        platform="cuda",
        # Unified memory: the GPU shares the board's RAM, all of which a job may use.
        memory_gib=ram_gib,
        utilization=load,
        offerable=not reasons,
        reason="; ".join(reasons) or None,
        location=location,
        power_w=_power(board, "edge config: board"),
        extra=extra,
    )


class EdgeAdapter:
    """The Jetson this agent runs on, plus the edge devices of a config file."""

    name: ClassVar[str] = "edge"
    vendor: ClassVar[str] = "edge"
    platform: ClassVar[str] = "cuda"
    limits: ClassVar[tuple[str, ...]] = (
        "only Jetson boards are discovered; other edge devices must be listed in the config",
        "devices from the config are taken as described: their health is not checked",
        "a device without a location is not offered",
    )

    def __init__(
        self,
        config: Path | None = None,
        tegrastats: str = "tegrastats",
        model_path: Path = DEVICE_TREE_MODEL,
        meminfo: Path = Path("/proc/meminfo"),
        timeout: float = 10.0,
    ) -> None:
        self.config = config
        self.tegrastats = tegrastats
        self.model_path = model_path
        self.meminfo = meminfo
        self.timeout = timeout

    def _model_string(self) -> str | None:
        try:
            text = self.model_path.read_text(errors="replace")
        except OSError:
            return None
        return text if "orin" in text.lower() or "jetson" in text.lower() else None

    def present(self) -> bool:
        """Whether this is a Jetson, or an edge config file is given."""
        return self._model_string() is not None or self.config is not None

    def discover(self) -> Sequence[Device]:
        """The Jetson (if this is one) and the configured devices."""
        board: dict[str, Any] = {}
        devices: list[Device] = []
        if self.config is not None:
            try:
                text = self.config.read_text()
            except OSError as exc:
                raise AdapterError(f"cannot read the edge config {self.config}: {exc}") from None
            board, devices = parse_config(text, str(self.config))
        model_string = self._model_string()
        if model_string is not None:
            line, error = None, None
            try:
                line = _first_line([self.tegrastats, "--interval", "1000"], self.timeout)
            except AdapterError as exc:
                # The board is still listed (not offered); configured devices still count.
                error = f"tegrastats failed: {exc}"
            try:
                ram_mib = meminfo_mib(self.meminfo.read_text())
            except OSError:
                ram_mib = None
            devices.insert(0, jetson_device(model_string, line, board, error, ram_mib))
        return devices
