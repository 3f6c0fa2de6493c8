"""Where on a node a fractional run goes: its MIG instance or AMD partition, its GPU
with a memory cap, or its share of a CPU slot's cores (docs/market.md, fractions).

The work order names the slice the market sold (``"3g.40gb@4"``, ``"1/2 shared on
GPU 0"``) and the offer's device; the node's last discovery says where that is.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from adapters.base import Device
from broker.sandbox import Placement
from solver.fractions import parse_shares


def mig_device(device: Device) -> str:
    """How a MIG GPU's offer names it: its UUID (an index may change with a reboot)."""
    return (device.extra.get("uuid") or device.id)[:64]


def place(
    order: dict[str, Any], devices: Sequence[Device], busy_cores: Iterable[int] = ()
) -> Placement | str | None:
    """Where ``order`` runs on a node with ``devices``, whose other runs hold
    ``busy_cores``; a string says why it cannot run here; None: whole accelerators."""
    slice_ = order.get("slice")
    if not slice_:
        return None
    if order.get("kind") == "mig":
        return _instance(order, slice_, devices)
    try:
        k, n, index = parse_shares(slice_)
    except ValueError as e:
        return str(e)
    units = [
        (d, i)
        for d in devices
        if d.model == order.get("accelerator") and d.offerable and d.mig is None
        for i in range(d.count)
    ]
    if index >= len(units):
        return f"accelerator {index} of the {order.get('accelerator')} offer is gone from here"
    device, slot = units[index]
    if (device.emulated_on or device.platform) == "cpu":
        return _cpu_share(device, slot, k, n, Counter(busy_cores))
    visible = "HIP_VISIBLE_DEVICES" if device.platform == "rocm" else "CUDA_VISIBLE_DEVICES"
    env = {visible: device.id}
    if k < n:
        # The shares' memory, less room for each process's own context.
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{math.floor(k / n * 0.95 * 1000) / 1000}"
    what = f"{device.platform} device {device.id}"
    return Placement(env=env, what=what + (f", {k}/{n} of its memory" if k < n else ""))


def _instance(order: dict[str, Any], slice_: str, devices: Sequence[Device]) -> Placement | str:
    """A MIG instance (its ``MIG-`` UUID) or an AMD partition (its logical GPU)."""
    gpu = next(
        (d for d in devices if d.mig is not None and mig_device(d) == order.get("device")), None
    )
    if gpu is None:
        return f"GPU {order.get('device')} is not partitioned on this node any more"
    uuid = dict(gpu.mig or ()).get(slice_, "")
    if not uuid:
        cut = ", ".join(spec for spec, _ in gpu.mig or ()) or "nothing"
        return (
            f"instance {slice_} is not cut on GPU {gpu.id} (it has {cut}); "
            "this agent does not cut GPUs"
        )
    if gpu.platform == "rocm":
        return Placement(env={"HIP_VISIBLE_DEVICES": uuid}, what=f"partition {uuid}")
    return Placement(env={"CUDA_VISIBLE_DEVICES": uuid}, what=f"MIG device {uuid}")


def _cpu_share(device: Device, slot: int, k: int, n: int, use: Counter[int]) -> Placement:
    """``k`` of ``n`` shares of CPU slot ``slot``: that part of the slot's cores, those
    the node's other runs use least."""
    cores = sorted(_usable_cores())
    count = max(1, device.count)
    mine = cores[slot * len(cores) // count : (slot + 1) * len(cores) // count]
    mine = mine or [cores[slot % len(cores)]]
    want = max(1, round(len(mine) * k / n))
    chosen = tuple(sorted(sorted(mine, key=lambda c: (use[c], c))[:want]))
    return Placement(cpus=chosen, what=f"{len(chosen)} of {len(mine)} cores ({_spans(chosen)})")


def _usable_cores() -> set[int]:
    """The CPU cores this agent may run on (all of them where the OS does not say)."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def _spans(cores: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2,5"."""
    out: list[str] = []
    for c in cores:
        if out and out[-1].split("-")[-1] == str(c - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out)
