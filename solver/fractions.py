"""Fractional accelerators: MIG slices and GPU shares, and the rules for fitting jobs in them.

Two kinds of fractional offer (``Offer.fraction_kind``):

- ``"mig"``: one GPU in MIG mode. ``mig_profiles`` lists what the model can be
  cut into (``Profile.spec`` strings, from the adapters' MIG catalog), with the
  positions each profile may start at; ``mig_instances`` the free instances that
  exist now and ``mig_busy`` those in use (both ``"PROFILE@START"``). New
  instances may be created in slots no instance covers; a GPU with nothing busy
  is idle and may be re-partitioned (its free instances destroyed and the GPU
  cut again).
- ``"shared"``: ``count`` GPUs, each time-sliced into ``shares`` equal shares
  (memory per share: ``memory_gib / shares``). Compute is not isolated: only jobs
  that accept shared capacity may use them.

A fractional job (``Job.fraction``, ``Job.mig_profile`` or ``Job.min_compute``)
needs part of one GPU: a share of its compute and an amount of memory. It pays
the offer's price times the share of the GPU it gets (a MIG profile's compute
slices over the GPU's, or its shares over the GPU's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from solver.market import Job, Offer

EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Profile:
    """A MIG profile: compute slices, memory, and the memory slots it may start at."""

    name: str
    compute: int  # compute slices it takes
    total: int  # compute slices of the whole GPU
    memory_gib: float
    starts: tuple[int, ...]
    width: int  # memory slots it covers from its start

    @property
    def share(self) -> float:
        return self.compute / self.total

    @property
    def spec(self) -> str:
        """The form offers carry: ``NAME:COMPUTE/TOTAL:GIB:START,START...:WIDTH``."""
        starts = ",".join(str(s) for s in self.starts)
        return f"{self.name}:{self.compute}/{self.total}:{self.memory_gib:g}:{starts}:{self.width}"

    def slots(self, start: int) -> frozenset[int]:
        return frozenset(range(start, start + self.width))


def parse_profile(spec: str) -> Profile:
    """A ``Profile`` from its ``spec``; ValueError saying what is wrong otherwise."""
    try:
        name, share, gib, starts, width = spec.split(":")
        compute, total = (int(x) for x in share.split("/"))
        profile = Profile(
            name=name,
            compute=compute,
            total=total,
            memory_gib=float(gib),
            starts=tuple(int(s) for s in starts.split(",")),
            width=int(width),
        )
    except ValueError:
        raise ValueError(
            f"MIG profile {spec!r}: expected NAME:COMPUTE/TOTAL:GIB:STARTS:WIDTH, "
            "e.g. '3g.40gb:3/7:40:0,4:4'"
        ) from None
    if not (0 < compute <= total) or profile.width < 1 or min(profile.starts) < 0:
        raise ValueError(f"MIG profile {spec!r}: slices or positions out of range")
    return profile


def parse_instance(text: str) -> tuple[str, int]:
    """``"3g.40gb@4"`` -> ``("3g.40gb", 4)``."""
    name, _, start = text.partition("@")
    if not name or not start.isdigit():
        raise ValueError(f"MIG instance {text!r}: expected PROFILE@START, e.g. '3g.40gb@4'")
    return name, int(start)


def parse_shares(text: str) -> tuple[int, int, int]:
    """``"2/8 shared on GPU 1"`` -> (2, 8, 1): shares taken, shares per accelerator, and
    which of the offer's accelerators (0 to its count - 1)."""
    parts = text.split()
    k, _, total = parts[0].partition("/") if parts else ("", "", "")
    if (
        len(parts) != 5
        or parts[1:4] != ["shared", "on", "GPU"]
        or not (k + total + parts[4]).isdigit()
    ):
        raise ValueError(f"shares {text!r}: expected 'K/N shared on GPU G'")
    return int(k), int(total), int(parts[4])


def is_fractional(job: Job) -> bool:
    return job.fraction is not None or job.mig_profile is not None or job.min_compute is not None


def demand(job: Job, gpu_memory_gib: float) -> tuple[float, float]:
    """(share of the GPU's compute, GiB of memory) a fractional job needs on a GPU."""
    compute = job.fraction if job.fraction is not None else (job.min_compute or 0.0)
    memory = job.min_memory_gib
    if job.fraction is not None:
        memory = max(memory, job.fraction * gpu_memory_gib)
    return compute, memory


def fits_profile(job: Job, offer: Offer, p: Profile) -> bool:
    """Whether the job may run on an instance of MIG profile ``p`` of ``offer``'s GPU."""
    if job.mig_profile is not None:
        return job.mig_profile == p.name and p.memory_gib + EPS >= job.min_memory_gib
    compute, memory = demand(job, offer.memory_gib)
    return p.share + EPS >= compute and p.memory_gib + EPS >= memory


def shares_needed(job: Job, offer: Offer) -> int | None:
    """How many of a shared offer's shares the job needs on one GPU (None: it may not use it)."""
    if not job.accepts_shared or job.mig_profile is not None or offer.shares < 1:
        return None
    compute, memory = demand(job, offer.memory_gib)
    per_share = offer.memory_gib / offer.shares
    k = max(1, math.ceil(compute * offer.shares - EPS))
    if per_share > 0:
        k = max(k, math.ceil(memory / per_share - EPS))
    elif memory > 0:
        return None
    return k if k <= offer.shares else None


@dataclass(frozen=True, slots=True)
class Gpu:
    """A MIG GPU's state: what exists, what is busy, what may be created."""

    profiles: dict[str, Profile]
    busy: frozenset[int]  # memory slots of busy instances
    busy_compute: int
    existing: tuple[tuple[str, int], ...]  # free instances
    slots: int  # memory slots of the GPU
    total: int  # compute slices of the GPU
    fixed: bool = False  # sold as cut: nothing made, nothing re-cut

    @property
    def idle(self) -> bool:
        return not self.busy and not self.fixed

    @classmethod
    def of(cls, offer: Offer) -> Gpu:
        profiles = {p.name: p for p in (parse_profile(s) for s in offer.mig_profiles)}
        if not profiles:
            raise ValueError(f"offer {offer.id!r}: a MIG offer lists its mig_profiles")
        busy: set[int] = set()
        busy_compute = 0
        for text in offer.mig_busy:
            name, start = parse_instance(text)
            p = _known(profiles, name, offer)
            busy |= p.slots(start)
            busy_compute += p.compute
        existing = tuple(parse_instance(t) for t in offer.mig_instances)
        for name, _ in existing:
            _known(profiles, name, offer)
        slots = max(max(p.starts) + p.width for p in profiles.values())
        total = max(p.total for p in profiles.values())
        return cls(profiles, frozenset(busy), busy_compute, existing, slots, total, offer.mig_fixed)

    def placements(self) -> list[tuple[str, int]]:
        """Every (profile, start) that may hold an instance after this round.

        On an idle GPU: every valid placement (the GPU may be cut again). Else
        the free instances as they are, and new ones in slots nothing covers.
        """
        if self.idle:
            return [(p.name, s) for p in self.profiles.values() for s in p.starts]
        if self.fixed:
            return list(self.existing)
        taken = set(self.busy)
        for name, start in self.existing:
            taken |= self.profiles[name].slots(start)
        new = [
            (p.name, s)
            for p in self.profiles.values()
            for s in p.starts
            if s + p.width <= self.slots and not (p.slots(s) & taken)
        ]
        return list(self.existing) + new


def _known(profiles: dict[str, Profile], name: str, offer: Offer) -> Profile:
    if name not in profiles:
        raise ValueError(f"offer {offer.id!r}: instance of unknown MIG profile {name!r}")
    return profiles[name]


def valid_layout(gpu: Gpu, layout: list[tuple[str, int]]) -> bool:
    """Whether instances ``layout`` can all exist at once next to the busy ones:
    each at one of its profile's positions, no two over one memory slot, and no
    more compute slices than the GPU has."""
    used = set(gpu.busy)
    compute = gpu.busy_compute
    for name, start in layout:
        p = gpu.profiles.get(name)
        if p is None or start not in p.starts or start + p.width > gpu.slots:
            return False
        if p.slots(start) & used:
            return False
        used |= p.slots(start)
        compute += p.compute
    return compute <= gpu.total
