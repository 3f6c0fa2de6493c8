"""NVIDIA GPUs, as ``nvidia-smi`` reports them.

Two queries, both CSV without header or units: ``--query-gpu`` for the devices
and ``--query-compute-apps`` for the processes that hold a compute context on
them. ``nvidia-smi`` ships with the driver, so no Python binding is needed.

A GPU is listed but not offered when it is not in the hardware catalog, is
unhealthy (uncorrectable ECC errors since boot, pages or rows waiting to be
retired or remapped, a failed remap, or a field the driver could not read), or
is busy with someone else's work (see ``busy_reason``).

A GPU in MIG mode is offered as the instances cut on it (``adapters.mig``):
``nvidia-smi mig -lgi`` says where each sits and ``nvidia-smi -L`` gives the
``MIG-`` UUID a run is started on. The agent does not cut GPUs: one in MIG mode
with nothing cut is listed, not offered. Its busy signs are not used (they are
the whole GPU's, and the agent's own runs on other instances show there too).
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from adapters import catalog, mig
from adapters.base import AdapterError, Device, run_tool

# The order of the columns ``parse_query_gpu`` reads. All exist since driver
# R460 (remapped_rows arrived last); an older driver rejects the query and
# discovery says so.
QUERY_FIELDS = (
    "index",
    "uuid",
    "name",
    "memory.total",
    "memory.used",
    "utilization.gpu",
    "mig.mode.current",
    "ecc.errors.uncorrected.volatile.total",
    "retired_pages.pending",
    "remapped_rows.pending",
    "remapped_rows.failure",
)
APPS_FIELDS = ("gpu_uuid", "pid", "used_memory")

# Busy means someone else's job is on the GPU. A compute process is proof; the
# two thresholds catch work whose processes nvidia-smi cannot see (another
# container's PID namespace). An idle GPU reads 0% and a few MiB; a desktop
# session on a workstation card holds a few percent of memory.
BUSY_UTILIZATION = 0.10
BUSY_MEMORY_FRACTION = 0.05

# What nvidia-smi prints for a field the device does not have: not an error.
_NOT_APPLICABLE = {
    "[N/A]",
    "N/A",
    "[Not Supported]",
    "[Requested functionality has been deprecated]",
}


@dataclass(frozen=True, slots=True)
class _Row:
    values: dict[str, str]

    def text(self, field: str) -> str | None:
        value = self.values[field]
        return None if value in _NOT_APPLICABLE else value

    def number(self, field: str) -> float | None:
        value = self.text(field)
        if value is None or value.startswith("["):
            return None
        try:
            return float(value)
        except ValueError:
            raise AdapterError(f"nvidia-smi printed {value!r} for {field}") from None

    def errors(self) -> list[str]:
        # nvidia-smi prints "[Unknown Error]", "[GPU requires reset]" and the
        # like in brackets where it could not read a field.
        return [
            f"{field} reads {value}"
            for field, value in self.values.items()
            if value.startswith("[") and value not in _NOT_APPLICABLE
        ]


def _split(line: str) -> list[str]:
    return [cell.strip() for cell in line.split(",")]


def parse_compute_apps(text: str) -> Counter[str]:
    """Compute processes per GPU UUID, from ``--query-compute-apps`` CSV."""
    apps: Counter[str] = Counter()
    for line in text.splitlines():
        if line.strip():
            apps[_split(line)[0]] += 1
    return apps


def busy_reason(
    utilization: float | None, memory_used_fraction: float | None, processes: int
) -> str | None:
    """Why a GPU counts as running someone else's work (thresholds above), or None."""
    signs = []
    if processes:
        signs.append(f"{processes} compute processes")
    if utilization is not None and utilization >= BUSY_UTILIZATION:
        signs.append(f"{utilization:.0%} utilisation")
    if memory_used_fraction is not None and memory_used_fraction >= BUSY_MEMORY_FRACTION:
        signs.append(f"{memory_used_fraction:.0%} of memory in use")
    return "busy: " + ", ".join(signs) if signs else None


def _device(row: _Row, processes: Counter[str]) -> Device:
    name = row.values["name"]
    uuid = row.values["uuid"]
    spec = catalog.lookup(name)
    total_mib = row.number("memory.total")
    used_mib = row.number("memory.used")
    util_pct = row.number("utilization.gpu")
    utilization = util_pct / 100 if util_pct is not None else None
    used_fraction = used_mib / total_mib if used_mib is not None and total_mib else None

    problems = row.errors()
    ecc = row.number("ecc.errors.uncorrected.volatile.total")
    if ecc:
        problems.append(f"{ecc:g} uncorrectable ECC errors since boot")
    if row.text("retired_pages.pending") == "Yes":
        problems.append("memory pages are waiting to be retired (reset the GPU)")
    if row.text("remapped_rows.pending") == "Yes":
        problems.append("memory rows are waiting to be remapped (reset the GPU)")
    if row.text("remapped_rows.failure") == "Yes":
        problems.append("a memory row remap failed")

    reasons = []
    if spec is None:
        reasons.append(f"{name} is not in the hardware catalog")
    if problems:
        reasons.append("unhealthy: " + "; ".join(problems))
    in_mig = row.text("mig.mode.current") == "Enabled"
    if in_mig and spec is not None and not mig.profiles(spec.key):
        reasons.append(f"MIG mode is enabled and the catalog has no MIG profiles of {spec.key}")
    busy = None if in_mig else busy_reason(utilization, used_fraction, processes[uuid])
    if busy:
        reasons.append(busy)

    extra = {"uuid": uuid, "compute_processes": str(processes[uuid])}
    if used_mib is not None:
        extra["memory_used_mib"] = f"{used_mib:g}"
    return Device(
        id=row.values["index"],
        name=name,
        model=spec.key if spec else None,
        platform="cuda",
        memory_gib=total_mib / 1024 if total_mib is not None else None,
        healthy=not problems,
        utilization=utilization,
        offerable=not reasons,
        reason="; ".join(reasons) or None,
        extra=extra,
        mig=() if in_mig else None,
    )


def parse_query_gpu(text: str, compute_apps: str = "") -> list[Device]:
    """Devices from ``--query-gpu=<QUERY_FIELDS> --format=csv,noheader,nounits`` output,
    with the ``--query-compute-apps=<APPS_FIELDS>`` output marking busy GPUs."""
    processes = parse_compute_apps(compute_apps)
    devices = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = _split(line)
        if len(cells) != len(QUERY_FIELDS):
            raise AdapterError(
                f"nvidia-smi printed {len(cells)} columns, expected {len(QUERY_FIELDS)}: {line!r}"
            )
        devices.append(_device(_Row(dict(zip(QUERY_FIELDS, cells, strict=True))), processes))
    return devices


def with_mig(devices: list[Device], lgi: str, listing: str) -> list[Device]:
    """``devices`` with the MIG instances cut on each GPU in MIG mode, from
    ``nvidia-smi mig -lgi`` and ``nvidia-smi -L``. Only instances with a ``MIG-``
    UUID are kept (a run needs it); a MIG GPU with none is listed, not offered."""
    found = mig.instances(lgi, listing)
    out = []
    for d in devices:
        if d.mig is None:
            out.append(d)
            continue
        cut = tuple((i.spec, i.uuid) for i in found if str(i.gpu) == d.id and i.uuid is not None)
        if cut or not d.offerable:
            out.append(replace(d, mig=cut))
            continue
        reason = (
            "MIG mode is enabled and no instance is cut (this agent does not cut GPUs: "
            "create them with nvidia-smi mig -cgi PROFILES -C)"
        )
        out.append(replace(d, mig=cut, offerable=False, reason=reason))
    return out


class NvidiaAdapter:
    """NVIDIA GPUs on this machine, through ``nvidia-smi``."""

    name: ClassVar[str] = "nvidia"
    vendor: ClassVar[str] = "nvidia"
    platform: ClassVar[str] = "cuda"
    limits: ClassVar[tuple[str, ...]] = (
        "a GPU in MIG mode is sold as the instances cut on it; the agent does not cut GPUs",
        "vGPU and time-sliced sharing are not offered",
        "GPUs must be in the hardware catalog (consumer cards are listed, not offered)",
    )

    def __init__(self, tool: str = "nvidia-smi", timeout: float = 10.0) -> None:
        self.tool = tool
        self.timeout = timeout

    def present(self) -> bool:
        """Whether ``nvidia-smi`` is on the PATH (or the configured path exists)."""
        return shutil.which(self.tool) is not None

    def discover(self) -> Sequence[Device]:
        """Query the GPUs and their compute processes; AdapterError if the tool fails."""
        gpus = run_tool(
            [self.tool, f"--query-gpu={','.join(QUERY_FIELDS)}", "--format=csv,noheader,nounits"],
            self.timeout,
        )
        apps = run_tool(
            [
                self.tool,
                f"--query-compute-apps={','.join(APPS_FIELDS)}",
                "--format=csv,noheader,nounits",
            ],
            self.timeout,
        )
        devices = parse_query_gpu(gpus, apps)
        if any(d.mig is not None for d in devices):
            try:
                lgi = run_tool([self.tool, "mig", "-lgi"], self.timeout)
            except AdapterError:
                lgi = ""  # "No GPU instances found" exits non-zero: nothing is cut
            try:
                listing = run_tool([self.tool, "-L"], self.timeout)
            except AdapterError:
                listing = ""  # no MIG- UUIDs to run on: nothing of those GPUs is offered
            devices = with_mig(devices, lgi, listing)
        return devices
