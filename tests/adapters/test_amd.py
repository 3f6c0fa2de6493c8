"""The AMD adapter against recorded amd-smi and rocm-smi output (see samples/SOURCES.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.amd import AmdAdapter, parse_amd_smi, parse_rocm_smi
from adapters.base import AdapterError
from adapters.registry import offerable_counts
from tests.adapters.conftest import fake_tool, sample

STATIC = "amd/mi300x-8x-static.json"
METRIC = "amd/mi300x-8x-metric.json"


def test_eight_mi300x_from_amd_smi_static_alone() -> None:
    devices = parse_amd_smi(sample(STATIC))

    assert [d.id for d in devices] == [str(i) for i in range(8)]
    for device in devices:
        assert (device.name, device.model, device.platform) == (
            "AMD Instinct MI300X",
            "mi300x",
            "rocm",
        )
        assert device.memory_gib == pytest.approx(196592 / 1024)
        assert device.offerable
        assert device.healthy
    assert devices[0].extra["bdf"] == "0000:1b:00.0"
    assert offerable_counts(devices) == {"mi300x": 8}


def test_metrics_mark_busy_and_unhealthy_gpus() -> None:
    devices = parse_amd_smi(sample(STATIC), sample(METRIC))

    reasons = {d.id: d.reason for d in devices if not d.offerable}
    assert reasons == {
        "0": "busy: 100% graphics activity, 10% of memory in use",
        "3": "busy: 17% of memory in use",
        "6": "unhealthy: 2 uncorrectable ECC errors",
    }
    assert devices[1].utilization == 0.0
    assert not devices[6].healthy
    assert offerable_counts(devices) == {"mi300x": 5}


def test_the_pre_rocm_7_list_shape_and_a_permission_banner() -> None:
    # Before ROCm 7.0 amd-smi printed a bare list; without render-group access it
    # prints a warning first. Both built around the recorded GPUs.
    entries = json.loads(sample(STATIC))["gpu_data"]
    text = "WARNING: User is missing the following required groups: render, video\n"
    text += json.dumps(entries)

    assert offerable_counts(parse_amd_smi(text)) == {"mi300x": 8}


def test_partitioned_mi300x_and_bad_pages_are_not_offered() -> None:
    # In CPX mode each MI300X shows as 8 GPUs of 24 GiB: the recorded GPU 0 with
    # its VRAM cut to an eighth; GPU 1 with its bad-page threshold exceeded.
    entries = json.loads(sample(STATIC))["gpu_data"][:2]
    entries[0]["vram"]["size"]["value"] = 196592 // 8
    entries[1]["ras"]["bad_page_threshold_exceeded"] = "True"

    cpx, bad = parse_amd_smi(json.dumps({"gpu_data": entries}))

    assert cpx.reason == "a compute partition of a larger GPU; partitions are not offered"
    assert not bad.healthy
    assert bad.reason == "unhealthy: retired memory pages exceed the bad-page threshold"


def _partitioned(mode: str, count: int, first_says: str, others_say: str) -> str:
    """The recorded GPU 0 as ``count`` logical GPUs of one MI300X, as amd-smi lists a
    partitioned one (ROCm/amdsmi#132: the functions of one PCI address, the first
    with its mode, the others "N/A", each with its share of the memory)."""
    recorded = json.loads(sample(STATIC))["gpu_data"]
    entries = []
    for k in range(count):
        entry = json.loads(json.dumps(recorded[0]))
        entry["gpu"] = k
        entry["bus"]["bdf"] = f"0000:05:00.{k}"
        entry["partition"] = {
            "compute_partition": first_says if k == 0 else others_say,
            "memory_partition": "NPS1" if k == 0 else "N/A",
        }
        if k:
            entry["vram"]["size"]["value"] = 196592 // count
        entries.append(entry)
    # A whole MI300X next to it, as recorded.
    entries.append({**recorded[1], "gpu": count})
    return json.dumps({"gpu_data": entries})


@pytest.mark.parametrize(
    ("mode", "count", "profile", "width"), [("DPX", 2, "dpx.96gb", 4), ("CPX", 8, "cpx.24gb", 1)]
)
def test_a_partitioned_mi300x_is_sold_as_its_partitions(
    mode: str, count: int, profile: str, width: int
) -> None:
    partitioned, whole = parse_amd_smi(_partitioned(mode, count, mode, "N/A"))

    assert (partitioned.id, partitioned.model, partitioned.offerable) == (
        "0000:05:00",
        "mi300x",
        True,
    )
    assert partitioned.memory_gib == 192  # the whole GPU's, from the catalog
    # Each partition at its first XCD, with the logical GPU's index to run on.
    assert partitioned.mig == tuple((f"{profile}@{k * width}", str(k)) for k in range(count))
    assert partitioned.extra["compute_partition"] == mode
    assert whole.mig is None
    assert whole.id == str(count)
    assert offerable_counts([whole]) == {"mi300x": 1}


def test_partitions_that_do_not_say_their_mode_are_known_by_their_number() -> None:
    # Every logical GPU says N/A: four functions of one address are a QPX GPU.
    partitioned, _ = parse_amd_smi(_partitioned("QPX", 4, "N/A", "N/A"))

    assert [spec for spec, _ in partitioned.mig or ()] == [
        "qpx.48gb@0", "qpx.48gb@2", "qpx.48gb@4", "qpx.48gb@6"
    ]  # fmt: skip


def test_an_older_amd_smi_market_name_resolves() -> None:
    # amd-smi 24.x printed MARKET_NAME "MI300X-O" (AMD's amd-smi blog post).
    entries = json.loads(sample(STATIC))["gpu_data"][:1]
    entries[0]["asic"]["market_name"] = "MI300X-O"

    [gpu] = parse_amd_smi(json.dumps(entries))

    assert gpu.model == "mi300x"


def test_rocm_smi_mi210() -> None:
    [gpu] = parse_rocm_smi(sample("amd/rocm-smi-mi210.json"))

    assert (gpu.model, gpu.offerable, gpu.utilization) == ("mi210", True, 0.0)
    assert gpu.memory_gib == pytest.approx(68702699520 / 2**30)


def test_rocm_smi_unknown_radeon() -> None:
    [gpu] = parse_rocm_smi(sample("amd/rocm-smi-rx7900xt.json"))

    assert gpu.model is None
    assert gpu.reason == "Radeon RX 7900 XT is not in the hardware catalog"


def test_a_lone_mi250x_gcd_is_listed_but_not_offered() -> None:
    # The recorded board string names no product; the PCI ID 0x7408 does.
    [gcd] = parse_rocm_smi(sample("amd/rocm-smi-mi250x-gcd.json"))

    assert gcd.model == "mi250x"
    assert not gcd.offerable
    assert gcd.reason is not None
    assert "partner GCD is not visible" in gcd.reason


def test_two_mi250x_gcds_make_one_offered_package() -> None:
    # The recorded GCD twice, as the two GCDs of one package (card1: next node id),
    # each with the 64 GiB a GCD reports.
    gcd = json.loads(sample("amd/rocm-smi-mi250x-gcd.json"))["card0"]
    gcd["VRAM Total Memory (B)"] = str(64 * 2**30)
    cards = {"card0": gcd, "card1": {**gcd, "Node ID": "8"}}

    [package] = parse_rocm_smi(json.dumps(cards))

    assert (package.id, package.model, package.offerable) == ("0+1", "mi250x", True)
    assert package.memory_gib == 128
    assert offerable_counts([package]) == {"mi250x": 1}


def test_rocm_smi_without_gpus_says_so() -> None:
    with pytest.raises(AdapterError, match="rocm-smi printed no JSON"):
        parse_rocm_smi("WARNING: No JSON data to report\n")


def test_discover_through_amd_smi(tmp_path: Path) -> None:
    amd_smi = fake_tool(tmp_path, "amd-smi", {"static": STATIC, "metric": METRIC})
    adapter = AmdAdapter(amd_smi=str(amd_smi), rocm_smi=str(tmp_path / "none"))

    assert adapter.present()
    assert offerable_counts(adapter.discover()) == {"mi300x": 5}


def test_discover_falls_back_to_rocm_smi_when_amd_smi_fails(tmp_path: Path) -> None:
    amd_smi = fake_tool(tmp_path, "amd-smi", exit_code=1, stderr="AMDSMI_STATUS_INIT_ERROR\n")
    rocm_smi = fake_tool(
        tmp_path, "rocm-smi", {"--showproductname --showuse": "amd/rocm-smi-mi210.json"}
    )
    adapter = AmdAdapter(amd_smi=str(amd_smi), rocm_smi=str(rocm_smi))

    assert offerable_counts(adapter.discover()) == {"mi210": 1}


def test_discover_falls_back_when_amd_smi_hangs(tmp_path: Path) -> None:
    amd_smi = fake_tool(tmp_path, "amd-smi", hang=True)
    rocm_smi = fake_tool(tmp_path, "rocm-smi", {"": "amd/rocm-smi-mi210.json"})
    # The same limit covers the fallback, which must answer within it on a busy machine.
    adapter = AmdAdapter(amd_smi=str(amd_smi), rocm_smi=str(rocm_smi), timeout=5)

    assert [d.model for d in adapter.discover()] == ["mi210"]


def test_discover_reports_both_failures(tmp_path: Path) -> None:
    amd_smi = fake_tool(tmp_path, "amd-smi", exit_code=1, stderr="AMDSMI_STATUS_INIT_ERROR\n")
    rocm_smi = fake_tool(tmp_path, "rocm-smi", exit_code=2, stderr="ERROR: driver not loaded\n")
    adapter = AmdAdapter(amd_smi=str(amd_smi), rocm_smi=str(rocm_smi))

    with pytest.raises(AdapterError, match=r"exited with 1: AMDSMI.*exited with 2: ERROR"):
        adapter.discover()


def test_no_tool_installed() -> None:
    adapter = AmdAdapter(amd_smi="/nonexistent/amd-smi", rocm_smi="/nonexistent/rocm-smi")

    assert not adapter.present()
    with pytest.raises(AdapterError, match=r"neither .* nor .* is installed"):
        adapter.discover()
