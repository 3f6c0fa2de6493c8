"""The session cookie and CSRF tokens, without a browser."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

from pydantic import SecretStr

from broker.config import Settings
from web import session


def test_tokens_verify_until_they_expire_and_never_when_altered() -> None:
    secret = b"s" * 32
    token = session.issue(secret, "key_1", now=1000)
    found = session.verify(secret, token, now=1001)
    assert found is not None
    assert found.key_id == "key_1"
    assert session.verify(secret, token, now=1000 + session.SESSION_SECONDS) is None
    assert session.verify(b"t" * 32, token, now=1001) is None  # another broker's secret
    body, stamp, mac = token.split(".")
    forged = base64.urlsafe_b64encode(b'{"k":"key_2","n":"x"}').rstrip(b"=").decode()
    assert session.verify(secret, f"{forged}.{stamp}.{mac}", now=1001) is None
    assert session.verify(secret, body, now=1001) is None
    assert session.verify(secret, "", now=1001) is None
    assert session.verify(secret, "a.b.c", now=1001) is None


def test_csrf_tokens_belong_to_one_session() -> None:
    secret = b"s" * 32
    token = session.csrf_token(secret, "nonce-a")
    assert session.csrf_ok(secret, "nonce-a", token)
    assert not session.csrf_ok(secret, "nonce-b", token)
    assert not session.csrf_ok(secret, "", session.csrf_token(secret, ""))  # no nonce cookie
    assert not session.csrf_ok(secret, "nonce-a", None)
    assert not session.csrf_ok(secret, "nonce-a", 12345)
    assert not session.csrf_ok(secret, "nonce-a", "é" * 43)  # refused, not an error
    assert session.verify(secret, "é.é") is None


def test_the_secret_is_made_once_and_kept_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = session.secret_key(settings)
    path = tmp_path / "data" / "secret_key"
    assert len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    session._stored_secret.cache_clear()
    assert session.secret_key(settings) == first  # a restart keeps sessions valid
    given = Settings(data_dir=tmp_path / "data", secret_key=SecretStr("k" * 40))
    assert session.secret_key(given) == b"k" * 40
