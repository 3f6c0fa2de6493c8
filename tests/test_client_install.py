"""The client install (`pip install ./client`): the SDK and the developer CLI in a clean
virtual environment, without the server's dependencies, against a live broker.

It installs from the package index pip is configured with (the dependencies are
the repository's pins), so it needs that index, as `make test` does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

from sqlalchemy import Engine

from broker.config import get_settings
from broker.db import transaction
from broker.market.clearing import RoundInProgress, run_round
from broker.models.account import Role
from tests.factories import make_account

REPO = Path(__file__).resolve().parent.parent
SERVER_ONLY = ("sqlalchemy", "fastapi", "uvicorn", "ortools", "stripe", "psycopg", "alembic")


def _run(*args: str | Path, **options: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, **options
    )  # type: ignore[call-overload]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done  # type: ignore[no-any-return]


def test_the_client_install_runs_the_developer_example(
    live_url: str, fresh_engine: Engine, tmp_path: Path
) -> None:
    venv = tmp_path / "client-venv"
    _run(sys.executable, "-m", "venv", venv)
    python, broker = venv / "bin" / "python", venv / "bin" / "broker"
    _run(python, "-m", "pip", "install", "--quiet", REPO / "client", timeout=900)
    missing = _run(
        python,
        "-c",
        "import importlib.util as u; "
        f"print([m for m in {SERVER_ONLY!r} if u.find_spec(m) is not None])",
    )
    assert missing.stdout.strip() == "[]"  # none of the server's libraries came with it

    with transaction(fresh_engine) as session:
        _, dev_key = make_account(session, Role.developer)
        _, provider_key = make_account(session, Role.provider)
    # The venv's own files only: never the repository's modules beside the test.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BROKER_API_KEY")}
    env |= {"BROKER_URL": live_url, "JAX_PLATFORMS": "cpu"}
    stop = threading.Event()

    def clear_forever() -> None:
        while not stop.wait(0.5):
            with contextlib.suppress(RoundInProgress):
                run_round(fresh_engine, get_settings(), "auto")

    clearing = threading.Thread(target=clear_forever, daemon=True)
    clearing.start()
    # The provider runs the full install (the agent is not part of the client).
    provider = subprocess.Popen(
        [sys.executable, str(REPO / "examples" / "provider.py"), "--price", "0.08",
         "--seconds", "300"],
        env={**env, "BROKER_API_KEY": provider_key},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        developer = _run(
            python,
            REPO / "examples" / "developer.py",
            env={**env, "BROKER_API_KEY": dev_key},
            cwd=tmp_path,
            timeout=400,
        )
        cli = _run(
            broker, "jobs", "submit", f"{REPO / 'examples' / 'hello.py'}:predict",
            "--args", "[[[0.5, -1.0], [1.0, 0.25]], [[1.0, 2.0], [3.0, 4.0]]]",
            "--max-price", "1", "--platform", "cpu", "--wait",
            env={**env, "BROKER_API_KEY": dev_key}, cwd=tmp_path, timeout=300,
        )  # fmt: skip
        listed = _run(broker, "jobs", "list", env={**env, "BROKER_API_KEY": dev_key})
        server_only = subprocess.run(
            [broker, "serve"], capture_output=True, text=True, check=False, env=env
        )
    finally:
        provider.terminate()
        provider.wait(timeout=60)
        stop.set()
        clearing.join(timeout=30)
    assert "succeeded on an offer at $0.08/h" in developer.stdout
    assert "invoice inv_" in developer.stdout
    assert cli.stdout.strip() == "[[0.9866143465042114, -0.46211716532707214], " + (
        "[0.9999666213989258, -0.9640275835990906]]"
    )
    assert "predict  succeeded" in listed.stdout
    assert server_only.returncode == 1
    assert server_only.stderr.startswith("error: this command needs the broker's full install")
