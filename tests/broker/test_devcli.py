"""The developer CLI against a live broker: submit a function from a file, watch it
run, read it back; every refusal one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from broker.cli import app
from broker.config import get_settings
from broker.db import transaction
from broker.devcli import UserError, parse_args
from broker.market.clearing import run_round
from broker.models.account import Role
from broker.sdk import ProviderClient, run_allocation
from tests.factories import make_account, offer_body

HELLO = str(Path(__file__).resolve().parents[2] / "examples" / "hello.py")
ARGS = "[[[0.5, -1.0], [1.0, 0.25]], [[1.0, 2.0], [3.0, 4.0]]]"


@pytest.fixture
def world(live_url: str, fresh_engine: Engine) -> Iterator[dict[str, Any]]:
    with transaction(fresh_engine) as session:
        _, dev_key = make_account(session, Role.developer)
        _, prov_key = make_account(session, Role.provider)
    provider = ProviderClient(live_url, prov_key, retries=1)
    cpu = offer_body(accelerator="cpu-core", count=1, price_per_hour="0.50")
    provider.http.json("POST", "/v1/offers", json=cpu)
    env = {"BROKER_URL": live_url, "BROKER_API_KEY": dev_key, "BROKER_API_KEY_FILE": ""}
    yield {"env": env, "provider": provider, "engine": fresh_engine}
    provider.close()


def broker(world: dict[str, Any], *args: str, **env: str) -> Any:
    return CliRunner().invoke(app, list(args), env={**world["env"], **env})


def test_submit_run_and_read_a_job(world: dict[str, Any]) -> None:
    submitted = broker(
        world, "jobs", "submit", f"{HELLO}:predict", "--args", ARGS, "--max-price", "2.50",
        "--platform", "cpu", "--name", "hello",
    )  # fmt: skip
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("job_")

    run_round(world["engine"], get_settings(), "manual")
    provider = world["provider"]
    assert [run_allocation(provider, order) for order in provider.work()] == ["succeeded"]

    shown = broker(world, "jobs", "show", job_id)
    assert shown.exit_code == 0, shown.output
    assert "succeeded" in shown.stdout
    assert "runs on      cpu in europe-west4 (NL)" in shown.stdout
    logs = broker(world, "jobs", "logs", job_id)
    assert "matched to 1 x cpu in europe-west4 at $0.50/h" in logs.stdout
    assert "started" in logs.stdout
    # The run's own log, as its agent reported it: fetching, compiling, the end.
    assert "fetched the program (" in logs.stdout
    assert "compiled for cpu in " in logs.stdout
    assert "the run succeeded" in logs.stdout
    as_json = json.loads(broker(world, "jobs", "logs", job_id, "--json").stdout)
    assert [line["seq"] for line in as_json["log"]] == list(range(len(as_json["log"])))
    listed = json.loads(broker(world, "jobs", "list", "--json").stdout)
    assert [(j["id"], j["name"], j["state"]) for j in listed["items"]] == [
        (job_id, "hello", "succeeded")
    ]
    assert "$0.50/h" in broker(world, "offers", "list").stdout
    assert "cpu" in broker(world, "market", "book").stdout
    # One finished run of a program is fewer than a band needs to correct anything.
    bands = json.loads(broker(world, "market", "estimates", "--json").stdout)
    assert [(b["model"], b["runs"], b["correction"]) for b in bands] == [("cpu", 1, 1.0)]
    assert "metered/est" in broker(world, "market", "estimates").stdout
    assert broker(world, "invoices", "list").exit_code == 0


def test_submit_a_part_of_an_accelerator(world: dict[str, Any]) -> None:
    shared = offer_body(
        accelerator="cpu",
        count=1,
        price_per_hour="0.40",
        kind="shared",
        shares=4,
        memory_per_share_gib=1,
    )
    world["provider"].http.json("POST", "/v1/offers", json=shared)
    submitted = broker(
        world, "jobs", "submit", f"{HELLO}:predict", "--args", ARGS, "--max-price", "2.50",
        "--platform", "cpu", "--accelerators", "0.25", "--accepts-shared", "--json",
    )  # fmt: skip
    assert submitted.exit_code == 0, submitted.output
    job = json.loads(submitted.stdout)
    assert (job["accelerators"], job["accepts_shared"]) == (0.25, True)
    run_round(world["engine"], get_settings(), "manual")
    shown = json.loads(broker(world, "jobs", "show", job["id"], "--json").stdout)
    assert shown["state"] == "matched"
    # Its log and its page say the part it holds.
    assert (
        "matched to 0.25 x cpu shared in europe-west4"
        in broker(world, "jobs", "logs", job["id"]).stdout
    )
    assert (
        "runs on      0.25 x cpu shared in europe-west4"
        in broker(world, "jobs", "show", job["id"]).stdout
    )
    refused = broker(
        world, "jobs", "submit", f"{HELLO}:predict", "--args", ARGS, "--max-price", "1",
        "--mig-profile", "9g.1tb",
    )  # fmt: skip
    assert refused.exit_code == 1
    assert len(refused.output.strip().splitlines()) == 1, refused.output


def test_refusals_are_one_line(world: dict[str, Any]) -> None:
    missing = broker(world, "jobs", "show", "job_nope")
    assert missing.exit_code == 1
    assert missing.output.strip() == "error: no job 'job_nope' of yours"
    wrong_key = broker(world, "jobs", "list", BROKER_API_KEY="bk_wrong")
    assert wrong_key.exit_code == 1
    assert wrong_key.output.startswith("error: the broker refused the API key")
    no_file = broker(world, "jobs", "submit", "nope.py:f", "--max-price", "1")
    assert (no_file.exit_code, no_file.output.strip()) == (2, "error: no file nope.py")
    no_function = broker(world, "jobs", "submit", f"{HELLO}:nope", "--max-price", "1")
    assert "has no function 'nope'" in no_function.output
    unknown_model = broker(
        world, "jobs", "submit", f"{HELLO}:predict", "--args", ARGS, "--max-price", "1",
        "--model", "nvidia-h9000",
    )  # fmt: skip
    assert unknown_model.exit_code == 1
    assert "unknown accelerator model 'nvidia-h9000'" in unknown_model.output
    assert "Traceback" not in unknown_model.output
    for result in (missing, wrong_key, no_file, no_function, unknown_model):
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_args_become_arrays(tmp_path: Path) -> None:
    import numpy as np

    np.save(tmp_path / "x.npy", np.arange(4, dtype=np.int64))
    w, n, x, tree = parse_args('[[1.5, 2], 3, "@x.npy", {"b": [true, false]}]', tmp_path)
    assert (w.dtype, n.dtype, x.dtype) == (np.float32, np.int32, np.int64)
    assert tree["b"].dtype == np.bool_
    for bad, message in (
        ("{}", "must be a JSON list"),
        ("[1,", "not JSON"),
        ('["x"]', "@file.npy"),
        ("[[1, [2]]]", "rectangular"),
    ):
        with pytest.raises(UserError, match=message):
            parse_args(bad, tmp_path)
