from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from solver.market import Job, MarketFileError, Offer, dump_market, load_market

OFFER = {
    "id": "o1",
    "vendor": "nvidia",
    "accelerator": "h100-sxm",
    "platform": "cuda",
    "count": 2,
    "memory_gib": 80,
    "tflops_bf16": 989,
    "tflops_fp32": 67,
    "mem_bw_gbps": 3350,
    "price_per_hour": 2.5,
    "region": "europe-west4",
    "country": "NL",
    "lat": 53.4,
    "lon": 6.8,
}
JOB = {
    "id": "j1",
    "platforms": ["cuda"],
    "max_price_per_hour": 3.0,
    "duration_hours": 2,
    "deadline_hours": None,
}


def test_round_trip() -> None:
    market = load_market({"offers": [OFFER], "jobs": [JOB], "weights": {"egress_usd_per_gb": 0.05}})
    assert market.offers[0] == Offer(**OFFER)  # type: ignore[arg-type]
    assert market.jobs[0] == Job(
        id="j1", platforms=("cuda",), max_price_per_hour=3.0, duration_hours=2
    )
    assert market.weights.egress_usd_per_gb == 0.05
    assert load_market(dump_market(market)) == market


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"offers": [{**OFFER, "colour": "red"}]}, "offers[0]: unknown field 'colour'"),
        ({"offers": [{k: v for k, v in OFFER.items() if k != "count"}]}, "missing required"),
        ({"jobs": [{**JOB, "platforms": "cuda"}]}, "jobs[0].platforms: expected a list"),
        ({"jobs": [{**JOB, "accelerators": 1.5}]}, "jobs[0].accelerators: expected an integer"),
        ({"jobs": [{**JOB, "max_price_per_hour": "3"}]}, "expected a number"),
        ({"jobs": [JOB, JOB]}, "duplicate job id 'j1'"),
        ([], "a market file is a JSON object"),
        ({"jobs": [{**JOB, "platforms": []}]}, "jobs[0].platforms: must be a non-empty list"),
        ({"jobs": [{**JOB, "accelerators": 0}]}, "jobs[0].accelerators: must be at least 1"),
        ({"jobs": [{**JOB, "dtype": "fp16"}]}, "jobs[0].dtype: must be bf16 or fp32"),
        ({"offers": [{**OFFER, "efficiency": 0}]}, "offers[0].efficiency: must be in (0, 1]"),
        ({"offers": [{**OFFER, "count": -1}]}, "offers[0].count: must be at least 0"),
    ],
)
def test_bad_files_say_where(data: object, message: str) -> None:
    with pytest.raises(MarketFileError, match=re.escape(message)):
        load_market(data)  # type: ignore[arg-type]


def test_broker_solve_prints_the_answer(tmp_path: Path) -> None:
    path = tmp_path / "market.json"
    path.write_text(
        json.dumps(
            {
                "offers": [OFFER, {**OFFER, "id": "o2", "price_per_hour": 1.5, "count": 1}],
                "jobs": [JOB, {**JOB, "id": "j2"}, {**JOB, "id": "j3", "max_price_per_hour": 1.0}],
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "solve", str(path), "--time-limit", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answer = json.loads(done.stdout)
    assert answer["status"] == "OPTIMAL"
    assert {a["job"]: a["offer"] for a in answer["assignments"]} in (
        {"j1": "o2", "j2": "o1"},
        {"j1": "o1", "j2": "o2"},
    )
    assert answer["unassigned"] == ["j3"]
    assert answer["objective"] == pytest.approx(2 * 10_000 - (1.5 * 2 + 2.5 * 2))
    assert answer["bound"] == pytest.approx(answer["objective"])
    assert answer["solve_seconds"] >= 0


def test_broker_solve_refuses_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "market.json"
    path.write_text("{not json")
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "solve", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "not JSON" in done.stderr
