"""MRTR `requestState` bound to the caller (2026-07-28 multi-round-trip requests).

An upstream's `requestState` travels through the client, so it is attacker-controlled. The proxy
hands the client a sealed envelope instead: the upstream's state with the tenant and subject it
was issued to, under an HMAC-SHA256 tag. A retry is forwarded only with a valid tag and the same
caller; the upstream gets its own state back, unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Final

PREFIX: Final = "mtp1."


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class RequestStateSeal:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)
        self.shared = False  # whether the key is the one every replica uses (state.backend: redis)

    def rekey(self, key: bytes) -> None:
        """Use the replicas' common key from now on; states sealed with the old one stop opening."""
        self._key = key
        self.shared = True

    def _tag(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest())

    def seal(self, tenant: str, subject: str, upstream_state: str) -> str:
        body = _b64(json.dumps([tenant, subject, upstream_state], separators=(",", ":")).encode())
        return f"{PREFIX}{body}.{self._tag(body)}"

    def open(self, tenant: str, subject: str, sealed: str) -> str | None:
        """The upstream's state, or None unless `sealed` was issued by this proxy to this caller."""
        if not sealed.startswith(PREFIX) or sealed.count(".") != 2:
            return None
        body, tag = sealed[len(PREFIX) :].split(".")
        if not hmac.compare_digest(tag, self._tag(body)):
            return None
        try:
            issued_tenant, issued_subject, state = json.loads(_unb64(body))
        except ValueError:
            return None
        if issued_tenant != tenant or issued_subject != subject or not isinstance(state, str):
            return None
        return state
