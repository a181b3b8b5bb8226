"""The verified-token cache: what it keeps, for how long, and what it never keeps.

The clock is moved, never waited on: both the cache's (token_cache.now) and pyjwt's (the
`datetime` its claim checks read), so a token's exp and nbf pass exactly as they would.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import jwt
import pytest

from proxy.layers.auth import token_cache
from proxy.layers.auth.authenticator import Authenticator
from proxy.layers.auth.token_cache import VerifiedTokens, token_key
from proxy.protocol.errors import Unauthenticated
from proxy.types import TenantContext
from tests.factories import DEV_SECRET, DEV_SECRET_ENV, make_config, token

LEEWAY = 30  # the dev issuer's (the default leeway_seconds)
Shift = Callable[[float], None]


@pytest.fixture
def shift(monkeypatch: pytest.MonkeyPatch) -> Shift:
    """Move the clock the cache and pyjwt read forward to `seconds` after now."""
    real_time = time.time

    def to(seconds: float) -> None:
        class Later(datetime):
            @classmethod
            def now(cls, tz: Any = None) -> Any:
                return datetime.now(tz) + timedelta(seconds=seconds)

        monkeypatch.setattr(token_cache, "now", lambda: real_time() + seconds)
        monkeypatch.setattr(jwt.api_jwt, "datetime", Later)

    return to


def authenticator(monkeypatch: pytest.MonkeyPatch, cache_seconds: float) -> tuple[Authenticator, list[str]]:
    """An Authenticator whose verifications (the expensive step the cache saves) are counted."""
    config = make_config()
    config = config.model_copy(
        update={"auth": config.auth.model_copy(update={"cache_seconds": cache_seconds})}
    )
    auth = Authenticator(config, env={DEV_SECRET_ENV: DEV_SECRET})
    verified: list[str] = []
    verify = auth._verify

    async def counting(raw: str) -> Any:
        verified.append(raw)
        return await verify(raw)

    monkeypatch.setattr(auth, "_verify", counting)
    return auth, verified


def bearer(raw: str) -> list[str]:
    return [f"Bearer {raw}"]


async def test_a_cached_token_is_refused_once_it_expires(
    monkeypatch: pytest.MonkeyPatch, shift: Shift
) -> None:
    auth, verified = authenticator(monkeypatch, cache_seconds=3600)
    raw = token(exp=int(time.time()) + 100)
    assert (await auth.authenticate(bearer(raw))).tenant == "acme"
    shift(40)  # within exp less the leeway: from the cache
    assert (await auth.authenticate(bearer(raw))).tenant == "acme"
    assert len(verified) == 1
    shift(200)  # past exp and the leeway: verified again, and refused
    with pytest.raises(Unauthenticated, match="expired"):
        await auth.authenticate(bearer(raw))
    assert len(verified) == 2


async def test_an_entry_lives_no_longer_than_exp_less_the_leeway(
    monkeypatch: pytest.MonkeyPatch, shift: Shift
) -> None:
    """Between exp - leeway and exp + leeway pyjwt still accepts the token: it is verified each time."""
    auth, verified = authenticator(monkeypatch, cache_seconds=3600)
    raw = token(exp=int(time.time()) + 100)
    await auth.authenticate(bearer(raw))
    shift(100 - LEEWAY + 5)
    await auth.authenticate(bearer(raw))
    await auth.authenticate(bearer(raw))
    assert len(verified) == 3


async def test_an_entry_lives_at_most_cache_seconds(monkeypatch: pytest.MonkeyPatch, shift: Shift) -> None:
    auth, verified = authenticator(monkeypatch, cache_seconds=10)
    raw = token(exp=int(time.time()) + 600)
    await auth.authenticate(bearer(raw))
    shift(5)
    await auth.authenticate(bearer(raw))
    assert len(verified) == 1
    shift(11)
    await auth.authenticate(bearer(raw))
    assert len(verified) == 2


async def test_a_failure_is_not_cached(monkeypatch: pytest.MonkeyPatch, shift: Shift) -> None:
    auth, verified = authenticator(monkeypatch, cache_seconds=60)
    raw = token(nbf=int(time.time()) + 100)  # not valid yet, even with the leeway
    with pytest.raises(Unauthenticated, match="not valid yet"):
        await auth.authenticate(bearer(raw))
    with pytest.raises(Unauthenticated, match="not valid yet"):
        await auth.authenticate(bearer(raw))
    shift(200)
    assert (await auth.authenticate(bearer(raw))).tenant == "acme"
    assert len(verified) == 3


async def test_cache_seconds_zero_verifies_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    auth, verified = authenticator(monkeypatch, cache_seconds=0)
    raw = token()
    for _ in range(3):
        await auth.authenticate(bearer(raw))
    assert len(verified) == 3


def caller(subject: str, expires_at: float) -> TenantContext:
    return TenantContext(
        tenant="acme", subject=subject, issuer="dev", scopes=frozenset(), expires_at=expires_at
    )


def test_the_store_is_keyed_by_a_hash_of_the_whole_token_and_bounded() -> None:
    raw = token()
    assert token_key(raw) == hashlib.sha256(raw.encode()).digest()
    assert token_key(raw + "x") != token_key(raw)
    assert token_key("\udc80 lone surrogates encode too") != token_key("")
    store = VerifiedTokens(cache_seconds=60, max_entries=3)
    later = time.time() + 600
    for number in range(10):
        store.put(token_key(f"token-{number}"), caller(f"user-{number}", later), LEEWAY, None)
    assert len(store) == 3
    assert store.get(token_key("token-0")) is None
    entry = store.get(token_key("token-9"))
    assert entry is not None and entry.caller.subject == "user-9"


def test_a_token_already_within_its_leeway_is_not_stored() -> None:
    store = VerifiedTokens(cache_seconds=60)
    store.put(token_key("nearly"), caller("alice", time.time() + LEEWAY - 1), LEEWAY, None)
    assert len(store) == 0
