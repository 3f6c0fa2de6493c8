"""The registry: options to adapters, auto-detection, and discovery that survives failures."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from adapters import registry
from adapters.base import Adapter, AdapterError, Device
from adapters.edge import EdgeAdapter
from adapters.registry import (
    Discovery,
    Options,
    create,
    detect,
    discover,
    discover_all,
    names,
    offerable_counts,
    summary,
)
from adapters.tpu import TpuAdapter
from tests.adapters.conftest import fake_tool

ABSENT = Options(
    nvidia_smi="/nonexistent/nvidia-smi",
    amd_smi="/nonexistent/amd-smi",
    rocm_smi="/nonexistent/rocm-smi",
)


class Fixed:
    """An adapter that finds the devices it is given, or fails as told."""

    name: ClassVar[str] = "fixed"
    vendor: ClassVar[str] = "nvidia"
    platform: ClassVar[str] = "cuda"
    limits: ClassVar[tuple[str, ...]] = ()

    def __init__(self, devices: Sequence[Device] = (), error: Exception | None = None) -> None:
        self.devices = devices
        self.error = error

    def present(self) -> bool:
        return True

    def discover(self) -> Sequence[Device]:
        if self.error is not None:
            raise self.error
        return self.devices


class Hanging(Fixed):
    name: ClassVar[str] = "hanging"

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release

    def discover(self) -> Sequence[Device]:
        self.release.wait(30)
        return []


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # let the stuck worker thread finish after the test


@pytest.fixture
def no_local_tpu_or_jetson(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep "auto" independent of the machine the tests run on.
    monkeypatch.setattr(TpuAdapter, "present", lambda self: self.project is not None)
    monkeypatch.setattr(EdgeAdapter, "present", lambda self: self.config is not None)


def h100(index: str, offerable: bool = True) -> Device:
    return Device(index, "NVIDIA H100 80GB HBM3", "h100-sxm", "cuda", offerable=offerable)


def test_every_vendor_is_registered_and_implements_the_protocol() -> None:
    assert names() == ["nvidia", "amd", "tpu", "edge", "emulated", "cpu"]
    for name in names():
        adapter = create(name)
        assert isinstance(adapter, Adapter)
        assert adapter.name == name
        assert adapter.limits, f"{name} declares what it cannot do"


def test_create_passes_the_options(tmp_path: Path) -> None:
    options = Options(
        data_dir=tmp_path,
        cpu_slots=3,
        edge_config=tmp_path / "edge.json",
        tpu_project="acme-ml",
        tpu_zone="us-west4-a",
        tpu_token="t",
        tpu_api_base="http://127.0.0.1:1",
        nvidia_smi="/opt/nvidia-smi",
        timeout=2.5,
    )

    tpu = create("tpu", options)
    cpu = create("cpu", options)
    nvidia = create("nvidia", options)

    assert isinstance(tpu, TpuAdapter)
    assert (tpu.project, tpu.zone, tpu.token, tpu.api_base, tpu.timeout) == (
        "acme-ml",
        "us-west4-a",
        "t",
        "http://127.0.0.1:1",
        2.5,
    )
    assert vars(cpu)["slots"] == 3
    assert vars(cpu)["data_dir"] == tmp_path
    assert vars(nvidia)["tool"] == "/opt/nvidia-smi"


def test_an_unknown_name_lists_the_choices() -> None:
    with pytest.raises(
        ValueError, match="choose auto or one of nvidia, amd, tpu, edge, emulated, cpu"
    ):
        create("quantum")


def test_auto_with_no_accelerator_falls_back_to_the_cpu(no_local_tpu_or_jetson: None) -> None:
    assert [a.name for a in detect("auto", ABSENT)] == ["cpu"]


def test_auto_picks_the_present_accelerators_and_not_the_cpu(
    tmp_path: Path, no_local_tpu_or_jetson: None
) -> None:
    nvidia_smi = fake_tool(tmp_path, "nvidia-smi")
    options = Options(
        nvidia_smi=str(nvidia_smi),
        amd_smi="/nonexistent/amd-smi",
        rocm_smi="/nonexistent/rocm-smi",
        tpu_project="acme-ml",
    )

    assert [a.name for a in detect("auto", options)] == ["nvidia", "tpu"]


def test_a_named_adapter_is_used_even_when_absent(no_local_tpu_or_jetson: None) -> None:
    [nvidia] = detect("nvidia", ABSENT)

    assert not nvidia.present()
    [found] = discover([nvidia])
    assert found == Discovery("nvidia", "cuda", (), "/nonexistent/nvidia-smi is not installed")


def test_one_failing_hanging_or_crashing_adapter_does_not_stop_the_others(
    release: threading.Event,
) -> None:
    adapters: list[Adapter] = [
        Fixed([h100("0"), h100("1", offerable=False)]),
        Fixed(error=AdapterError("nvidia-smi exited with 9: driver not loaded")),
        Fixed(error=KeyError("gpu")),
        Hanging(release),
    ]

    found = asyncio.run(discover_all(adapters, timeout=0.5))

    ok, failed, crashed, hung = found
    assert ok.ok
    assert len(ok.devices) == 2
    assert failed.error == "nvidia-smi exited with 9: driver not loaded"
    assert crashed.error == "fixed discovery crashed: KeyError: 'gpu'"
    assert hung.error == "hanging discovery did not finish within 0.5 s"
    assert offerable_counts(d for f in found for d in f.devices) == {"h100-sxm": 1}


def test_the_sync_wrapper_returns_despite_a_hung_adapter(release: threading.Event) -> None:
    found = discover([Hanging(release), Fixed([h100("0")])], timeout=0.3)

    assert [f.ok for f in found] == [False, True]


def test_discovery_runs_the_adapters_at_once(release: threading.Event) -> None:
    # Two adapters that each wait for the other: only concurrent runs finish.
    both = threading.Barrier(2, timeout=5)

    class Meeting(Fixed):
        def discover(self) -> Sequence[Device]:
            both.wait()
            return [h100("0")]

    found = discover([Meeting(), Meeting()], timeout=5)

    assert all(f.ok for f in found)


def test_offerable_counts_sum_chips_per_model() -> None:
    devices = [
        h100("0"),
        h100("1"),
        h100("2", offerable=False),
        Device("node-a", "v5litepod-8", "tpu-v5e", "tpu", count=8),
        Device("node-b", "v4-8", "tpu-v4", "tpu", count=4),
        Device("x", "GeForce", None, "cuda"),  # unknown model: never counted
    ]

    assert offerable_counts(devices) == {"h100-sxm": 2, "tpu-v5e": 8, "tpu-v4": 4}


def test_summary_has_a_row_per_device_and_per_failure() -> None:
    found = [
        Discovery("nvidia", "cuda", (h100("0"), h100("1", offerable=False))),
        Discovery("amd", "rocm", error="amd-smi is not installed"),
    ]

    rows = summary(found)

    assert [(r.adapter, r.device, r.status) for r in rows] == [
        ("nvidia", "0", "offered"),
        ("nvidia", "1", "not offered: None"),
        ("amd", "-", "amd-smi is not installed"),
    ]


def test_registering_a_name_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register(TpuAdapter, lambda o: TpuAdapter())
