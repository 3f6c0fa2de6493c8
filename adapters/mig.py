"""MIG: the profiles each GPU model can be cut into, and what ``nvidia-smi`` says is cut.

The profile catalog (``adapters/data/mig_profiles.csv``) comes from NVIDIA's
Multi-Instance GPU User Guide, "Supported MIG Profiles"
(https://docs.nvidia.com/datacenter/tesla/mig-user-guide/supported-mig-profiles.html):
per model, each profile's compute slices (of 7), memory, and the placements
``nvidia-smi mig -lgipp`` prints (``{0,2,4}:2`` = may start at memory slot 0, 2
or 4 and covers 2 of the 8). Memory is the GB of the profile's name, taken as
GiB. The ``+me`` (media extension) variants are left out: they take the same
slices as the plain 1g profile.

The ``mi300x`` rows are AMD's compute partitions (SPX, DPX, QPX, CPX: 1, 2, 4 or 8
logical GPUs of 8, 4, 2 or 1 XCDs; AMD SMI's "GPU partitioning" guide), sold the
same way. An AMD GPU is partitioned whole, in one mode (``partitioned_whole``):
the market sells it as it is and never proposes to cut it again.

What is cut now comes from ``nvidia-smi mig -lgi`` (each GPU instance's profile
and placement), ``nvidia-smi -L`` (the ``MIG-`` UUIDs a job is started on) and
``nvidia-smi mig -lgipp`` (the placements the driver allows).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from solver.fractions import Profile


@cache
def _profiles() -> dict[str, tuple[Profile, ...]]:
    text = resources.files("adapters").joinpath("data/mig_profiles.csv").read_text("utf-8")
    out: dict[str, list[Profile]] = {}
    for row in csv.DictReader(text.splitlines()):
        out.setdefault(row["model"], []).append(
            Profile(
                name=row["profile"],
                compute=int(row["compute_slices"]),
                total=int(row["total_compute"]),
                memory_gib=float(row["memory_gib"]),
                starts=tuple(int(s) for s in row["starts"].split(";")),
                width=int(row["width"]),
            )
        )
    return {model: tuple(ps) for model, ps in out.items()}


def profiles(model: str) -> tuple[Profile, ...]:
    """The MIG profiles of a catalog model key (empty: the model has no MIG)."""
    return _profiles().get(model, ())


def models() -> tuple[str, ...]:
    """The catalog model keys that have MIG profiles."""
    return tuple(_profiles())


def partitioned_whole(model: str) -> bool:
    """Whether a model's GPU takes one partition mode for all of it (AMD's compute
    partitions), so that it is never cut again as MIG GPUs may be."""
    return any(p.name.split(".")[0].endswith("px") for p in profiles(model))


def specs(model: str) -> tuple[str, ...]:
    """``Profile.spec`` strings of a model's profiles, as MIG offers carry them."""
    return tuple(p.spec for p in profiles(model))


@dataclass(frozen=True, slots=True)
class Instance:
    """One MIG GPU instance: its profile, where it sits, and its device UUID when known."""

    gpu: int
    profile: str
    gi_id: int
    start: int
    size: int
    uuid: str | None = None

    @property
    def spec(self) -> str:
        """As MIG offers list it: ``"3g.40gb@4"``."""
        return f"{self.profile}@{self.start}"


_LGI_ROW = re.compile(r"^\|\s*(\d+)\s+MIG\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+):(\d+)\s*\|$")
_LIST_GPU = re.compile(r"^GPU (\d+): (.+?) \(UUID: (GPU-[0-9a-fA-F-]+)\)$")
_LIST_MIG = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[0-9a-fA-F-]+)\)$")
_LGIPP_ROW = re.compile(
    r"^GPU\s+(\d+)\s+Profile ID\s+(\d+)\s+Placements?\s*:\s*\{([\d,]+)\}:(\d+)$"
)


def parse_lgi(text: str) -> list[Instance]:
    """GPU instances from ``nvidia-smi mig -lgi``, ordered by GPU and instance ID."""
    out = []
    for line in text.splitlines():
        m = _LGI_ROW.match(line.strip())
        if m:
            gpu, name, _profile_id, gi, start, size = m.groups()
            out.append(Instance(int(gpu), name, int(gi), int(start), int(size)))
    return sorted(out, key=lambda i: (i.gpu, i.gi_id))


def parse_list(text: str) -> dict[int, list[tuple[str, str]]]:
    """Per GPU index, its MIG devices as (profile, ``MIG-`` UUID) from ``nvidia-smi -L``,
    in device order."""
    out: dict[int, list[tuple[str, str]]] = {}
    gpu = -1
    for line in text.splitlines():
        if m := _LIST_GPU.match(line.strip()):
            gpu = int(m.group(1))
            out[gpu] = []
        elif (m := _LIST_MIG.match(line)) and gpu >= 0:
            out[gpu].append((m.group(1), m.group(3)))
    return out


def parse_lgipp(text: str) -> dict[int, tuple[tuple[int, ...], int]]:
    """Profile ID -> (possible starts, size) from ``nvidia-smi mig -lgipp``."""
    out: dict[int, tuple[tuple[int, ...], int]] = {}
    for line in text.splitlines():
        if m := _LGIPP_ROW.match(line.strip()):
            out[int(m.group(2))] = (tuple(int(s) for s in m.group(3).split(",")), int(m.group(4)))
    return out


def instances(lgi: str, listing: str) -> list[Instance]:
    """Every GPU instance with its ``MIG-`` UUID. ``nvidia-smi`` numbers a GPU's MIG
    devices in the order of their GPU instance IDs (its MIG devices table shows
    GI 1 as device 0, GI 2 as device 1), which is how the two listings join."""
    devices = parse_list(listing)
    out = []
    for gpu in sorted({i.gpu for i in parse_lgi(lgi)}):
        mine = [i for i in parse_lgi(lgi) if i.gpu == gpu]
        named = devices.get(gpu, [])
        for k, inst in enumerate(mine):
            uuid = named[k][1] if k < len(named) and named[k][0] == inst.profile else None
            out.append(Instance(inst.gpu, inst.profile, inst.gi_id, inst.start, inst.size, uuid))
    return out


def creatable(model: str, existing: list[Instance]) -> list[str]:
    """Where new instances could still be made next to ``existing`` on one GPU of
    ``model``: ``"PROFILE@START"`` for each placement that overlaps none of them
    and fits in the compute slices left."""
    taken: set[int] = set()
    compute = 0
    by_name = {p.name: p for p in profiles(model)}
    for inst in existing:
        taken |= set(range(inst.start, inst.start + inst.size))
        compute += by_name[inst.profile].compute if inst.profile in by_name else 0
    return [
        f"{p.name}@{s}"
        for p in profiles(model)
        for s in p.starts
        if not (p.slots(s) & taken) and compute + p.compute <= p.total
    ]
