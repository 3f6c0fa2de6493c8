"""`broker keys` and `broker accounts disable|enable`: an operator's answers to a leak."""

from __future__ import annotations

from sqlalchemy.orm import Session

from broker.accounts.service import authenticate
from broker.db import make_engine
from tests.broker.test_cli import broker


def _valid(url: str, key: str) -> bool:
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            return authenticate(session, key) is not None
    finally:
        engine.dispose()


def test_keys_are_listed_rotated_revoked_and_accounts_disabled(empty_database_url: str) -> None:
    url = empty_database_url
    assert broker("db", "upgrade", url=url).returncode == 0
    first = broker("accounts", "create", "alice", url=url).stdout.strip().splitlines()[-1]
    second = broker("keys", "create", "alice", url=url)
    assert second.returncode == 0, second.stderr
    second_key = second.stdout.strip().splitlines()[-1]
    listing = broker("keys", "list", "alice", url=url).stdout.splitlines()
    assert len(listing) == 3  # a header and two keys, by prefix, never in full
    assert first not in "\n".join(listing)
    first_id = next(line.split("\t")[0] for line in listing if first[:10] in line)
    second_id = next(line.split("\t")[0] for line in listing if second_key[:10] in line)

    rotated = broker("keys", "rotate", first_id, url=url)
    assert rotated.returncode == 0, rotated.stderr
    replacement = rotated.stdout.strip().splitlines()[-1]
    assert not _valid(url, first)
    assert _valid(url, replacement)
    assert broker("keys", "rotate", first_id, url=url).returncode == 1  # revoked already

    assert broker("keys", "revoke", second_id, url=url).returncode == 0
    assert not _valid(url, second_key)
    assert broker("keys", "revoke", second_id, url=url).returncode == 0  # again: no change
    unknown = broker("keys", "revoke", "key_nope", url=url)
    assert unknown.returncode == 1
    assert "no API key" in unknown.stderr

    assert broker("accounts", "disable", "alice", url=url).returncode == 0
    assert not _valid(url, replacement)
    assert broker("accounts", "enable", "alice", url=url).returncode == 0
    assert _valid(url, replacement)
    assert broker("accounts", "disable", "nobody", url=url).returncode == 1
