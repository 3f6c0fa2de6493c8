"""The NVIDIA adapter against recorded nvidia-smi output (see samples/SOURCES.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapters.base import AdapterError
from adapters.nvidia import NvidiaAdapter, parse_query_gpu
from adapters.registry import offerable_counts
from tests.adapters.conftest import fake_tool, sample


def test_two_h100s_one_busy_offers_the_idle_one() -> None:
    devices = parse_query_gpu(
        sample("nvidia/h100-x2-one-busy.csv"), sample("nvidia/h100-load-compute-apps.csv")
    )

    busy, idle = devices
    assert (idle.id, idle.model, idle.platform, idle.offerable) == ("1", "h100-sxm", "cuda", True)
    assert idle.memory_gib == pytest.approx(81559 / 1024)
    assert idle.utilization == 0
    assert not busy.offerable
    assert busy.reason is not None
    assert "3 compute processes" in busy.reason
    assert busy.utilization == 1.0
    assert offerable_counts(devices) == {"h100-sxm": 1}


def test_idle_h100_and_h200_are_offered_with_their_memory() -> None:
    [h100] = parse_query_gpu(
        sample("nvidia/h100-idle.csv"), sample("nvidia/h100-idle-compute-apps.csv")
    )
    [h200] = parse_query_gpu(sample("nvidia/h200-idle.csv"))

    assert h100.offerable
    assert h100.healthy
    assert h100.extra["compute_processes"] == "0"
    assert (h200.model, h200.offerable) == ("h200", True)
    assert h200.memory_gib == pytest.approx(143771 / 1024)


def test_a_gpu_busy_only_by_utilisation_is_not_offered() -> None:
    # The load capture without its process list: 100% utilisation alone is enough.
    [gpu] = parse_query_gpu(sample("nvidia/h100-load.csv"))

    assert not gpu.offerable
    assert gpu.reason == "busy: 100% utilisation, 24% of memory in use"


@pytest.mark.parametrize(
    ("gpu_sample", "apps_sample", "model"),
    [
        ("nvidia/h100-mig-load.csv", "nvidia/h100-mig-load-compute-apps.csv", "h100-sxm"),
        ("nvidia/a100-sxm4-80gb-mig.csv", None, "a100-80gb"),
    ],
)
def test_mig_enabled_gpus_wait_for_their_instances(
    gpu_sample: str, apps_sample: str | None, model: str
) -> None:
    [gpu] = parse_query_gpu(sample(gpu_sample), sample(apps_sample) if apps_sample else "")

    assert gpu.model == model
    assert gpu.healthy  # [N/A] fields under MIG are not errors
    assert gpu.utilization is None
    # In MIG mode: sold as its instances (read next), whatever runs on the others.
    assert gpu.mig == ()
    assert gpu.offerable
    assert offerable_counts([gpu]) == {model: 1}


def _mig_tool(tmp_path: Path, lgi: str | None) -> NvidiaAdapter:
    outputs = {
        "--query-gpu=index,uuid,name": "nvidia/a100-40gb-mig.csv",
        "--query-compute-apps=gpu_uuid,pid,used_memory": "nvidia/h100-idle-compute-apps.csv",
    }
    if lgi is not None:
        outputs["mig -lgi"] = lgi
    outputs["-L"] = "nvidia/a100-40gb-mig-L.txt"
    return NvidiaAdapter(tool=str(fake_tool(tmp_path, "nvidia-smi", outputs)), timeout=10)


def test_a_gpu_in_mig_mode_is_offered_as_the_instances_cut(tmp_path: Path) -> None:
    [gpu] = _mig_tool(tmp_path, "nvidia/a100-40gb-mig-lgi-3g-3g.txt").discover()

    assert (gpu.model, gpu.offerable, gpu.reason) == ("a100-40gb", True, None)
    # GI 1 sits at slot 4 and is MIG device 0; GI 2 at slot 0, device 1 (as -L lists them).
    assert gpu.mig == (
        ("3g.20gb@4", "MIG-c7384736-a75d-5afc-978f-d2f1294409fd"),
        ("3g.20gb@0", "MIG-a28ad590-3fda-56dd-84fc-0a0b96edc58d"),
    )


def test_instances_without_a_device_are_not_offered(tmp_path: Path) -> None:
    # The 4-2-1 layout, with the listing of another (3g + 3g): no instance has a UUID
    # to run on, and nothing at all is cut when -lgi finds none (it exits non-zero).
    for lgi in ("nvidia/a100-40gb-mig-lgi-4-2-1.txt", None):
        [gpu] = _mig_tool(tmp_path, lgi).discover()
        assert gpu.mig == ()
        assert not gpu.offerable
        assert gpu.reason is not None
        assert "no instance is cut" in gpu.reason


def test_a_consumer_card_is_unknown_to_the_catalog() -> None:
    [gpu] = parse_query_gpu(sample("nvidia/rtx-4080-super-idle.csv"))

    assert gpu.model is None
    assert gpu.healthy  # [N/A] ECC on a card without ECC is not a fault
    assert gpu.reason == "NVIDIA GeForce RTX 4080 SUPER is not in the hardware catalog"


def test_ecc_errors_pending_remaps_and_driver_errors_make_a_gpu_unhealthy() -> None:
    row = sample("nvidia/h100-idle.csv").strip()
    ecc = row.replace("Disabled, 0, [N/A], No, No", "Disabled, 2, [N/A], Yes, No")
    lost = row.replace("81559, 0, 0", "81559, [GPU requires reset], 0")

    [bad, gone] = parse_query_gpu(f"{ecc}\n{lost}\n")

    assert not bad.healthy
    assert not bad.offerable
    assert bad.reason is not None
    assert "2 uncorrectable ECC errors" in bad.reason
    assert "remapped" in bad.reason
    assert not gone.healthy
    assert gone.reason == "unhealthy: memory.used reads [GPU requires reset]"


def test_output_with_other_columns_is_refused() -> None:
    with pytest.raises(AdapterError, match="printed 3 columns, expected 11"):
        parse_query_gpu("0, NVIDIA H100 80GB HBM3, 81559\n")


def test_discover_runs_both_queries_of_the_tool(tmp_path: Path) -> None:
    tool = fake_tool(
        tmp_path,
        "nvidia-smi",
        {
            "--query-gpu=index,uuid,name": "nvidia/h100-x2-one-busy.csv",
            "--query-compute-apps=gpu_uuid,pid,used_memory": "nvidia/h100-load-compute-apps.csv",
        },
    )
    adapter = NvidiaAdapter(tool=str(tool), timeout=10)

    assert adapter.present()
    devices = adapter.discover()

    assert [d.offerable for d in devices] == [False, True]


def test_a_failing_tool_says_why(tmp_path: Path) -> None:
    message = (
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
        "Make sure that the latest NVIDIA driver is installed and running.\n"
    )
    tool = fake_tool(tmp_path, "nvidia-smi", exit_code=9, stderr=message)

    with pytest.raises(AdapterError, match="exited with 9: NVIDIA-SMI has failed"):
        NvidiaAdapter(tool=str(tool)).discover()


def test_a_hanging_tool_times_out(tmp_path: Path) -> None:
    tool = fake_tool(tmp_path, "nvidia-smi", hang=True)

    with pytest.raises(AdapterError, match=r"did not answer within 0\.5 s"):
        NvidiaAdapter(tool=str(tool), timeout=0.5).discover()


def test_a_missing_tool_is_not_present() -> None:
    adapter = NvidiaAdapter(tool="/nonexistent/nvidia-smi")

    assert not adapter.present()
    with pytest.raises(AdapterError, match="is not installed"):
        adapter.discover()


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no nvidia-smi on this machine")
def test_the_real_nvidia_smi() -> None:
    devices = NvidiaAdapter().discover()

    assert devices, "nvidia-smi ran but listed no GPU"
    for device in devices:
        assert device.platform == "cuda"
        assert device.name
        assert device.memory_gib is not None
        assert device.memory_gib > 0
        assert device.offerable == (device.reason is None)
