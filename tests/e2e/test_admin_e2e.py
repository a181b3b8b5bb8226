"""The admin endpoints on the metrics listener: off without its token, 401 without the right one; a
tenant's sessions listed by hash and ended (upstream too), only under their own tenant; a tenant's
cache flushed and no other's; the running config's hash. In process and with sessions in Redis."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import load_config
from proxy.http.keys import METRICS_LISTENER
from proxy.http.server import start_server
from proxy.ops.reload import reload_config
from proxy.types import principal_hash
from tests.conftest import RunningProxy, StartProxy, proxy_config
from tests.e2e.test_scaleout_e2e import (  # noqa: F401 - the Redis fixtures
    HANDSHAKE,
    MODERN,
    StartReplicas,
    call,
    initialize,
    modern_call,
    post,
    redis_server,
    start_replicas,
    written,
)
from tests.e2e.test_transport_e2e import modern_body, modern_headers, session_headers
from tests.factories import DEV_SECRET, DEV_SECRET_ENV, RsaKeys
from tests.upstreams import free_port

pytestmark = pytest.mark.e2e

TOKEN_ENV = "MCP_TEST_METRICS_TOKEN"
TOKEN = "admin-token-0123456789abcdef"
WITH_TOKEN = {"bearer_token_env": TOKEN_ENV}
CACHED = {"tools": {"cache_ttl_seconds": {"whoami": 60}}}


@pytest.fixture
def metrics_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN


async def admin(
    app: Any, method: str, path: str, token: str | None = TOKEN
) -> tuple[int, dict[str, Any], str]:
    """One request to the metrics listener of `app`: status, JSON body, and the body as text."""
    url = f"http://127.0.0.1:{app[METRICS_LISTENER].port}{path}"
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as http, http.request(method, url, headers=headers) as response:
        text = await response.text()
        assert response.content_type == "application/json", text
        return response.status, json.loads(text), text


async def open_session(proxy: RunningProxy, tenant: str, sub: str = "alice") -> tuple[str, str]:
    """A handshake-era session of `sub` in `tenant`: (the proxy's session id, the caller's token)."""
    token = proxy.token(tenant, sub=sub)
    return await initialize(proxy.url, token), token


async def session_works(proxy: RunningProxy, session: str, token: str) -> int:
    status, _, _ = await proxy.post(call("whoami"), token=token, headers=session_headers(session))
    return status


def audit_id(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest()[:16]


def tool_calls(upstream: Any) -> int:
    return sum(1 for r in upstream.recorder.snapshot() if r.method == "POST" and '"tools/call"' in r.text)


async def modern_whoami(proxy: RunningProxy, tenant: str) -> int:
    status, _, _ = await proxy.post(
        modern_body("tools/call", {"name": "whoami", "arguments": {}}),
        token=proxy.token(tenant), headers=modern_headers("tools/call", "whoami"),
    )  # fmt: skip
    return status


# --- the token ------------------------------------------------------------------------------------

ENDPOINTS = [
    ("GET", "/admin/config"),
    ("GET", "/admin/tenants/acme/sessions"),
    ("DELETE", "/admin/tenants/acme/sessions/{id}"),
    ("POST", "/admin/tenants/acme/sessions/{id}/end"),
    ("POST", "/admin/tenants/acme/cache/flush"),
]


async def test_without_a_metrics_token_every_admin_endpoint_is_off(
    make_proxy: StartProxy, upstreams: dict[str, Any]
) -> None:
    proxy = await make_proxy(upstreams)
    session, token = await open_session(proxy, "acme")
    for method, path in ENDPOINTS:
        status, body, _ = await admin(proxy.app, method, path.format(id=audit_id(session)), token=None)
        assert status == 404 and "metrics.bearer_token_env" in body["error"]["message"]
    assert await session_works(proxy, session, token) == 200


async def test_a_missing_or_wrong_token_is_refused_before_anything_happens(
    make_proxy: StartProxy, upstreams: dict[str, Any], metrics_token: str
) -> None:
    proxy = await make_proxy(upstreams, policies={"acme": CACHED}, metrics=WITH_TOKEN)
    session, token = await open_session(proxy, "acme")
    assert await modern_whoami(proxy, "acme") == 200
    calls = tool_calls(upstreams["acme"])
    for wrong in (None, f"{metrics_token}X", metrics_token[:-1], proxy.token("acme")):
        for method, path in [*ENDPOINTS, ("GET", "/admin/tenants/nobody/sessions")]:
            status, body, _ = await admin(proxy.app, method, path.format(id=audit_id(session)), token=wrong)
            assert status == 401 and body["error"]["code"] == -32001, (wrong, method, path)
    assert await modern_whoami(proxy, "acme") == 200
    assert tool_calls(upstreams["acme"]) == calls  # still cached: not flushed
    assert await session_works(proxy, session, token) == 200  # not ended


# --- sessions -------------------------------------------------------------------------------------


async def test_a_tenants_sessions_are_listed_by_hash_without_ids_or_subjects(
    make_proxy: StartProxy, upstreams: dict[str, Any], metrics_token: str
) -> None:
    proxy = await make_proxy(upstreams, metrics=WITH_TOKEN)
    alice, alice_token = await open_session(proxy, "acme", "alice")
    bob, _ = await open_session(proxy, "acme", "bob")
    globex, _ = await open_session(proxy, "globex", "alice")
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {alice_token}", "Accept": "text/event-stream",
                   **session_headers(alice)}  # fmt: skip
        async with http.get(proxy.url, headers=headers) as stream:
            assert stream.status == 200
            status, body, text = await admin(proxy.app, "GET", "/admin/tenants/acme/sessions")
    assert status == 200 and body["tenant"] == "acme"
    listed = {s["id"]: s for s in body["sessions"]}
    assert set(listed) == {audit_id(alice), audit_id(bob)}  # not globex's
    mine = listed[audit_id(alice)]
    assert mine["subject"] == principal_hash("acme", json.dumps(["dev", "alice"], separators=(",", ":")))
    assert (mine["era"], mine["protocol_version"]) == ("handshake", HANDSHAKE)
    assert mine["get_stream_open"] is True and listed[audit_id(bob)]["get_stream_open"] is False
    assert mine["requests_in_flight"] == 0
    assert datetime.fromisoformat(mine["created"]) <= datetime.fromisoformat(mine["last_seen"])
    for secret in (alice, bob, globex, "alice", "bob", alice_token, "upstream-secret"):
        assert secret not in text


async def test_ending_a_session_by_its_hash_ends_it_here_and_upstream(
    make_proxy: StartProxy, upstreams: dict[str, Any], metrics_token: str
) -> None:
    proxy = await make_proxy(upstreams, metrics=WITH_TOKEN)
    doomed, token = await open_session(proxy, "acme")
    kept, kept_token = await open_session(proxy, "acme", "bob")
    upstream = upstreams["acme"].recorder
    upstream.clear()
    status, body, _ = await admin(proxy.app, "DELETE", f"/admin/tenants/acme/sessions/{audit_id(doomed)}")
    assert status == 200
    assert body == {"tenant": "acme", "session": audit_id(doomed), "ended": True, "upstream": "ended"}
    assert [r.method for r in upstream.snapshot()] == ["DELETE"]  # the upstream side is ended too
    assert await session_works(proxy, doomed, token) == 404
    assert await session_works(proxy, kept, kept_token) == 200
    status, body, _ = await admin(proxy.app, "POST", f"/admin/tenants/acme/sessions/{audit_id(kept)}/end")
    assert status == 200 and body["upstream"] == "ended"
    assert await session_works(proxy, kept, kept_token) == 404
    status, _, _ = await admin(proxy.app, "DELETE", f"/admin/tenants/acme/sessions/{audit_id(kept)}")
    assert status == 404  # gone already


async def test_a_session_cannot_be_ended_by_naming_another_tenant(
    make_proxy: StartProxy, upstreams: dict[str, Any], metrics_token: str
) -> None:
    proxy = await make_proxy(upstreams, metrics=WITH_TOKEN)
    globex, token = await open_session(proxy, "globex")
    for method, path in (("DELETE", "/admin/tenants/acme/sessions/{}"),
                         ("POST", "/admin/tenants/acme/sessions/{}/end")):  # fmt: skip
        status, body, _ = await admin(proxy.app, method, path.format(audit_id(globex)))
        assert (
            status == 404 and body["error"]["message"] == "Not found: the tenant has no session with that id"
        )
    assert await session_works(proxy, globex, token) == 200
    assert not [r for r in upstreams["globex"].recorder.snapshot() if r.method == "DELETE"]
    for path in (f"/admin/tenants/globex/sessions/{globex}",  # the raw id does not name it either
                 "/admin/tenants/globex/sessions/0000000000000000",
                 "/admin/tenants/nobody/sessions/" + audit_id(globex)):  # fmt: skip
        assert (await admin(proxy.app, "DELETE", path))[0] == 404
    assert (await admin(proxy.app, "GET", "/admin/tenants/nobody/sessions"))[0] == 404
    assert (await admin(proxy.app, "GET", "/admin/nothing-here"))[0] == 404
    assert (await admin(proxy.app, "GET", "/admin/tenants/globex/cache/flush"))[0] == 405
    assert await session_works(proxy, globex, token) == 200


# --- cache ----------------------------------------------------------------------------------------


async def test_flushing_a_tenants_cache_leaves_the_others(
    make_proxy: StartProxy, upstreams: dict[str, Any], metrics_token: str
) -> None:
    proxy = await make_proxy(upstreams, policies={"acme": CACHED, "globex": CACHED}, metrics=WITH_TOKEN)
    for tenant in ("acme", "globex"):
        assert await modern_whoami(proxy, tenant) == 200
    calls = {tenant: tool_calls(upstreams[tenant]) for tenant in ("acme", "globex")}
    status, body, _ = await admin(proxy.app, "POST", "/admin/tenants/acme/cache/flush")
    assert status == 200 and body == {"tenant": "acme", "cache": "flushed", "dropped": 1}
    for tenant in ("acme", "globex"):
        assert await modern_whoami(proxy, tenant) == 200
    assert tool_calls(upstreams["acme"]) == calls["acme"] + 1  # fetched again
    assert tool_calls(upstreams["globex"]) == calls["globex"]  # still cached


# --- the running config ---------------------------------------------------------------------------


async def test_the_config_hash_is_of_the_files_read_and_changes_with_a_reload(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: RsaKeys, metrics_token: str
) -> None:
    data = proxy_config(
        f"http://127.0.0.1:{free_port()}/mcp", upstreams, tmp_path, rsa_keys, metrics=WITH_TOKEN
    )
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "acme.yaml").write_text(yaml.safe_dump(CACHED))
    data["policies_dir"], data["tenants"]["acme"]["policy"] = str(policies), "acme"
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(data))
    runner, _ = await start_server(
        load_config(path, env={DEV_SECRET_ENV: DEV_SECRET, TOKEN_ENV: metrics_token})
    )
    try:
        status, before, _ = await admin(runner.app, "GET", "/admin/config")
        assert status == 200 and before["tenants"] == 2
        read = [path, policies / "acme.yaml", tmp_path / "rsa.pem"]
        expected = [{"path": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in read]
        assert before["files"] == expected  # each as `sha256sum FILE` prints it
        listing = "".join(f"{f['sha256']}  {f['path']}\n" for f in expected)
        assert before["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
        (policies / "acme.yaml").write_text(yaml.safe_dump({"tools": {"deny": ["add_note"]}}))
        assert await reload_config(runner.app)
        status, after, _ = await admin(runner.app, "GET", "/admin/config")
        assert after["sha256"] != before["sha256"]
        assert after["files"][0] == before["files"][0] and after["files"][1] != before["files"][1]
        assert datetime.fromisoformat(after["loaded_at"]) >= datetime.fromisoformat(before["loaded_at"])
    finally:
        await runner.cleanup()


# --- sessions and cache in Redis ------------------------------------------------------------------


async def test_with_redis_any_replica_lists_ends_and_flushes(
    start_replicas: StartReplicas,  # noqa: F811 - the fixture imported above
    upstreams: dict[str, Any],
    metrics_token: str,
) -> None:
    replicas = await start_replicas(
        upstreams, policies={"acme": CACHED, "globex": CACHED}, metrics=WITH_TOKEN
    )
    token = replicas.token("acme")
    session = await initialize(replicas.a.url, token)
    other = await initialize(replicas.a.url, replicas.token("globex"))
    status, body, _ = await admin(replicas.b.app, "GET", "/admin/tenants/acme/sessions")
    assert status == 200 and [s["id"] for s in body["sessions"]] == [audit_id(session)]
    assert body["shared"] == {"up": True, "held_here": 0}  # created on replica a
    listed = body["sessions"][0]
    assert datetime.fromisoformat(listed["created"]) <= datetime.fromisoformat(listed["last_seen"])
    assert listed["protocol_version"] == HANDSHAKE and session not in json.dumps(body)
    status, _, _ = await admin(replicas.b.app, "DELETE", f"/admin/tenants/acme/sessions/{audit_id(other)}")
    assert status == 404  # globex's, named under acme
    upstreams["acme"].recorder.clear()
    status, body, _ = await admin(
        replicas.b.app, "DELETE", f"/admin/tenants/acme/sessions/{audit_id(session)}"
    )
    assert status == 200 and body["upstream"] == "ended"
    assert [r.method for r in upstreams["acme"].recorder.snapshot()] == ["DELETE"]
    assert (await post(replicas.a.url, call("whoami"), token, session, HANDSHAKE)).status == 404
    still = await post(replicas.a.url, call("whoami"), replicas.token("globex"), other, HANDSHAKE)
    assert still.status == 200
    # Ended: shared sessions outlive the replicas, and with them this process's views of them.
    ending = f"/admin/tenants/globex/sessions/{audit_id(other)}/end"
    assert (await admin(replicas.a.app, "POST", ending))[0] == 200


async def test_with_redis_a_flush_through_one_replica_drops_the_entries_every_replica_shares(
    start_replicas: StartReplicas,  # noqa: F811 - the fixture imported above
    upstreams: dict[str, Any],
    metrics_token: str,
) -> None:
    replicas = await start_replicas(
        upstreams, policies={"acme": CACHED, "globex": CACHED}, metrics=WITH_TOKEN
    )

    async def whoami(tenant: str) -> None:
        answer = await post(replicas.a.url, modern_call("whoami"), replicas.token(tenant), version=MODERN)
        assert answer.status == 200
        await written(replicas.a)  # the cache store went to Redis in the background

    for tenant in ("acme", "globex"):
        await whoami(tenant)
    calls = {tenant: tool_calls(upstreams[tenant]) for tenant in ("acme", "globex")}
    status, body, _ = await admin(replicas.b.app, "POST", "/admin/tenants/acme/cache/flush")
    assert status == 200 and body == {"tenant": "acme", "cache": "flushed", "dropped": 1}
    for tenant in ("acme", "globex"):
        await whoami(tenant)
    assert tool_calls(upstreams["acme"]) == calls["acme"] + 1
    assert tool_calls(upstreams["globex"]) == calls["globex"]
