"""The edge adapter: a Jetson's device-tree model and tegrastats, and the config file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.base import AdapterError, Location
from adapters.edge import (
    EdgeAdapter,
    jetson_device,
    jetson_model,
    parse_config,
    parse_tegrastats,
)
from adapters.registry import offerable_counts
from tests.adapters.conftest import SAMPLES, fake_tool, sample

TEGRASTATS = "edge/tegrastats-agx-orin-64gb.txt"
BERLIN = {"location": {"lat": 52.52, "lon": 13.405, "country": "DE"}, "power_budget_w": 40}


def test_tegrastats_line_of_a_64gb_agx_orin() -> None:
    figures = parse_tegrastats(sample(TEGRASTATS))

    assert figures["ram_total_mib"] == 62801
    assert figures["ram_used_mib"] == 4321
    assert figures["gpu_load"] == 0.0
    # VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0: 2340 + 390 + 4025 mW
    assert figures["power_w"] == pytest.approx(6.755)


@pytest.mark.parametrize(
    ("fragment", "load"),
    [("GR3D_FREQ 12%@[1300,1300]", 0.12), ("GR3D_FREQ 0%@1377", 0.0), ("GR3D_FREQ 77%", 0.77)],
)
def test_gr3d_load_in_every_jetpack_spelling(fragment: str, load: float) -> None:
    assert parse_tegrastats(f"RAM 4722/7844MB (lfb 1x512kB) {fragment} APE 150")["gpu_load"] == load


@pytest.mark.parametrize(
    ("model_file", "ram_gib", "key"),
    [
        ("edge/agx-orin-devkit.model", 61.3, "jetson-agx-orin"),
        ("edge/agx-orin-devkit.model", 29.8, None),  # the 32 GB AGX Orin: not the catalog's
        ("edge/orin-nano-devkit.model", 7.4, "jetson-orin-nano"),
        ("edge/orin-nano-devkit.model", 3.6, None),  # the 4 GB Orin Nano
        ("edge/orin-nano-devkit.model", None, None),  # RAM unknown: cannot tell
    ],
)
def test_jetson_model_needs_the_name_and_the_ram(
    model_file: str, ram_gib: float | None, key: str | None
) -> None:
    assert jetson_model(sample(model_file), ram_gib) == key


def test_an_idle_located_agx_orin_is_offered() -> None:
    device = jetson_device(sample("edge/agx-orin-devkit.model"), sample(TEGRASTATS), BERLIN)

    assert device.name == "NVIDIA Jetson AGX Orin Developer Kit"
    assert (device.model, device.platform, device.offerable) == ("jetson-agx-orin", "cuda", True)
    assert device.memory_gib == pytest.approx(62801 / 1024)
    assert device.location == Location(52.52, 13.405, "DE")
    assert device.power_w == 40
    assert device.extra["power_now_w"] == "6.8"


def test_a_busy_or_unlocated_jetson_is_not_offered() -> None:
    busy_line = sample(TEGRASTATS).replace("GR3D_FREQ 0%@[0,0]", "GR3D_FREQ 99%@[1300,1300]")

    busy = jetson_device(sample("edge/agx-orin-devkit.model"), busy_line, BERLIN)
    nowhere = jetson_device(sample("edge/agx-orin-devkit.model"), sample(TEGRASTATS), {})

    assert busy.reason == "busy: GR3D at 99%"
    assert nowhere.reason == "no location configured (board.location in the edge config)"


def test_the_config_lists_devices_with_location_and_power() -> None:
    board, devices = parse_config(sample("edge/config.json"))

    assert board["power_budget_w"] == 40
    gate, shelf, coral, van = devices
    assert (gate.model, gate.location, gate.power_w) == (
        "jetson-orin-nano",
        Location(48.1372, 11.5756, "DE", "Munich"),
        15,
    )
    assert (shelf.model, shelf.count, shelf.location and shelf.location.country) == (
        "jetson-agx-orin",
        2,
        "IT",
    )
    assert coral.reason == "'coral-edge-tpu' is not in the hardware catalog"
    assert van.reason == "no location configured"
    assert all(d.platform == "cuda" for d in (gate, shelf))
    assert offerable_counts(devices) == {"jetson-orin-nano": 1, "jetson-agx-orin": 2}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"location": {"lat": 95, "lon": 0, "country": "DE"}}, r"devices\[0\].location.lat"),
        ({"location": {"lat": 1, "lon": 2, "country": "Germany"}}, "two-letter ISO 3166"),
        ({"power_budget_w": -5}, r"devices\[0\].power_budget_w must be a positive"),
        ({"count": 0}, r"devices\[0\].count must be a whole number"),
    ],
)
def test_config_mistakes_name_the_field(change: dict[str, object], message: str) -> None:
    doc = {"devices": [{"id": "a", "model": "jetson-orin-nano", **change}]}

    with pytest.raises(AdapterError, match=message):
        parse_config(json.dumps(doc), "edge.json")


def test_a_config_that_is_not_json_is_refused() -> None:
    with pytest.raises(AdapterError, match=r"edge\.json is not valid JSON"):
        parse_config("{devices: []}", "edge.json")


def _board(tmp_path: Path, tegrastats: Path, config: Path | None = None) -> EdgeAdapter:
    return EdgeAdapter(
        config=config,
        tegrastats=str(tegrastats),
        model_path=SAMPLES / "edge/agx-orin-devkit.model",
        meminfo=tmp_path / "no-meminfo",
        timeout=5,
    )


def test_discover_on_a_jetson_reads_one_tegrastats_line(tmp_path: Path) -> None:
    # tegrastats never exits: the fake prints its line every 0.2 s until stopped.
    tool = fake_tool(tmp_path, "tegrastats", {"--interval": TEGRASTATS}, repeat_every=0.2)
    config = tmp_path / "edge.json"
    config.write_text(sample("edge/config.json"))
    adapter = _board(tmp_path, tool, config)

    assert adapter.present()
    jetson, *others = adapter.discover()

    assert (jetson.id, jetson.model, jetson.offerable) == ("jetson", "jetson-agx-orin", True)
    assert jetson.location is not None
    assert jetson.location.region == "Berlin"
    assert [d.id for d in others] == ["gate-7", "shelf-2", "coral-1", "van-3"]


def test_a_hanging_tegrastats_leaves_the_board_listed_and_the_config_counted(
    tmp_path: Path,
) -> None:
    tool = fake_tool(tmp_path, "tegrastats", hang=True)
    config = tmp_path / "edge.json"
    config.write_text(sample("edge/config.json"))
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       64308224 kB\n")  # a 64 GB AGX Orin's MemTotal
    adapter = EdgeAdapter(
        config=config,
        tegrastats=str(tool),
        model_path=SAMPLES / "edge/agx-orin-devkit.model",
        meminfo=meminfo,
        timeout=0.5,
    )

    jetson, *others = adapter.discover()

    assert jetson.model == "jetson-agx-orin"  # RAM from /proc/meminfo
    assert not jetson.offerable
    assert jetson.reason == "tegrastats failed: " + f"{tool} printed nothing within 0.5 s"
    assert offerable_counts(others) == {"jetson-orin-nano": 1, "jetson-agx-orin": 2}


def test_a_missing_tegrastats_is_reported_on_the_board(tmp_path: Path) -> None:
    adapter = _board(tmp_path, tmp_path / "no-tegrastats")

    [jetson] = adapter.discover()

    assert jetson.reason is not None
    assert "is not installed" in jetson.reason


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    adapter = EdgeAdapter(config=tmp_path / "absent.json", model_path=tmp_path / "no-model")

    assert adapter.present()  # configured, so the agent runs it and reports the problem
    with pytest.raises(AdapterError, match="cannot read the edge config"):
        adapter.discover()


def test_not_a_jetson_and_no_config_is_not_present(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_text("Raspberry Pi 5 Model B Rev 1.0\x00")

    assert not EdgeAdapter(model_path=model).present()
    assert EdgeAdapter(model_path=model).discover() == []
