"""OriginPolicy: which browser Origins may call (DNS-rebinding defence), without sockets."""

from __future__ import annotations

import pytest

from proxy.runtime import OriginPolicy
from tests.factories import make_config


def policy(public_url: str, host: str = "0.0.0.0", allowed: tuple[str, ...] = ()) -> OriginPolicy:
    config = make_config(resource=public_url)
    listen = config.listen.model_copy(update={"host": host, "allowed_origins": allowed})
    return OriginPolicy.from_config(config.model_copy(update={"listen": listen}))


@pytest.mark.parametrize(
    ("public_url", "origin", "allowed"),
    [
        ("https://mcp.example.com:443/mcp", "https://mcp.example.com", True),  # default port dropped
        ("https://mcp.example.com/mcp", "https://mcp.example.com:443", True),
        ("https://mcp.example.com/mcp", "HTTPS://MCP.Example.COM/", True),
        ("http://mcp.example.com:80/mcp", "http://mcp.example.com", True),
        ("https://mcp.example.com:8443/mcp", "https://mcp.example.com:8443", True),
        ("https://mcp.example.com:8443/mcp", "https://mcp.example.com", False),  # another port
        ("https://mcp.example.com/mcp", "http://mcp.example.com", False),  # another scheme
        ("https://mcp.example.com:443/mcp", "https://mcp.example.com:80", False),
        ("https://mcp.example.com/mcp", "https://mcp.example.com.evil.test", False),
        ("https://mcp.example.com/mcp", "https://evil.test@mcp.example.com", False),  # no browser sends this
        ("https://mcp.example.com/mcp", "https://mcp.example.com:99999", False),  # not a port
        ("https://mcp.example.com/mcp", "null", False),
        ("https://mcp.example.com/mcp", "http://localhost:3000", False),  # not listening on loopback
    ],
)
def test_public_urls_origin_is_allowed_in_every_spelling_a_browser_uses(
    public_url: str, origin: str, allowed: bool
) -> None:
    assert policy(public_url).allows(origin) is allowed


def test_configured_origins_are_normalised_the_same_way() -> None:
    origins = policy("https://mcp.example.com/mcp", allowed=("https://App.Example.com:443/",))
    assert origins.allows("https://app.example.com")
    assert not origins.allows("https://app.example.com:444")


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:5173", True),
        ("https://127.0.0.1", True),
        ("http://[::1]:8080", True),
        ("http://localhost.evil.test", False),
        ("http://127.0.0.2:80", False),
    ],
)
def test_loopback_origins_on_a_loopback_listener(origin: str, allowed: bool) -> None:
    assert policy("http://127.0.0.1:8080/mcp", host="127.0.0.1").allows(origin) is allowed
