"""AMD Instinct GPUs, as ``amd-smi`` (ROCm 6+) or, failing that, ``rocm-smi`` reports them.

``amd-smi static --json`` names each GPU and sizes its memory; ``amd-smi metric
--json`` adds utilisation, memory in use and ECC counts. Its JSON is a bare list
before ROCm 7.0 and ``{"gpu_data": [...]}`` since; both are read. ``rocm-smi``
(deprecated by AMD, still the only tool on older installs) is asked for the
product name, utilisation and VRAM in one call.

Two ROCm facts shape the result:

- An MI250X is two GCDs, and ROCm lists each GCD as a GPU of 64 GiB. The catalog's
  ``mi250x`` is the whole package, so consecutive GCDs are paired into one
  accelerator (ROCm enumerates the two GCDs of a package next to each other); a
  GCD whose partner is not visible (a VM given one GCD) is listed, not offered.
- An MI300X in a DPX, QPX or CPX compute partition mode appears as 2, 4 or 8
  logical GPUs, the functions of one PCI address (``0000:05:00.0``, ``.1`` ...);
  the first says the mode, the others may say ``N/A``. They are put back together
  as one GPU sold as its partitions (``Device.mig``: ``"cpx.24gb@3"`` with the
  logical GPU's index, which a run is started on), like a GPU in MIG mode. Where
  the tool says nothing of partitions (``rocm-smi``), a GPU much smaller than its
  model is taken for a partition and not offered.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from adapters import catalog, mig
from adapters.base import AdapterError, Device, run_tool

# PCI device IDs (libdrm's amdgpu.ids) of the catalog's AMD parts, for tools that
# print an ID or a board string instead of a marketing name. 0x740c is left out:
# the MI250 and the MI250X share it.
DEVICE_IDS = {"0x74a1": "mi300x", "0x7408": "mi250x", "0x740f": "mi210"}

# Same meaning as in the NVIDIA adapter: graphics activity or memory in use that
# only someone else's job explains (an idle MI300X holds about 0.3 GB).
BUSY_UTILIZATION = 0.10
BUSY_MEMORY_FRACTION = 0.05
# A GPU with less than this share of its catalog memory is a partition.
PARTITION_MEMORY_FRACTION = 0.9


@dataclass
class _Gpu:
    index: int
    name: str
    model: str | None
    memory_gib: float | None = None
    utilization: float | None = None
    used_fraction: float | None = None
    problems: list[str] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)


def _load(text: str, tool: str) -> Any:
    # Without access to the render nodes amd-smi prints a warning before the JSON.
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        raise AdapterError(f"{tool} printed no JSON: {text.strip()[:200]!r}")
    try:
        return json.loads(text[min(starts) :])
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{tool} printed JSON that does not parse: {exc}") from None


def _entries(doc: Any, tool: str) -> list[dict[str, Any]]:
    entries = doc.get("gpu_data") if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise AdapterError(f"{tool} JSON has neither a GPU list nor gpu_data")
    return entries


def _number(value: Any) -> float | None:
    """A figure from amd-smi (``{"value": 12, "unit": "%"}``, a bare number or
    "N/A") or rocm-smi (a string such as "12")."""
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        return float(str(value).strip().rstrip("%")) if isinstance(value, str) else None
    except ValueError:
        return None  # "N/A"


def _mib(size: Any) -> float | None:
    # amd-smi's "MB" are MiB: an MI300X reads 196592 MB, 192 GiB less a reserve.
    number = _number(size)
    if number is None:
        return None
    unit = str(size.get("unit", "MB")).upper() if isinstance(size, dict) else "MB"
    scale = {"B": 2**-20, "KB": 2**-10, "MB": 1.0, "GB": 2**10}.get(unit)
    return number * scale if scale is not None else None


def _resolve(*names: Any) -> str | None:
    for name in names:
        if not isinstance(name, str) or not name.strip():
            continue
        spec = catalog.lookup(name)
        if spec is not None and spec.vendor == "amd":
            return spec.key
        key = DEVICE_IDS.get(name.strip().lower())
        if key:
            return key
    return None


def parse_amd_smi(static: str, metric: str | None = None) -> list[Device]:
    """Devices from ``amd-smi static --json``, with ``amd-smi metric --json`` when given."""
    metrics = {}
    if metric is not None:
        for entry in _entries(_load(metric, "amd-smi metric"), "amd-smi metric"):
            metrics[entry.get("gpu")] = entry
    gpus: list[_Gpu] = []
    for entry in _entries(_load(static, "amd-smi static"), "amd-smi static"):
        asic = entry.get("asic") or {}
        index = int(entry.get("gpu", len(gpus)))
        board_name = (entry.get("board") or {}).get("product_name")
        name = str(asic.get("market_name") or board_name or f"GPU {index}")
        gpu = _Gpu(index, name, _resolve(asic.get("market_name"), asic.get("device_id")))
        total = _mib((entry.get("vram") or {}).get("size"))
        gpu.memory_gib = total / 1024 if total else None
        ras = entry.get("ras") or {}
        if str(ras.get("bad_page_threshold_exceeded")).lower() == "true":
            gpu.problems.append("retired memory pages exceed the bad-page threshold")
        partition = (entry.get("partition") or {}).get("compute_partition")
        if isinstance(partition, str) and partition not in ("SPX", "N/A"):
            gpu.extra["compute_partition"] = partition
        gpu.extra["bdf"] = str((entry.get("bus") or {}).get("bdf", ""))
        if index in metrics:
            _apply_metric(gpu, metrics[index])
        gpus.append(gpu)
    return _devices(gpus)


def _apply_metric(gpu: _Gpu, entry: dict[str, Any]) -> None:
    activity = _number((entry.get("usage") or {}).get("gfx_activity"))
    gpu.utilization = activity / 100 if activity is not None else None
    usage = entry.get("mem_usage") or {}
    used, total = _mib(usage.get("used_vram")), _mib(usage.get("total_vram"))
    if used is not None and total:
        gpu.used_fraction = used / total
    uncorrectable = _number((entry.get("ecc") or {}).get("total_uncorrectable_count"))
    if uncorrectable:
        gpu.problems.append(f"{uncorrectable:g} uncorrectable ECC errors")


def parse_rocm_smi(text: str) -> list[Device]:
    """Devices from ``rocm-smi --showproductname --showuse --showmeminfo vram --json``."""
    doc = _load(text, "rocm-smi")
    if not isinstance(doc, dict):
        raise AdapterError("rocm-smi JSON is not an object of cards")
    gpus = []
    for card, info in doc.items():
        if not card.startswith("card") or not isinstance(info, dict):
            continue  # the "system" entry
        # Key spellings changed between ROCm releases ("Card series" / "Card Series").
        fields = {key.lower(): value for key, value in info.items()}
        series = fields.get("card series") or fields.get("device name")
        name = str(series or fields.get("card model") or card)
        model = _resolve(series, fields.get("card model"), fields.get("device id"))
        gpu = _Gpu(int(card.removeprefix("card")), name, model)
        total = _number(fields.get("vram total memory (b)"))
        used = _number(fields.get("vram total used memory (b)"))
        gpu.memory_gib = total / 2**30 if total else None
        gpu.used_fraction = used / total if used is not None and total else None
        use = _number(fields.get("gpu use (%)"))
        gpu.utilization = use / 100 if use is not None else None
        gpus.append(gpu)
    if not gpus:
        raise AdapterError("rocm-smi found no AMD GPUs (is the amdgpu driver loaded?)")
    return _devices(gpus)


def _devices(gpus: list[_Gpu]) -> list[Device]:
    ordered = sorted(gpus, key=lambda g: g.index)
    whole, partitioned = _partitions(ordered)
    devices = _pair_mi250x_gcds([_device(gpu) for gpu in whole]) + partitioned
    # In the tool's order: a partitioned GPU where its first partition is.
    return sorted(devices, key=_first_index)


def _first_index(device: Device) -> int:
    """The tool's index of a device's first GPU: "3", "2+3" (MI250X), "0,1" (partitions)."""
    listed = device.extra.get("partitions", device.id)
    return int(listed.replace("+", ",").split(",")[0])


# Logical GPUs per physical one in each compute partition mode, and the mode's
# profile in the catalog (adapters/data/mig_profiles.csv).
PARTITION_MODES = {"DPX": 2, "QPX": 4, "CPX": 8}


def _partitions(gpus: list[_Gpu]) -> tuple[list[_Gpu], list[Device]]:
    """The logical GPUs that are compute partitions, put back together: one Device
    per physical GPU, sold as its partitions; and the other GPUs, as they are."""
    groups: dict[str, list[tuple[int, _Gpu]]] = {}
    for gpu in gpus:
        base, dot, function = gpu.extra.get("bdf", "").rpartition(".")
        if dot and function.isdigit():
            groups.setdefault(base, []).append((int(function), gpu))
    taken: set[int] = set()
    out: list[Device] = []
    for base, members in groups.items():
        members.sort(key=lambda m: m[0])
        named = [g.extra.get("compute_partition") for _, g in members]
        mode = next((m for m in named if m in PARTITION_MODES), None)
        if mode is None and len(members) > 1:  # only the first says, and it said nothing
            mode = {n: m for m, n in PARTITION_MODES.items()}.get(len(members))
        if mode is None:
            continue
        taken |= {g.index for _, g in members}
        out.append(_partitioned(base, mode, members))
    return [g for g in gpus if g.index not in taken], out


def _partitioned(base: str, mode: str, members: list[tuple[int, _Gpu]]) -> Device:
    first = members[0][1]
    model = first.model
    count = PARTITION_MODES[mode]
    profile = next(
        (p for p in mig.profiles(model or "") if p.name.startswith(mode.lower() + ".")), None
    )
    problems = [f"partition {g.index}: {p}" for _, g in members for p in g.problems]
    reasons = []
    if model is None or profile is None:
        reasons.append(f"{first.name} in {mode} mode: the catalog has no such partitions")
    if problems:
        reasons.append("unhealthy: " + "; ".join(problems))
    width = profile.width if profile is not None else 1
    cut = tuple(
        (f"{profile.name}@{function * width}", str(g.index))
        for function, g in members
        if profile is not None and function < count
    )
    spec = catalog.lookup(model) if model else None
    return Device(
        id=base,
        name=first.name,
        model=model,
        platform="rocm",
        memory_gib=spec.memory_gib if spec is not None else first.memory_gib,
        healthy=not problems,
        offerable=not reasons,
        reason="; ".join(reasons) or None,
        extra={
            "bdf": base,
            "compute_partition": mode,
            "partitions": ",".join(str(g.index) for _, g in members),
        },
        mig=cut,
    )


def _device(gpu: _Gpu) -> Device:
    spec = catalog.lookup(gpu.model) if gpu.model else None
    reasons = []
    if spec is None:
        reasons.append(f"{gpu.name} is not in the hardware catalog")
    if gpu.problems:
        reasons.append("unhealthy: " + "; ".join(gpu.problems))
    partitioned = "compute_partition" in gpu.extra or (
        spec is not None
        and gpu.model != "mi250x"
        and gpu.memory_gib is not None
        and gpu.memory_gib < PARTITION_MEMORY_FRACTION * spec.memory_gib
    )
    if partitioned:
        reasons.append("a compute partition of a larger GPU; partitions are not offered")
    signs = []
    if gpu.utilization is not None and gpu.utilization >= BUSY_UTILIZATION:
        signs.append(f"{gpu.utilization:.0%} graphics activity")
    if gpu.used_fraction is not None and gpu.used_fraction >= BUSY_MEMORY_FRACTION:
        signs.append(f"{gpu.used_fraction:.0%} of memory in use")
    if signs:
        reasons.append("busy: " + ", ".join(signs))
    return Device(
        id=str(gpu.index),
        name=gpu.name,
        model=gpu.model,
        platform="rocm",
        memory_gib=gpu.memory_gib,
        healthy=not gpu.problems,
        utilization=gpu.utilization,
        offerable=not reasons,
        reason="; ".join(reasons) or None,
        extra={k: v for k, v in gpu.extra.items() if v},
    )


def _pair_mi250x_gcds(devices: list[Device]) -> list[Device]:
    out: list[Device] = []
    pending: Device | None = None
    for device in devices:
        if device.model != "mi250x":
            out.append(device)
        elif pending is None:
            pending = device
        else:
            out.append(_package(pending, device))
            pending = None
    if pending is not None:
        lone = (
            "one GCD of an MI250X whose partner GCD is not visible; "
            "the catalog sells whole packages"
        )
        reason = "; ".join(r for r in (pending.reason, lone) if r)
        out.append(replace(pending, offerable=False, reason=reason))
    return out


def _package(first: Device, second: Device) -> Device:
    reasons = [f"GCD {d.id}: {d.reason}" for d in (first, second) if d.reason]
    memory = (
        first.memory_gib + second.memory_gib
        if first.memory_gib is not None and second.memory_gib is not None
        else None
    )
    loads = [u for u in (first.utilization, second.utilization) if u is not None]
    return replace(
        first,
        id=f"{first.id}+{second.id}",
        memory_gib=memory,
        healthy=first.healthy and second.healthy,
        utilization=max(loads) if loads else None,
        offerable=first.offerable and second.offerable,
        reason="; ".join(reasons) or None,
        extra={**first.extra, "gcds": f"{first.id},{second.id}"},
    )


class AmdAdapter:
    """AMD GPUs on this machine, through ``amd-smi`` or ``rocm-smi``."""

    name: ClassVar[str] = "amd"
    vendor: ClassVar[str] = "amd"
    platform: ClassVar[str] = "rocm"
    limits: ClassVar[tuple[str, ...]] = (
        "an MI300X in a compute partition mode is sold as its partitions; the agent never "
        "changes the mode",
        "an MI250X is offered as a whole package of two GCDs, never one GCD",
        "rocm-smi reports no ECC figures, so on the fallback path health is not checked",
    )

    def __init__(
        self, amd_smi: str = "amd-smi", rocm_smi: str = "rocm-smi", timeout: float = 10.0
    ) -> None:
        self.amd_smi = amd_smi
        self.rocm_smi = rocm_smi
        self.timeout = timeout

    def present(self) -> bool:
        """Whether ``amd-smi`` or ``rocm-smi`` is installed."""
        return bool(shutil.which(self.amd_smi) or shutil.which(self.rocm_smi))

    def discover(self) -> Sequence[Device]:
        """Ask ``amd-smi``; if it is missing or fails, ask ``rocm-smi``."""
        errors = []
        if shutil.which(self.amd_smi):
            try:
                static = run_tool([self.amd_smi, "static", "--json"], self.timeout)
                metric = run_tool([self.amd_smi, "metric", "--json"], self.timeout)
                return parse_amd_smi(static, metric)
            except AdapterError as exc:
                errors.append(str(exc))
        if shutil.which(self.rocm_smi):
            try:
                args = ["--showproductname", "--showuse", "--showmeminfo", "vram", "--json"]
                return parse_rocm_smi(run_tool([self.rocm_smi, *args], self.timeout))
            except AdapterError as exc:
                errors.append(str(exc))
        raise AdapterError(
            "; ".join(errors) or f"neither {self.amd_smi} nor {self.rocm_smi} is installed"
        )
