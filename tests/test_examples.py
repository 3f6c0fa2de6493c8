"""The examples run as a user runs them: a provider's agent and a developer's session,
each its own process, against a live broker that clears the market as it goes."""

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

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_developer_and_provider_examples_work(live_url: str, fresh_engine: Engine) -> None:
    with transaction(fresh_engine) as session:
        _, dev_key = make_account(session, Role.developer)
        _, provider_key = make_account(session, Role.provider)
    env = {**os.environ, "BROKER_URL": live_url, "JAX_PLATFORMS": "cpu"}
    stop = threading.Event()

    def clear_forever() -> None:
        while not stop.wait(0.5):
            with contextlib.suppress(RoundInProgress):
                run_round(fresh_engine, get_settings(), "auto")

    clearing = threading.Thread(target=clear_forever, daemon=True)
    clearing.start()
    provider = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "provider.py"), "--price", "0.08", "--seconds", "300"],
        env={**env, "BROKER_API_KEY": provider_key},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        developer = subprocess.run(
            [sys.executable, str(EXAMPLES / "developer.py")],
            env={**env, "BROKER_API_KEY": dev_key},
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
    finally:
        provider.terminate()
        _, provider_log = provider.communicate(timeout=60)
        stop.set()
        clearing.join(timeout=30)
    out = developer.stdout
    assert developer.returncode == 0, developer.stdout + developer.stderr
    assert "succeeded on an offer at $0.08/h" in out
    assert "trained 500 steps, within its $1.00 budget" in out
    assert "is cancelled" in out
    assert "invoice inv_" in out
    assert "registered; offering 1 x cpu at $0.08/h" in provider_log
