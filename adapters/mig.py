"""MIG: the profiles each GPU model can be cut into, and what ``nvidia-smi`` says is cut.

The profile catalog (``adapters/data/mig_profiles.csv``) comes from NVIDIA's
Multi-Instance GPU User Guide, "Supported MIG Profiles"
(https://docs.nvidia.com/datacenter/tesla/mig-user-guide/supported-mig-profiles.html):
per model, each profile's compute slices (of 7), memory, and the placements
``nvidia-smi mig -lgipp`` prints (``{0,2,4}:2`` = may start at memory slot 0, 2
or 4 and covers 2 of the 8). Memory is the GB of the profile's name, taken as
GiB. The ``+me`` (media extension) variants are left out: they take the same
slices as the plain 1g profile.
"""

from __future__ import annotations

import csv
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


def specs(model: str) -> tuple[str, ...]:
    """``Profile.spec`` strings of a model's profiles, as MIG offers carry them."""
    return tuple(p.spec for p in profiles(model))
