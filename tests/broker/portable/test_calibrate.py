from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from broker.cli import app
from broker.portable import calibrate


def test_quick_calibration_measures_and_compares(tmp_path: Path) -> None:
    result = calibrate.calibrate(quick=True)
    assert result.tflops_fp32 > 0
    assert result.tflops_bf16 > 0
    assert result.mem_bw_gbps > 0
    (ref,) = result.references
    assert ref.flops > 0
    assert ref.measured_s > 0
    assert ref.predicted_s > 0
    assert 0 < result.efficiency <= 1
    assert "pred/meas" in calibrate.report(result)
    path = calibrate.save(result, tmp_path)
    loaded = calibrate.load(tmp_path)
    assert path.name == "calibration.json"
    assert loaded is not None
    assert loaded["tflops_fp32"] == result.tflops_fp32
    assert loaded["references"][0]["ratio"] == ref.ratio
    assert calibrate.load(tmp_path / "nowhere") is None


def test_calibrate_command_prints_the_table(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BROKER_DATA_DIR", str(tmp_path))
    from broker.config import get_settings

    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(app, ["calibrate", "--quick"])
    finally:
        get_settings.cache_clear()
    assert out.exit_code == 0, out.output
    assert "GFLOP/s fp32" in out.output
    assert (tmp_path / "calibration.json").is_file()
