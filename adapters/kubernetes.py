"""Kubernetes nodes: what each node of a cluster can offer, read from the API server.

Device plugins advertise accelerators as extended resources in a node's
``status.allocatable`` (``nvidia.com/gpu``, ``amd.com/gpu``, ``google.com/tpu``;
MIG slices as ``nvidia.com/mig-1g.10gb`` under NVIDIA's "mixed" strategy), and
labellers say what they are. A node's free accelerators are its allocatable ones
minus the requests of the pods on it that have not finished; the broker's own
pods (``MANAGED_LABEL``) count as the broker's, not as someone else's, since the
market already holds their accelerators.

The model comes from the node's labels, in this order: NVIDIA GPU feature
discovery's ``nvidia.com/gpu.product``, GKE's ``cloud.google.com/gke-accelerator``,
Karpenter's ``karpenter.k8s.aws/instance-gpu-name``, AMD's node labeller
(``beta.amd.com/gpu.device-id.<id>`` or ``amd.com/gpu.device-id``, through the
AMD adapter's device-id table), and for TPUs GKE's
``cloud.google.com/gke-tpu-accelerator``. A node that is cordoned, not Ready, or
tainted (NoSchedule, NoExecute) with a taint the agent does not tolerate is
listed, not offered.

The functions here take the API's JSON (dicts, as ``kubectl get -o json`` prints
them): the agent (``broker.agent.kube``) lists and watches through the official
client and hands them over.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapters import catalog
from adapters.amd import DEVICE_IDS as AMD_DEVICE_IDS
from adapters.base import Device

# Extended resource -> (catalog vendor, JAX platform).
RESOURCES = {
    "nvidia.com/gpu": ("nvidia", "cuda"),
    "amd.com/gpu": ("amd", "rocm"),
    "google.com/tpu": ("google", "tpu"),
}
MIG_PREFIX = "nvidia.com/mig-"
# Pods the broker's agent made carry this label (its value: the allocation id).
MANAGED_LABEL = "broker.compute/allocation"
HOSTNAME_LABEL = "kubernetes.io/hostname"

# GKE's accelerator names (cloud.google.com/gke-accelerator), from the GKE GPU docs.
GKE_ACCELERATORS = {
    "nvidia-h200-141gb": "h200",
    "nvidia-h100-mega-80gb": "h100-sxm",
    "nvidia-h100-80gb": "h100-sxm",
    "nvidia-a100-80gb": "a100-80gb",
    "nvidia-tesla-a100": "a100-40gb",
    "nvidia-l4": "l4",
    "nvidia-tesla-t4": "t4",
    "nvidia-tesla-v100": "v100-16gb",
}
# GKE's TPU names (cloud.google.com/gke-tpu-accelerator), from the GKE TPU docs.
GKE_TPUS = {
    "tpu-v4-podslice": "tpu-v4",
    "tpu-v5-lite-device": "tpu-v5e",
    "tpu-v5-lite-podslice": "tpu-v5e",
    "tpu-v5p-slice": "tpu-v5p",
    "tpu-v6e-slice": "tpu-v6e",
}
# Taints device plugins' installers put on accelerator nodes so that only pods asking
# for the accelerator land there: the agent's pods do ask, so it tolerates them.
ACCELERATOR_TAINTS = tuple(RESOURCES)
# The AMD adapter's table, and the MI300X's virtual function (0x74b5), which clouds
# that pass an MI300X through to a VM expose whole.
AMD_IDS = {**AMD_DEVICE_IDS, "0x74b5": "mi300x"}
_AMD_ID_LABEL = re.compile(r"^(beta\.)?amd\.com/gpu\.device-id\.(?P<id>[0-9a-fA-F]{4})$")


@dataclass(frozen=True, slots=True)
class Toleration:
    """A pod toleration (``key``, ``operator`` Equal or Exists, ``value``, ``effect``)."""

    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""

    @classmethod
    def parse(cls, text: str) -> Toleration:
        """``KEY[=VALUE][:EFFECT]``; no value means any (Exists)."""
        rest, _, effect = text.partition(":")
        key, sep, value = rest.partition("=")
        if not key.strip() or effect not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ValueError(f"--toleration {text!r}: write KEY[=VALUE][:EFFECT]")
        operator = "Equal" if sep else "Exists"
        return cls(key.strip(), operator, value.strip(), effect)

    def tolerates(self, taint: Mapping[str, Any]) -> bool:
        if self.effect and self.effect != taint.get("effect"):
            return False
        if not self.key:
            return self.operator == "Exists"
        if self.key != taint.get("key"):
            return False
        return self.operator == "Exists" or self.value == str(taint.get("value") or "")

    def to_api(self) -> dict[str, str]:
        body = {"key": self.key, "operator": self.operator}
        if self.operator == "Equal":
            body["value"] = self.value
        if self.effect:
            body["effect"] = self.effect
        return body


DEFAULT_TOLERATIONS = tuple(Toleration(key, "Exists") for key in ACCELERATOR_TAINTS)


def quantity(value: Any) -> int:
    """A count from a resource quantity ("8", 8, "2k"); accelerators are whole numbers."""
    text = str(value).strip()
    scale = {"k": 1000, "M": 1000**2, "Ki": 1024, "Mi": 1024**2}
    for suffix, factor in scale.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    try:
        return int(float(text))
    except ValueError:
        return 0


def _resolve(name: str, vendor: str) -> str | None:
    spec = catalog.lookup(name)
    return spec.key if spec is not None and spec.vendor == vendor else None


def model_of(labels: Mapping[str, str], resource: str) -> tuple[str | None, str | None]:
    """The catalog key of a node's ``resource`` from its labels (the order above), and
    why it is not offered even so (MIG in the single strategy, time-sliced GPUs)."""
    vendor = RESOURCES[resource][0]
    if vendor == "google":
        name = labels.get("cloud.google.com/gke-tpu-accelerator", "")
        return (GKE_TPUS.get(name) or _resolve(name, vendor)) if name else None, None
    if vendor == "nvidia":
        product = labels.get("nvidia.com/gpu.product", "")
        if "-MIG-" in product:
            # The single strategy: nvidia.com/gpu counts MIG slices, not whole GPUs.
            return None, f"nvidia.com/gpu counts MIG slices here ({product})"
        if product.endswith("-SHARED"):
            return None, f"nvidia.com/gpu counts time-sliced replicas here ({product})"
        if product and (key := _resolve(product, vendor)):
            return key, None
        gke = labels.get("cloud.google.com/gke-accelerator", "")
        if gke in GKE_ACCELERATORS:
            return GKE_ACCELERATORS[gke], None
        karpenter = labels.get("karpenter.k8s.aws/instance-gpu-name", "")
        if karpenter and (key := _resolve(karpenter, vendor)):
            return key, None
        return None, None
    ids = [m["id"] for k in labels if (m := _AMD_ID_LABEL.match(k))]
    if labels.get("amd.com/gpu.device-id"):
        ids.append(labels["amd.com/gpu.device-id"])
    for device_id in ids:
        if key := AMD_IDS.get("0x" + device_id.lower().removeprefix("0x")):
            return key, None
    for label in ("amd.com/gpu.product-name", "beta.amd.com/gpu.product-name"):
        if labels.get(label) and (key := _resolve(labels[label].replace("_", " "), vendor)):
            return key, None
    return None, None


def pod_requests(pod: Mapping[str, Any]) -> dict[str, int]:
    """What a pod holds of each extended resource: its containers' requests (limits
    where no request is given, as the API server defaults them), or an init
    container's if larger, as the scheduler counts."""
    spec = pod.get("spec") or {}

    def of(container: Mapping[str, Any]) -> dict[str, int]:
        resources = container.get("resources") or {}
        merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        return {k: quantity(v) for k, v in merged.items() if "/" in k}

    total: dict[str, int] = {}
    for container in spec.get("containers") or []:
        for k, v in of(container).items():
            total[k] = total.get(k, 0) + v
    for container in spec.get("initContainers") or []:
        for k, v in of(container).items():
            total[k] = max(total.get(k, 0), v)
    return total


def unfinished(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def ready_problem(node: Mapping[str, Any]) -> str | None:
    """Why the node is not Ready, or None when it is."""
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            if condition.get("status") == "True":
                return None
            why = condition.get("reason") or condition.get("message") or "no reason given"
            return f"not Ready ({why})"
    return "not Ready (no Ready condition)"


def untolerated(node: Mapping[str, Any], tolerations: Sequence[Toleration]) -> list[str]:
    """The node's NoSchedule and NoExecute taints no toleration covers."""
    taints = (node.get("spec") or {}).get("taints") or []
    return [
        f"{t.get('key')}={t.get('value') or ''}:{t.get('effect')}"
        for t in taints
        if t.get("effect") in ("NoSchedule", "NoExecute")
        and not any(x.tolerates(t) for x in tolerations)
    ]


@dataclass(frozen=True, slots=True)
class NodeCapacity:
    """One node's accelerators of one kind: how many, how many others hold, and
    whether the market may have them (``reasons`` empty)."""

    node: str
    hostname: str  # its kubernetes.io/hostname label, what a Job's node selector names
    resource: str
    model: str | None
    platform: str
    allocatable: int
    others: int  # requested by pods that are not the broker's
    ours: int  # requested by the broker's pods
    reasons: tuple[str, ...] = ()
    # MIG profiles beside the whole GPUs (NVIDIA's mixed strategy): (profile, count).
    mig: tuple[tuple[str, int], ...] = ()

    @property
    def offerable(self) -> int:
        """What the market may hold here: all but what others' pods hold."""
        return 0 if self.reasons else max(0, self.allocatable - self.others)


def capacities(
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    tolerations: Sequence[Toleration] = DEFAULT_TOLERATIONS,
) -> list[NodeCapacity]:
    """Every node's whole accelerators (one entry per node that has any), by name."""
    held: dict[str, dict[str, list[int]]] = {}
    for pod in pods:
        node_name = (pod.get("spec") or {}).get("nodeName")
        if not node_name or not unfinished(pod):
            continue
        mine = MANAGED_LABEL in ((pod.get("metadata") or {}).get("labels") or {})
        for resource, count in pod_requests(pod).items():
            pair = held.setdefault(node_name, {}).setdefault(resource, [0, 0])
            pair[1 if mine else 0] += count
    out = []
    for node in sorted(nodes, key=lambda n: str((n.get("metadata") or {}).get("name"))):
        meta = node.get("metadata") or {}
        name = str(meta.get("name"))
        labels = meta.get("labels") or {}
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        problems = []
        if (node.get("spec") or {}).get("unschedulable"):
            problems.append("cordoned")
        if problem := ready_problem(node):
            problems.append(problem)
        if taints := untolerated(node, tolerations):
            problems.append("tainted " + ", ".join(taints) + " (not tolerated; see --toleration)")
        for resource, (_, platform) in RESOURCES.items():
            count = quantity(allocatable.get(resource, 0))
            mig = tuple(sorted(mig_slices(node).items())) if resource == "nvidia.com/gpu" else ()
            if count <= 0 and not mig:
                continue
            model, refused = model_of(labels, resource)
            reasons = list(problems)
            if refused:
                reasons.append(refused)
            elif model is None:
                reasons.append(f"no label names a catalog model for {resource}")
            others, ours = held.get(name, {}).get(resource, [0, 0])
            out.append(
                NodeCapacity(
                    node=name,
                    hostname=str(labels.get(HOSTNAME_LABEL, name)),
                    resource=resource,
                    model=model,
                    platform=platform,
                    allocatable=count,
                    others=others,
                    ours=ours,
                    reasons=tuple(reasons),
                    mig=mig,
                )
            )
    return out


def mig_slices(node: Mapping[str, Any]) -> dict[str, int]:
    """MIG profiles a node advertises (mixed strategy): ``{"1g.10gb": 7}``."""
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    return {
        k.removeprefix(MIG_PREFIX): quantity(v)
        for k, v in allocatable.items()
        if k.startswith(MIG_PREFIX) and quantity(v) > 0
    }


def devices(cap: NodeCapacity) -> list[Device]:
    """A node's accelerators as devices: those the market may have, and the rest with why."""
    spec = catalog.lookup(cap.model) if cap.model else None
    out = []

    def device(suffix: str, count: int, reason: str | None) -> Device:
        return Device(
            id=cap.node + suffix,
            name=spec.name if spec else cap.resource,
            model=cap.model,
            platform=cap.platform,
            memory_gib=spec.memory_gib if spec else None,
            count=count,
            offerable=reason is None,
            reason=reason,
            extra={"node": cap.node, "resource": cap.resource},
        )

    if cap.offerable:
        out.append(device("", cap.offerable, None))
    held = cap.allocatable - cap.offerable
    if held > 0:
        out.append(device("/held", held, "; ".join(cap.reasons) or "requested by other pods"))
    for profile, count in cap.mig:
        memory = re.search(r"(\d+)gb$", profile)
        out.append(
            Device(
                id=f"{cap.node}/mig-{profile}",
                name=MIG_PREFIX + profile,
                model=cap.model,
                platform=cap.platform,
                memory_gib=float(memory[1]) if memory else None,
                count=count,
                offerable=False,
                reason="a MIG slice: offered once the market has fractional accelerators",
                extra={"node": cap.node, "resource": MIG_PREFIX + profile},
            )
        )
    return out
