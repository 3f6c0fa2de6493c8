"""Power readings on recorded tool output, and the integration of a run's energy."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.base import AdapterError
from adapters.power import (
    EnergyMeter,
    RaplCounter,
    parse_amd_power,
    parse_nvidia_power,
    parse_tegrastats_power,
)

SAMPLES = Path(__file__).parent / "samples"


def test_nvidia_power_draw_idle_and_under_load() -> None:
    assert parse_nvidia_power((SAMPLES / "nvidia/h100-power-idle.csv").read_text()) == {0: 69.85}
    assert parse_nvidia_power((SAMPLES / "nvidia/h100-power-load.csv").read_text()) == {0: 631.95}
    assert parse_nvidia_power((SAMPLES / "nvidia/l40s-power-idle.csv").read_text()) == {0: 144.97}


def test_nvidia_boards_that_do_not_report_power_read_as_none() -> None:
    assert parse_nvidia_power("0, [N/A]\n1, [Not Supported]\n2, 250.10\n") == {
        0: None,
        1: None,
        2: 250.1,
    }
    with pytest.raises(AdapterError, match="unexpected line"):
        parse_nvidia_power("index, power.draw [W]\n")


def test_amd_socket_power() -> None:
    assert parse_amd_power((SAMPLES / "amd/radeon-metric-power.json").read_text()) == {0: 9.0}
    assert parse_amd_power('[{"gpu": 1, "power": {"socket_power": "N/A"}}]') == {1: None}
    assert parse_amd_power(
        '[{"gpu": 0, "power": {"socket_power": {"value": 717000, "unit": "mW"}}}]'
    ) == {0: 717.0}
    with pytest.raises(AdapterError, match="not JSON"):
        parse_amd_power("amd-smi: command not found")


def test_jetson_input_rail() -> None:
    line = (SAMPLES / "edge/tegrastats-agx-orin-64gb.txt").read_text().splitlines()[0]
    watts = parse_tegrastats_power(line)
    assert watts is not None
    assert 0 < watts < 100


def _zone(root: Path, name: str, uj: int, span: int) -> Path:
    zone = root / name
    zone.mkdir(exist_ok=True)
    (zone / "energy_uj").write_text(f"{uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{span}\n")
    return zone


def test_rapl_counts_joules_across_packages_and_wrap_arounds(tmp_path: Path) -> None:
    _zone(tmp_path, "intel-rapl:0", 900_000_000, 1_000_000_000)
    _zone(tmp_path, "intel-rapl:1", 5_000_000, 1_000_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 1, 10)  # a subzone (core): inside its package
    counter = RaplCounter(tmp_path)
    assert counter.joules() == 0.0
    _zone(tmp_path, "intel-rapl:0", 50_000_000, 1_000_000_000)  # wrapped: +150,000,001 uJ
    _zone(tmp_path, "intel-rapl:1", 15_000_000, 1_000_000_000)  # +10 J
    assert counter.joules() == pytest.approx(150.000001 + 10.0)
    assert RaplCounter(tmp_path / "absent").joules() is None


def test_unreadable_rapl_is_none(tmp_path: Path) -> None:
    zone = _zone(tmp_path, "intel-rapl:0", 1, 10)
    (zone / "energy_uj").unlink()  # what a non-root agent meets: no reading
    assert RaplCounter(tmp_path).joules() is None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_runs_energy_counts_its_busiest_devices_over_the_run() -> None:
    clock = Clock()
    readings = {0: 60.0, 1: 400.0, 2: 60.0, 3: 400.0}  # two busy of four
    meter = EnergyMeter(2, watts=lambda: readings, clock=clock)
    for _ in range(36):
        clock.now += 1.0
        meter.sample()
    # 800 W for 36 s: 28,800 J = 0.008 kWh; the idle boards are not the run's.
    assert meter.kwh() == pytest.approx(0.008)


def test_gaps_in_the_readings_leave_the_run_unmeasured() -> None:
    clock = Clock()
    answers = iter([{0: 100.0}] + [None] * 10 + [{0: 100.0}] * 3)
    meter = EnergyMeter(1, watts=lambda: next(answers), clock=clock)
    for _ in range(12):
        clock.now += 1.0
        meter.sample()
    assert meter.kwh() is None  # 1 s of 13 covered


def test_a_counter_gives_the_energy_between_its_readings() -> None:
    clock, joules = Clock(), iter([10.0, 70.0, 130.0, 190.0])
    meter = EnergyMeter(1, joules=lambda: next(joules), clock=clock)
    clock.now = 1.0
    meter.sample()
    clock.now = 2.0
    meter.sample()
    clock.now = 3.0
    assert meter.kwh() == pytest.approx(180 / 3.6e6)
    with pytest.raises(ValueError, match="one of them"):
        EnergyMeter(1)
