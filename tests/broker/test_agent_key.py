"""The agent's key comes from its environment or a file only its owner reads, never from
its command line (which `ps` shows every user); the demo starts agents that way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from broker import demo
from broker.accounts.service import authenticate
from broker.cli import agent_key
from broker.config import get_settings
from broker.db import get_engine


def _agent(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_API_KEY")}
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", "agent", "--broker", "http://127.0.0.1:9", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_key_on_the_command_line_is_refused() -> None:
    refused = _agent("--api-key", "bk_secret")
    assert refused.returncode == 2
    assert "visible to every user" in refused.stderr
    missing = _agent()
    assert missing.returncode == 2
    assert "BROKER_API_KEY" in missing.stderr


def test_a_key_file_must_be_its_owners_alone(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("bk_from_file\n")
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        agent_key("", path)
    refused = _agent("--api-key-file", str(path))
    assert refused.returncode == 2
    assert "chmod 600" in refused.stderr
    path.chmod(0o600)
    assert agent_key("", path) == "bk_from_file"
    assert agent_key(" bk_from_env ", None) == "bk_from_env"
    with pytest.raises(ValueError, match="not both"):
        agent_key("bk_from_env", path)
    with pytest.raises(ValueError, match="cannot read"):
        agent_key("", tmp_path / "missing")
    (tmp_path / "empty").touch(mode=0o600)
    with pytest.raises(ValueError, match="empty"):
        agent_key("", tmp_path / "empty")


def test_the_demo_passes_keys_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[list[str], dict[str, str]]] = []

    class Recorder:
        def __init__(self, argv: list[str], env: dict[str, str], **_: Any) -> None:
            started.append((argv, env))

    monkeypatch.setattr(subprocess, "Popen", Recorder)
    names = {cap.account for cap in demo.PROVIDERS} | {"demo-cpu"}
    keys = {name: f"bk_demo_{name}" for name in names}
    demo.start_agents("http://127.0.0.1:8000", keys)
    assert len(started) == len(demo.listings()) + 1
    for argv, env in started:
        assert not any(arg.startswith("bk_") for arg in argv), argv
        assert "--api-key" not in argv
        assert env["BROKER_API_KEY"] in keys.values()


def test_each_demo_start_revokes_the_keys_the_last_one_printed(
    fresh_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_DATABASE_URL", fresh_engine.url.render_as_string(False))
    get_settings.cache_clear()
    get_engine.cache_clear()
    try:
        first = demo.demo_keys()
        second = demo.demo_keys()
    finally:
        get_engine().dispose()
        monkeypatch.undo()
        get_settings.cache_clear()
        get_engine.cache_clear()
    with Session(fresh_engine) as session:
        for name in first:
            assert authenticate(session, first[name]) is None, name
            account = authenticate(session, second[name])
            assert account is not None
            assert account.name == name
