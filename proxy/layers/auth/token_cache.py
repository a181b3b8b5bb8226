"""Tokens verified before, so that a client's token is verified once, not on every request.

Verifying an HS256 token with pyjwt costs about 110 us here, the largest single step of the
proxy's own work on a request; clients send the same token until it expires. What is kept:

- keyed by the SHA-256 of the whole token: the store never holds a credential, only what its
  verification gave (the caller);
- at most MAX_ENTRIES, least recently used out first: a client minting a token per request
  costs the store nothing beyond the bound;
- an entry lives until the token's `exp` less the issuer's leeway, and at most
  `auth.cache_seconds`: a cached token is refused exactly when a fresh verification could;
- only successes: a failure is verified again on every request, so a token that was refused
  (not valid yet, an unknown kid, a key not fetched yet) is judged anew each time;
- for a JWKS issuer, the key set the signature was checked against: an entry counts only while
  that set is still the issuer's current one (the Authenticator checks, and clears the store when
  a key set is refetched). A reload builds a new Authenticator, and with it an empty store.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

from cachetools import LRUCache

from proxy.types import TenantContext

MAX_ENTRIES: Final = 10_000


def now() -> float:
    """Wall-clock seconds, the clock `exp` is stated in (one place to read it, for tests to move)."""
    return time.time()


def token_key(token: str) -> bytes:
    """What a token is stored under: its SHA-256 (any header text encodes, lone surrogates too)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True)
class Verified:
    caller: TenantContext
    until: float  # wall-clock time after which the token is verified again
    key_set: Any  # the JWKS key set that verified it (None: a configured secret or key file)


class VerifiedTokens:
    """A bounded store of verified tokens; `cache_seconds` 0 keeps nothing."""

    def __init__(self, cache_seconds: float, max_entries: int = MAX_ENTRIES) -> None:
        self.cache_seconds = cache_seconds
        self._entries: LRUCache[bytes, Verified] = LRUCache(maxsize=max_entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Verified | None:
        """The entry for a token key while it lives; an expired one is dropped."""
        entry = self._entries.get(key)
        if entry is not None and now() >= entry.until:
            self.discard(key)
            return None
        return entry

    def put(self, key: bytes, caller: TenantContext, leeway: float, key_set: Any) -> None:
        """Remember a successful verification (never call this for a failure)."""
        until = min(caller.expires_at - leeway, now() + self.cache_seconds)
        if until > now():
            self._entries[key] = Verified(caller, until, key_set)

    def discard(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def forget_tenants(self, tenants: Collection[str]) -> None:
        """Drop the entries of these tenants (no longer served by this process)."""
        for key in [k for k, entry in self._entries.items() if entry.caller.tenant in tenants]:
            self.discard(key)

    def clear(self) -> None:
        self._entries.clear()
