"""The CPU adapter: calibrated figures from DATA_DIR, else the catalog's cpu row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters import catalog
from adapters.base import AdapterError
from adapters.cpu import CpuAdapter, memory_gib
from adapters.registry import offerable_counts
from tests.adapters.conftest import SAMPLES, sample

MEMINFO = SAMPLES / "cpu/meminfo.txt"


@pytest.fixture
def calibrated(tmp_path: Path) -> Path:
    (tmp_path / "calibration.json").write_text(sample("cpu/calibration.json"))
    return tmp_path


def test_the_calibration_gives_the_figures(calibrated: Path) -> None:
    [host] = CpuAdapter(data_dir=calibrated, meminfo=MEMINFO).discover()

    saved = json.loads(sample("cpu/calibration.json"))
    assert (host.model, host.platform, host.count, host.offerable) == ("cpu", "cpu", 1, True)
    assert host.name == saved["cpu"]
    assert (host.tflops_fp32, host.tflops_bf16, host.mem_bw_gbps) == (
        saved["tflops_fp32"],
        saved["tflops_bf16"],
        saved["mem_bw_gbps"],
    )
    assert host.memory_gib == pytest.approx(24684096 / 2**20)  # MemTotal, now
    assert host.extra["calibrated"] == "yes"
    assert host.extra["cores"] == "2"
    assert offerable_counts([host]) == {"cpu": 1}


def test_without_a_calibration_the_catalog_row_stands_in(tmp_path: Path) -> None:
    [host] = CpuAdapter(data_dir=tmp_path, meminfo=MEMINFO).discover()

    row = catalog.lookup("cpu")
    assert row is not None
    assert (host.tflops_fp32, host.tflops_bf16, host.mem_bw_gbps) == (
        row.tflops_fp32,
        row.tflops_bf16,
        row.mem_bw_gbps,
    )
    assert host.extra["calibrated"] == "no"


def test_slots_share_the_host(calibrated: Path) -> None:
    [one] = CpuAdapter(data_dir=calibrated, meminfo=MEMINFO).discover()
    [four] = CpuAdapter(data_dir=calibrated, slots=4, meminfo=MEMINFO).discover()

    assert one.memory_gib is not None
    assert one.tflops_fp32 is not None
    assert four.count == 4
    assert four.memory_gib == pytest.approx(one.memory_gib / 4)
    assert four.tflops_fp32 == pytest.approx(one.tflops_fp32 / 4)
    assert offerable_counts([four]) == {"cpu": 4}


def test_zero_slots_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="at least 1"):
        CpuAdapter(data_dir=tmp_path, slots=0).discover()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"tflops_fp32": 0.03, "tflops_bf16": 0.04}', "mem_bw_gbps must be a positive number"),
        ('{"tflops_fp32": -1, "tflops_bf16": 1, "mem_bw_gbps": 1}', "tflops_fp32 must be"),
    ],
)
def test_a_broken_calibration_says_to_run_calibrate_again(
    tmp_path: Path, text: str, message: str
) -> None:
    (tmp_path / "calibration.json").write_text(text)

    with pytest.raises(AdapterError, match=message) as caught:
        CpuAdapter(data_dir=tmp_path).discover()
    assert "run `broker calibrate` again" in str(caught.value)


def test_memory_from_meminfo_or_sysconf(tmp_path: Path) -> None:
    assert memory_gib(sample("cpu/meminfo.txt")) == pytest.approx(23.54, abs=0.01)
    # No /proc/meminfo (not Linux): os.sysconf gives the physical memory.
    [host] = CpuAdapter(meminfo=tmp_path / "absent").discover()
    assert host.memory_gib is not None
    assert host.memory_gib > 0


def test_always_present() -> None:
    assert CpuAdapter().present()
