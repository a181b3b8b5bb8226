"""Type aliases, protocol versions and the caller: the small values every part of the proxy shares."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, TypeAlias

JsonObject: TypeAlias = dict[str, Any]
RequestId: TypeAlias = str | int

MODERN_VERSIONS: frozenset[str] = frozenset({"2026-07-28"})
HANDSHAKE_VERSIONS: frozenset[str] = frozenset({"2025-03-26", "2025-06-18", "2025-11-25"})
DEFAULT_HANDSHAKE_VERSION = "2025-03-26"
LATEST_MODERN_VERSION = "2026-07-28"


class Era(enum.Enum):
    """Which MCP protocol era a request belongs to."""

    MODERN = "modern"  # 2026-07-28: one stateless POST per request
    HANDSHAKE = "handshake"  # 2025-03-26 .. 2025-11-25: initialize, Mcp-Session-Id, GET stream


@dataclass(frozen=True, slots=True)
class TenantContext:
    """Who is calling, decided from the verified token alone."""

    tenant: str
    subject: str
    issuer: str
    scopes: frozenset[str]
    expires_at: float
    template: int | None = None  # the tenant template serving the tenant; None: its `tenants` entry
    # Who binds sessions, tasks, private cache entries and request state: the subject as its issuer
    # knows it (one `sub` from two issuers of a tenant is two principals). Made once per verified
    # token (the token cache keeps the context), not on each of the several uses a request makes.
    principal: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        principal = json.dumps([self.issuer, self.subject], ensure_ascii=False, separators=(",", ":"))
        object.__setattr__(self, "principal", principal)


def principal_hash(tenant: str, principal: str) -> str:
    """A caller as logs and admin answers may name them: a hash, never the subject claim itself."""
    return hashlib.sha256(f"{tenant}\0{principal}".encode()).hexdigest()[:16]
