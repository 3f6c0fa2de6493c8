"""What a cluster's nodes offer, from real label and resource shapes (``tests/kube/samples``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters import kubernetes as kube

NODES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parents[1] / "kube" / "samples" / "nodes.json").read_text()
)["items"]


def by_node(caps: list[kube.NodeCapacity]) -> dict[str, kube.NodeCapacity]:
    return {c.node: c for c in caps}


def pod(
    node: str, requests: dict[str, str], phase: str = "Running", **labels: str
) -> dict[str, Any]:
    return {
        "metadata": {"name": f"p-{node}-{len(requests)}", "namespace": "ns", "labels": labels},
        "spec": {"nodeName": node, "containers": [{"resources": {"limits": requests}}]},
        "status": {"phase": phase},
    }


def test_each_vendor_label_scheme_names_its_catalog_model() -> None:
    caps = by_node(kube.capacities(NODES, []))
    assert {name: (c.model, c.platform, c.offerable) for name, c in caps.items()} == {
        "dgx-a100-01": ("a100-80gb", "cuda", 6),  # GFD; its two MIG GPUs are not nvidia.com/gpu
        "gke-a3-pool-7f3c9b1e-x2kq": ("h100-sxm", "cuda", 8),  # GKE's accelerator name
        "ip-10-0-12-34.ec2.internal": ("h100-sxm", "cuda", 8),  # Karpenter
        "mi300x-node-0": ("mi300x", "rocm", 8),  # AMD's device id
        "gke-tpu-v5e-pool-1a2b3c4d-9xyz": ("tpu-v5e", "tpu", 8),  # GKE's TPU name
        "gpu-cordoned": ("h100-sxm", "cuda", 0),
        "gpu-reserved": ("l4", "cuda", 0),
        "gpu-notready": ("t4", "cuda", 0),
    }
    assert "cpu-0" not in caps  # no accelerators: not a node of the market


def test_cordoned_not_ready_and_untolerated_nodes_say_why() -> None:
    caps = by_node(kube.capacities(NODES, []))
    assert caps["gpu-cordoned"].reasons == (
        "cordoned",
        "tainted node.kubernetes.io/unschedulable=:NoSchedule (not tolerated; see --toleration)",
    )
    assert caps["gpu-notready"].reasons[0] == "not Ready (NodeStatusUnknown)"
    assert "dedicated=training-team:NoSchedule" in caps["gpu-reserved"].reasons[0]
    # The accelerator taints the device plugins' installers add are tolerated by default.
    assert caps["dgx-a100-01"].reasons == ()
    tolerating = [*kube.DEFAULT_TOLERATIONS, kube.Toleration.parse("dedicated=training-team")]
    assert by_node(kube.capacities(NODES, [], tolerating))["gpu-reserved"].offerable == 1
    wrong_value = [*kube.DEFAULT_TOLERATIONS, kube.Toleration.parse("dedicated=other:NoSchedule")]
    assert by_node(kube.capacities(NODES, [], wrong_value))["gpu-reserved"].offerable == 0


def test_free_is_allocatable_minus_what_unfinished_pods_request() -> None:
    pods = [
        pod("gke-a3-pool-7f3c9b1e-x2kq", {"nvidia.com/gpu": "3", "cpu": "4"}),
        pod("gke-a3-pool-7f3c9b1e-x2kq", {"nvidia.com/gpu": "2"}, phase="Pending"),
        pod("gke-a3-pool-7f3c9b1e-x2kq", {"nvidia.com/gpu": "2"}, phase="Succeeded"),
        pod("gke-a3-pool-7f3c9b1e-x2kq", {"nvidia.com/gpu": "1"}, phase="Failed"),
        # The broker's own pod: the market already holds these, so they stay in the offer.
        pod(
            "gke-a3-pool-7f3c9b1e-x2kq",
            {"nvidia.com/gpu": "1"},
            **{kube.MANAGED_LABEL: "alloc_1"},
        ),
        pod("dgx-a100-01", {"nvidia.com/mig-1g.10gb": "1"}),  # a MIG slice, not a whole GPU
    ]
    caps = by_node(kube.capacities(NODES, pods))
    h100 = caps["gke-a3-pool-7f3c9b1e-x2kq"]
    assert (h100.allocatable, h100.others, h100.ours, h100.offerable) == (8, 5, 1, 3)
    assert caps["dgx-a100-01"].offerable == 6
    (free, held) = kube.devices(h100)
    assert (free.count, free.offerable, free.model, free.extra["node"]) == (
        3,
        True,
        "h100-sxm",
        h100.node,
    )
    assert (held.count, held.offerable) == (5, False)


def test_init_containers_count_as_the_scheduler_counts_them() -> None:
    p = pod("n", {"nvidia.com/gpu": "1"})
    p["spec"]["initContainers"] = [{"resources": {"requests": {"nvidia.com/gpu": "4"}}}]
    assert kube.pod_requests(p) == {"nvidia.com/gpu": 4}


def test_mig_slices_are_listed_for_later() -> None:
    assert kube.mig_slices(NODES[0]) == {"1g.10gb": 14}
    (dgx,) = [c for c in kube.capacities(NODES, []) if c.node == "dgx-a100-01"]
    whole, mig = kube.devices(dgx)
    assert (whole.count, whole.offerable) == (6, True)
    assert (mig.name, mig.count, mig.memory_gib, mig.offerable) == (
        "nvidia.com/mig-1g.10gb",
        14,
        10.0,
        False,
    )
    assert "fractional" in str(mig.reason)
    # A node whose every GPU is in MIG mode is listed (for its slices), offering nothing.
    all_mig = {**NODES[0], "status": {**NODES[0]["status"]}}
    all_mig["status"]["allocatable"] = {"nvidia.com/gpu": "0", "nvidia.com/mig-1g.10gb": "56"}
    (cap,) = kube.capacities([all_mig], [])
    assert cap.offerable == 0
    assert [d.offerable for d in kube.devices(cap)] == [False]


@pytest.mark.parametrize(
    ("labels", "model", "refused"),
    [
        ({"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "h100-sxm", None),
        ({"nvidia.com/gpu.product": "Tesla-T4"}, "t4", None),
        ({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"}, None, "MIG slices"),
        ({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-SHARED"}, None, "time-sliced"),
        # GFD wins over the cloud's label; an unknown product falls through to it.
        (
            {
                "nvidia.com/gpu.product": "NVIDIA-L4",
                "cloud.google.com/gke-accelerator": "nvidia-tesla-t4",
            },
            "l4",
            None,
        ),
        (
            {
                "nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090",
                "cloud.google.com/gke-accelerator": "nvidia-l4",
            },
            "l4",
            None,
        ),
        ({"karpenter.k8s.aws/instance-gpu-name": "a10g"}, "a10g", None),
        ({"karpenter.k8s.aws/instance-gpu-name": "mi300x"}, None, None),  # not NVIDIA's
        ({}, None, None),
    ],
)
def test_nvidia_labels(labels: dict[str, str], model: str | None, refused: str | None) -> None:
    got_model, got_refused = kube.model_of(labels, "nvidia.com/gpu")
    assert got_model == model
    assert (got_refused is None) == (refused is None)
    if refused:
        assert refused in str(got_refused)


@pytest.mark.parametrize(
    ("labels", "model"),
    [
        (
            {"beta.amd.com/gpu.device-id.74b5": "4", "beta.amd.com/gpu.device-id.74a1": "4"},
            "mi300x",
        ),
        ({"amd.com/gpu.device-id": "740f"}, "mi210"),
        ({"amd.com/gpu.product-name": "AMD_Instinct_MI250X"}, "mi250x"),
        ({"beta.amd.com/gpu.device-id.740c": "8"}, None),  # MI250 and MI250X share it
    ],
)
def test_amd_labels(labels: dict[str, str], model: str | None) -> None:
    assert kube.model_of(labels, "amd.com/gpu") == (model, None)


@pytest.mark.parametrize(
    ("accelerator", "model"),
    [
        ("tpu-v4-podslice", "tpu-v4"),
        ("tpu-v5-lite-device", "tpu-v5e"),
        ("tpu-v5p-slice", "tpu-v5p"),
        ("tpu-v6e-slice", "tpu-v6e"),
        ("tpu7x", None),
    ],
)
def test_gke_tpu_names(accelerator: str, model: str | None) -> None:
    labels = {"cloud.google.com/gke-tpu-accelerator": accelerator}
    assert kube.model_of(labels, "google.com/tpu") == (model, None)


def test_tolerations_parse_and_match() -> None:
    exists = kube.Toleration.parse("dedicated")
    assert exists.to_api() == {"key": "dedicated", "operator": "Exists"}
    equal = kube.Toleration.parse("dedicated=ml:NoExecute")
    assert equal.to_api() == {
        "key": "dedicated",
        "operator": "Equal",
        "value": "ml",
        "effect": "NoExecute",
    }
    taint = {"key": "dedicated", "value": "ml", "effect": "NoExecute"}
    assert exists.tolerates(taint)
    assert equal.tolerates(taint)
    assert not equal.tolerates({**taint, "effect": "NoSchedule"})
    with pytest.raises(ValueError, match="KEY"):
        kube.Toleration.parse("=x")
    with pytest.raises(ValueError, match="KEY"):
        kube.Toleration.parse("a:Sometimes")


def test_quantities() -> None:
    assert [kube.quantity(q) for q in ("8", 8, "2k", "1e0", "x")] == [8, 8, 2000, 1, 0]
