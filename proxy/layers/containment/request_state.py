"""MRTR `requestState` bound to the caller and the request (2026-07-28 multi-round-trip requests).

An upstream's `requestState` travels through the client, so it is attacker-controlled. The proxy
hands the client a sealed envelope instead, under an HMAC-SHA256 tag: the upstream's state, who it
was issued to (tenant, issuer, subject), the request it answers (method and name), when it
expires, which `inputResponses` keys the client is asked to answer, and the answers the proxy
gives itself (a roots/list the policy answers). A retry is forwarded only with a valid tag, the
same caller and request, before expiry; the upstream gets its own state back, unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.types import JsonObject, TenantContext

PREFIX: Final = "mtp2."
TTL_SECONDS: Final = 3600.0  # a user may take a while to answer an elicitation


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class RequestState:
    """What a sealed requestState carries, besides who it was issued to."""

    method: str
    name: str | None
    upstream_state: str | None  # None: the upstream gave none (the proxy's own answers need one)
    expected: tuple[str, ...] = ()  # inputRequests keys passed on to the client
    answers: JsonObject = field(default_factory=dict)  # inputResponses the proxy gives itself


class RequestStateSeal:
    def __init__(self, key: bytes | None = None, ttl_seconds: float = TTL_SECONDS) -> None:
        self._key = key or secrets.token_bytes(32)
        self.ttl_seconds = ttl_seconds
        self.shared = False  # whether the key is the one every replica uses (state.backend: redis)

    def rekey(self, key: bytes) -> None:
        """Use the replicas' common key from now on; states sealed with the old one stop opening."""
        self._key = key
        self.shared = True

    def _tag(self, body: str) -> str:
        return _b64(self.mac(body.encode("ascii")))

    def mac(self, message: bytes) -> bytes:
        """HMAC-SHA256 under the proxy's sealing key (the replicas' common one with Redis); other
        ids the proxy binds to a caller (tasks) use it too, with a domain of their own."""
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def seal(self, ctx: TenantContext, state: RequestState, now: float | None = None) -> str:
        expires = (time.time() if now is None else now) + self.ttl_seconds
        payload = [
            ctx.tenant, ctx.issuer, ctx.subject, state.method, state.name, round(expires, 3),
            state.upstream_state, list(state.expected), state.answers,
        ]  # fmt: skip
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{PREFIX}{body}.{self._tag(body)}"

    def open(
        self, ctx: TenantContext, method: str, name: str | None, sealed: Any, now: float | None = None
    ) -> RequestState | None:
        """The sealed state, or None unless `sealed` was issued by this proxy to this caller, for
        this request (method and name), and has not expired."""
        if not isinstance(sealed, str) or not sealed.startswith(PREFIX) or sealed.count(".") != 2:
            return None
        body, tag = sealed[len(PREFIX) :].split(".")
        if not hmac.compare_digest(tag, self._tag(body)):
            return None
        try:
            tenant, issuer, subject, s_method, s_name, expires, upstream, expected, answers = json.loads(
                _unb64(body)
            )
        except (ValueError, TypeError):
            return None
        if (tenant, issuer, subject) != (ctx.tenant, ctx.issuer, ctx.subject):
            return None
        if (s_method, s_name) != (method, name):
            return None
        if (time.time() if now is None else now) > expires:
            return None
        return RequestState(s_method, s_name, upstream, tuple(expected), answers)
