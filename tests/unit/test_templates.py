"""Tenant templates: which configuration serves a token's tenant, `{tenant}` substitution, the
allowlist file, and the directory that builds template tenants on first use and drops them idle."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, ProxyConfig
from proxy.layers.auth.authenticator import Authenticator
from proxy.protocol.errors import Forbidden, StateStoreUnavailable
from proxy.runtime import Runtime
from proxy.tenants.allowlist import TenantIds, read_allowlist
from proxy.tenants.templates import TenantResolver
from proxy.types import TenantContext
from tests.factories import DEV_SECRET, DEV_SECRET_ENV, config_dict, token

TEAM: dict[str, Any] = {
    "match": "team-[0-9]+",
    "upstream": {"url": "http://{tenant}.teams.internal:8000/mcp?t={tenant}"},
}


def templated(*templates: dict[str, Any], tenants: dict[str, str] | None = None, **more: Any) -> ProxyConfig:
    data = config_dict(tenants or {}, tenant_templates=list(templates), **more)
    return ProxyConfig.model_validate(data, context={})


def caller(tenant: str, template: int | None) -> TenantContext:
    return TenantContext(tenant, "alice", "dev", frozenset(), time.time() + 600, template)


# --- which configuration serves a tenant ---------------------------------------------------------


def test_match_is_anchored_and_only_well_formed_ids_are_served() -> None:
    pro = {"match": ".*", "claims": {"plan": "pro"}, "upstream": TEAM["upstream"]}
    resolver = TenantResolver(templated(TEAM, pro))
    assert resolver.resolve("team-7", {}) == ("team-7", 0)
    for outside in ("team-7x", "xteam-7", "team-", "TEAM-7"):
        assert resolver.resolve(outside, {}) is None, outside
    # `.*` matches anything, but only a tenant id is ever served: no braces (Redis hash tags), no
    # slashes (audit file names), nothing longer than 64 characters, no leading dot.
    for malformed in ("a{b}", "../etc", "a/b", "", ".hidden", "x" * 65, "a b", "caf\u00e9"):
        assert resolver.resolve(malformed, {"plan": "pro"}) is None, malformed
    assert resolver.resolve("x" * 64, {"plan": "pro"}) == ("x" * 64, 1)


def test_explicit_tenants_win_over_templates() -> None:
    resolver = TenantResolver(templated({**TEAM, "match": ".*"}, tenants={"acme": "http://127.0.0.1:9/mcp"}))
    assert resolver.resolve("acme", {}) == ("acme", None)
    assert resolver.resolve("globex", {}) == ("globex", 0)


def test_claim_conditions_pick_the_first_template_whose_conditions_hold() -> None:
    pro = {
        "match": ".*",
        "claims": {"plan": "pro", "org.tier": [2, 3]},
        "upstream": {"url": "http://pro/mcp"},
    }
    config = templated(pro, {"match": ".*", "upstream": {"url": "http://free/mcp"}})
    resolver = TenantResolver(config)
    assert resolver.resolve("a", {"plan": "pro", "org": {"tier": 3}}) == ("a", 0)
    assert resolver.resolve("a", {"plan": "pro", "org": {"tier": 1}}) == ("a", 1)
    assert resolver.resolve("a", {"plan": "pro"}) == ("a", 1)  # a missing claim does not hold
    # Equal in JSON type too: 3.0 is not 3, "3" is not 3, true is not 1.
    for tier in (3.0, "3", True):
        assert resolver.resolve("a", {"plan": "pro", "org": {"tier": tier}}) == ("a", 1), tier
    only_pro = TenantResolver(templated(pro))
    assert only_pro.resolve("a", {"plan": "free", "org": {"tier": 2}}) is None


async def test_the_authenticator_refuses_a_tenant_no_template_serves_and_records_the_template() -> None:
    config = templated(
        TEAM, {"match": "lab-.*", "claims": {"plan": "pro"}, "upstream": {"url": "http://lab/mcp"}}
    )
    auth = Authenticator(config, env={DEV_SECRET_ENV: DEV_SECRET})
    ctx = await auth.authenticate([f"Bearer {token(tenant='team-42')}"])
    assert (ctx.tenant, ctx.template) == ("team-42", 0)
    pro = await auth.authenticate([f"Bearer {token(tenant='lab-1', plan='pro')}"])
    assert (pro.tenant, pro.template) == ("lab-1", 1)
    for refused in (token(tenant="lab-1"), token(tenant="team-x"), token(tenant="acme")):
        with pytest.raises(Forbidden) as denied:
            await auth.authenticate([f"Bearer {refused}"])
        assert denied.value.status == 403


async def test_an_idle_tenants_verified_tokens_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = Authenticator(templated(TEAM), env={DEV_SECRET_ENV: DEV_SECRET})
    verified: list[str] = []
    real = auth._verify

    async def counting(bearer: str) -> Any:
        verified.append(bearer)
        return await real(bearer)

    monkeypatch.setattr(auth, "_verify", counting)
    one, two = token(tenant="team-1"), token(tenant="team-2")
    for bearer in (one, two, one, two):
        await auth.authenticate([f"Bearer {bearer}"])
    assert verified == [one, two]  # cached after the first verification
    auth.forget_tenants({"team-1"})
    for bearer in (one, two):
        await auth.authenticate([f"Bearer {bearer}"])
    assert verified == [one, two, one]


# --- {tenant} substitution --------------------------------------------------------------------------


def test_tenant_is_substituted_in_url_headers_command_env_and_cwd(tmp_path: Path) -> None:
    headers = {"headers": {"X-Org": "org={tenant}"}, "tenant_header": "X-T"}
    http = templated({"match": ".*", "upstream": {**TEAM["upstream"], **headers}})
    served = http.tenant_config("blue.team_1")
    assert served is not None
    assert served.upstream.url == "http://blue.team_1.teams.internal:8000/mcp?t=blue.team_1"
    assert served.upstream.headers == {"X-Org": "org=blue.team_1"}
    assert served.upstream.tenant_header == "X-T"  # names are not substituted, only values
    stdio = templated(
        {
            "match": ".*",
            "upstream": {
                "command": ["./bin/server-{tenant}", "--tenant={tenant}", "{tenant}"],
                "env": {"DATA_DIR": "/srv/{tenant}/data", "{tenant}": "x"},
                "cwd": str(tmp_path / "{tenant}"),
            },
        }
    )
    child = stdio.tenant_config("red")
    assert child is not None
    assert child.upstream.command is not None and child.upstream.command[1:] == ("--tenant=red", "red")
    assert child.upstream.command[0].endswith("bin/server-red")
    assert child.upstream.env == {"DATA_DIR": "/srv/red/data", "{tenant}": "x"}
    assert child.upstream.cwd == tmp_path / "red"
    # The template itself is left as it was (every tenant gets its own copy).
    assert stdio.tenant_templates[0].upstream.env["DATA_DIR"] == "/srv/{tenant}/data"


# --- config and the allowlist file -----------------------------------------------------------------


def test_a_config_needs_tenants_or_templates_and_valid_patterns() -> None:
    with pytest.raises(ValueError, match="at least one tenant"):
        templated()
    with pytest.raises(ValueError, match="not a valid regular expression"):
        templated({**TEAM, "match": "team-(["})
    with pytest.raises(ValueError, match=r"needs state\.backend: redis"):
        templated(TEAM, tenant_allowlist={"redis_set": "tenants"})
    with pytest.raises(ValueError, match="exactly one of file or redis_set"):
        templated(TEAM, tenant_allowlist={"file": "a", "redis_set": "b"})


def test_the_allowlist_file_lists_ids_and_names_a_bad_line(tmp_path: Path) -> None:
    listed = tmp_path / "tenants.txt"
    listed.write_text("# provisioned tenants\nteam-1\n\n  team-2   # since Monday\n")
    ids = read_allowlist(listed, "proxy.yaml")
    assert len(ids) == 2 and "team-1" in ids and "team-2" in ids
    for absent in ("team-", "team-11", "team-0", "", "\u00e9", "team-1\n", "since"):
        assert absent not in ids
    listed.write_text("team-1\nteam {3}\n")
    with pytest.raises(ConfigError) as bad:
        read_allowlist(listed, "proxy.yaml")
    assert bad.value.file == str(listed) and bad.value.key_path == "line 2"
    with pytest.raises(ConfigError) as missing:
        read_allowlist(tmp_path / "absent.txt", "proxy.yaml")
    assert missing.value.key_path == "tenant_allowlist.file"


def test_the_compact_id_set_finds_exactly_the_listed_ids() -> None:
    rng = random.Random(7)

    def some() -> set[str]:
        tails = ("".join(rng.choices("abcXYZ019._-", k=rng.randint(0, 9))) for _ in range(2000))
        return {rng.choice("aZ9") + tail for tail in tails}

    listed = some()
    ids = TenantIds([tenant.encode() for tenant in listed])
    assert len(ids) == len(listed)
    probes = listed | some()
    assert {tenant for tenant in probes if tenant in ids} == listed
    assert "" not in ids and "a\u00e9" not in ids and None not in ids


def test_the_allowlist_limits_templates_not_explicit_tenants(tmp_path: Path) -> None:
    listed = tmp_path / "tenants.txt"
    listed.write_text("team-1\n")
    config = templated(
        {**TEAM, "match": ".*"}, tenants={"acme": "http://127.0.0.1:9/mcp"}, tenant_allowlist=str(listed)
    )
    resolver = TenantResolver(config)
    assert resolver.resolve("team-1", {}) == ("team-1", 0)
    assert resolver.resolve("team-2", {}) is None
    assert resolver.resolve("acme", {}) == ("acme", None)
    assert config.watched_files[-1] == listed  # an edit of the file reloads the config


# --- the directory: built on first use, dropped when idle ------------------------------------------


async def test_template_tenants_are_built_on_first_use_and_dropped_when_idle() -> None:
    config = templated({**TEAM, "idle_seconds": 60}, tenants={"acme": "http://127.0.0.1:9/mcp"})
    runtime = Runtime.build(config)
    assert [t.id for t in runtime.tenants] == ["acme"]  # nothing built for the templates yet
    first = await runtime.tenants.for_caller(caller("team-1", 0))
    assert first.upstream.tenant == "team-1" and first.idle_seconds == 60
    assert first.limits == config.limits
    assert await runtime.tenants.for_caller(caller("team-1", 0)) is first
    second = await runtime.tenants.for_caller(caller("team-2", 0))
    assert second.cache_identity != first.cache_identity  # each tenant's upstream is its own
    assert len(runtime.tenants) == 3

    now = time.monotonic()
    first.usage.in_use = 1  # an exchange holds it (a long stream, say)
    no_sessions: Any = lambda tenant: False  # noqa: E731
    assert runtime.tenants.drop_idle(now + 30, no_sessions) == []  # not idle long enough
    assert runtime.tenants.drop_idle(now + 61, no_sessions) == [second]
    assert runtime.tenants.drop_idle(now + 61, lambda tenant: tenant == "team-1") == []
    first.usage.in_use = 0
    assert runtime.tenants.drop_idle(now + 61, lambda tenant: tenant == "team-1") == []  # a session
    assert runtime.tenants.drop_idle(now + 61, no_sessions) == [first]
    assert [t.id for t in runtime.tenants] == ["acme"]  # explicit tenants are never dropped
    again = await runtime.tenants.for_caller(caller("team-1", 0))
    assert again is not first and again.upstream is not first.upstream
    await runtime.close()


async def test_a_reload_keeps_active_template_tenants_whose_upstream_is_unchanged(tmp_path: Path) -> None:
    listed = tmp_path / "tenants.txt"
    listed.write_text("team-1\nteam-2\nteam-3\nlab-1\n")
    old = Runtime.build(templated(TEAM, {"match": "lab-.*", "upstream": {"url": "http://lab/mcp"}},
                                  tenant_allowlist=str(listed)))  # fmt: skip
    kept, moved, unlisted = [await old.tenants.for_caller(caller(f"team-{i}", 0)) for i in (1, 2, 3)]
    lab = await old.tenants.for_caller(caller("lab-1", 1))
    listed.write_text("team-1\nteam-2\n")
    tenants = {"team-2": "http://elsewhere/mcp"}  # now explicit: no longer the template's
    new = Runtime.build(
        templated({**TEAM, "limits": {"max_concurrent": 3}}, tenants=tenants, tenant_allowlist=str(listed)),
        previous=old,
    )
    carried = new.tenants.built(kept.key)
    assert carried is not None and carried is not kept
    assert carried.upstream is kept.upstream and carried.catalog is kept.catalog
    assert carried.usage is kept.usage  # an exchange still on the old runtime keeps it from idling
    assert carried.limits.max_concurrent == 3  # the new template's limits
    for gone in (moved, unlisted, lab):  # explicit now, off the allowlist, template removed
        assert new.tenants.built(gone.key) is None
    assert set(old.upstreams_not_in(new)) == {moved.upstream, unlisted.upstream, lab.upstream}
    await old.close()


class Allowlist:
    def __init__(self, answers: list[bool | None]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def lists(self, tenant: str) -> bool | None:
        self.asked.append(tenant)
        return self.answers.pop(0)


async def test_a_shared_allowlist_is_asked_first_and_again_after_cache_seconds() -> None:
    config = templated(TEAM, tenant_allowlist={"redis_set": "tenants", "cache_seconds": 60},
                       state={"backend": "redis", "url": "redis://127.0.0.1:9/0"})  # fmt: skip
    runtime = Runtime.build(config)
    with pytest.raises(StateStoreUnavailable):  # no Redis to ask: nobody is admitted
        await runtime.tenants.for_caller(caller("team-1", 0))
    assert len(runtime.tenants) == 0
    allowlist = Allowlist([False, True, None, False])
    runtime.tenants._allowlist = allowlist
    with pytest.raises(Forbidden):
        await runtime.tenants.for_caller(caller("team-1", 0))
    assert len(runtime.tenants) == 0  # nothing is built for a tenant that is refused
    tenant = await runtime.tenants.for_caller(caller("team-1", 0))
    assert await runtime.tenants.for_caller(caller("team-1", 0)) is tenant  # within cache_seconds
    assert allowlist.asked == ["team-1", "team-1"]
    tenant.confirmed_until = 0.0  # cache_seconds later: asked again; Redis cannot say: still served
    assert await runtime.tenants.for_caller(caller("team-1", 0)) is tenant
    with pytest.raises(Forbidden):  # ... until it answers that the tenant is no longer listed
        await runtime.tenants.for_caller(caller("team-1", 0))
    await asyncio.sleep(0)
