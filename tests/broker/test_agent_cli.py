"""`broker agent`'s refusals are one line a provider can act on; --debug shows more."""

from __future__ import annotations

import os
import subprocess
import sys


def _agent(*args: str, key: str = "bk_not_a_real_key") -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_API_KEY")}
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", "agent", "--adapter", "cpu", *args],
        env={**clean, "BROKER_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_an_agent_without_a_location_does_not_start() -> None:
    refused = _agent("--broker", "http://127.0.0.1:9", "--country", "NL")
    assert refused.returncode == 2
    assert "--lat, --lon missing" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_wrong_key_is_one_line_and_debug_shows_the_traceback(live_url: str) -> None:
    where = ("--broker", live_url, "--country", "NL", "--lat", "52.37", "--lon", "4.90")
    refused = _agent(*where)
    assert refused.returncode == 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, refused.stderr
    assert "the broker refused the API key" in errors[0]
    assert "Traceback" not in refused.stderr
    debug = _agent(*where, "--debug")
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr


def test_shares_are_two_or_more(live_url: str) -> None:
    where = ("--broker", live_url, "--country", "NL", "--lat", "52.37", "--lon", "4.90")
    refused = _agent(*where, "--shares", "1")
    assert refused.returncode == 2
    assert "--shares" in refused.stderr
    # Two shares are a setting the agent takes: it gets as far as the broker's answer.
    taken = _agent(*where, "--shares", "2")
    assert taken.returncode == 1
    assert "the broker refused the API key" in taken.stderr
