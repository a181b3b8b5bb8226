"""`resources.public_uris`: URIs every tenant of an upstream shares, in a scheme whose other URIs
belong to tenants. The URI rules come first (no trick URI is ever public), a glob cannot reach what
a tenant template could claim, and without the key nothing changes (fail closed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError
from proxy.layers.data_access.engine import (
    Action,
    evaluate,
    filter_result,
    foreign_uri,
    hides,
    mentions_foreign_uri,
)
from proxy.layers.data_access.policy import PolicyFile, compile_policy, load_policy
from proxy.layers.data_access.public_uris import compile_public_uri
from proxy.verify.policy_tests import decide, explain_lines
from proxy.verify.snippets import template_covered, tenant_variable

TEMPLATES = ["demo://resource/dynamic/text/{tenant}", "notes://{tenant}/{path}"]
GUIDE = "demo://resource/static/document/features.md"


def policy(*public: str) -> Any:
    spec = {"resources": {"tenant_uri_templates": TEMPLATES, "public_uris": list(public)}}
    return compile_policy("test", PolicyFile.model_validate(spec))


NARROW = policy("demo://resource/static/**", "demo://resource/schema/*.json")
WIDE = policy("demo://resource/**")  # as wide as a glob may be: the whole authority's paths
NONE = policy()


@pytest.mark.parametrize(
    "uri",
    [
        GUIDE,
        "DEMO://resource/static/document/features.md",  # the scheme is case-insensitive
        "demo://resource/static/a/b/c.md",
        "demo://resource/static/",
        "demo://resource/schema/notes.json",
        "demo://resource/static/caf%C3%A9.md",  # a non-ASCII character, percent-encoded
        "demo://resource/static/café.md",
        "demo://resource/static/with%20space.md",
        "demo://resource/static/document/{name}",  # a template of the upstream's, for completion
    ],
)
def test_public_uris_pass_for_every_tenant(uri: str) -> None:
    for tenant in ("acme", "globex"):
        assert not foreign_uri(NARROW, tenant, uri)
        assert evaluate(NARROW, tenant, "resources/read", {"uri": uri}).action is Action.FORWARD
        assert evaluate(NARROW, tenant, "resources/subscribe", {"uri": uri}).action is Action.FORWARD


@pytest.mark.parametrize(
    "uri",
    [
        "demo://resource/dynamic/text/globex",
        "demo://resource/static/../dynamic/text/globex",
        "demo://resource/static/./document/features.md",
        "demo://resource/static/%2e%2e/dynamic/text/globex",
        "demo://resource/static/%2E%2E/dynamic/text/globex",
        "demo://resource/static/..%2Fdynamic/text/globex",
        "demo://resource/static%2F..%2Fdynamic%2Ftext%2Fglobex",
        "demo://resource/static/%252e%252e/dynamic/text/globex",
        "demo://resource/static/document%2Ffeatures.md",  # an encoded slash
        "demo://resource/static/%64ocument/features.md",  # an encoded letter: another spelling
        "demo://resource/static/features.md%00",
        "demo://resource/static/100%",
        "demo://resource/static\\..\\dynamic\\text\\globex",
        "demo://resource/static\\document",
        "demo://resource/Static/document/features.md",  # the path is compared exactly
        "demo://RESOURCE/static/document/features.md",
        "demo://x@resource/static/document/features.md",
        "demo://resource.evil/static/document/features.md",
        "demo://resource/static/features.md?tenant=globex",  # * and ** stop at ? and #
        "demo://resource/static/features.md#globex",
        "demo://resource/static/features .md",
        " demo://resource/static/document/features.md",
        "demo://resource/static/features.md\r\n",
        "demo://resource/schema/a/b.json",  # * stays within a segment
        "demo://resource/other/thing",  # matched by no glob and no template
    ],
)
def test_uri_tricks_never_match_a_public_glob(uri: str) -> None:
    assert foreign_uri(NARROW, "acme", uri)
    assert evaluate(NARROW, "acme", "resources/read", {"uri": uri}).action is Action.HIDE_RESOURCE


@pytest.mark.parametrize(
    "uri",
    [
        "demo://resource/dynamic/text/globex",  # the template's: another tenant's
        "demo://resource/dynamic/text/globex/extra",  # no template matches, but it is their ground
        "demo://resource/dynamic/text/",
        "demo://resource/DYNAMIC/text/globex",
        "demo://resource/\uff44ynamic/text/globex",  # a fullwidth d: "dynamic" once NFKC-normalised
        "demo://resource/%EF%BD%84ynamic/text/globex",  # (and so is it percent-encoded)
    ],
)
def test_a_too_wide_glob_still_reaches_nothing_a_tenant_template_could_claim(uri: str) -> None:
    assert foreign_uri(WIDE, "acme", uri)
    assert not foreign_uri(WIDE, "acme", "demo://resource/static/x")
    assert not foreign_uri(WIDE, "acme", "demo://resource/dynamic/text/acme")  # the caller's own


def test_without_public_uris_a_templated_scheme_stays_closed() -> None:
    assert foreign_uri(NONE, "acme", GUIDE)
    assert evaluate(NONE, "acme", "resources/read", {"uri": GUIDE}).action is Action.HIDE_RESOURCE
    assert not foreign_uri(NONE, "acme", "demo://resource/dynamic/text/acme")


def test_lists_templates_completion_and_notifications_keep_public_uris() -> None:
    listed = {
        "resources": [
            {"uri": GUIDE},
            {"uri": "demo://resource/dynamic/text/acme"},
            {"uri": "demo://resource/dynamic/text/globex"},
            {"uri": "demo://resource/session/x"},
        ]
    }
    for tenant in ("acme", "globex"):
        kept = [r["uri"] for r in filter_result(NARROW, tenant, "resources/list", listed)["resources"]]
        assert kept == [GUIDE, f"demo://resource/dynamic/text/{tenant}"]
    assert filter_result(NONE, "acme", "resources/list", listed)["resources"] == [listed["resources"][1]]
    templates = {"resourceTemplates": [{"uriTemplate": "demo://resource/static/document/{name}"}]}
    assert filter_result(NARROW, "acme", "resources/templates/list", templates) == templates
    assert filter_result(NONE, "acme", "resources/templates/list", templates)["resourceTemplates"] == []
    read = {"contents": [{"uri": GUIDE, "text": "shared"}]}
    assert filter_result(NARROW, "acme", "resources/read", read) == read
    completion = {
        "ref": {"type": "ref/resource", "uri": "demo://resource/static/document/{name}"},
        "argument": {"name": "name", "value": "f"},
    }
    assert evaluate(NARROW, "acme", "completion/complete", completion).action is Action.FORWARD
    assert evaluate(NONE, "acme", "completion/complete", completion).action is Action.HIDE_RESOURCE
    assert not mentions_foreign_uri(NARROW, "acme", {"uri": GUIDE})
    assert mentions_foreign_uri(NARROW, "acme", {"text": f"{GUIDE} and demo://resource/dynamic/text/globex"})
    assert not hides(NARROW, "acme", f"Unknown resource: {GUIDE}")
    assert hides(NARROW, "acme", "Unknown resource: demo://resource/static/../dynamic/text/globex")


@pytest.mark.parametrize(
    ("glob", "why"),
    [
        ("demo://**", "only stand in the path"),
        ("demo://*/static/**", "only stand in the path"),
        ("demo:*", "only stand in the path"),
        ("*://resource/static/**", "scheme"),
        ("noscheme/static/*", "scheme"),
        ("demo://resource/{tenant}/**", "not a template"),
        ("demo://resource/static/{name}", "not a template"),
        ("demo://resource/static/%2F*", "percent-escape"),
        ("demo://resource/static/%2e%2e/*", "percent-escape"),
        ("demo://resource/static\\*", "backslash"),
        ("demo://resource/static/ *", "whitespace"),
        ("demo://resource/static/***", "wildcards"),
        ("demo://resource/static/../dynamic/*", "dot segments"),
        ("other://shared/*", "no scheme of resources.tenant_uri_templates"),
        ("demo://resource/dynamic/text/shared*", "could never match"),
        ("demo://resource/Dynamic/text/**", "could never match"),
        ("notes://shared/**", "could never match"),  # notes://{tenant}/...: every notes:// URI is a tenant's
    ],
)
def test_a_glob_that_could_widen_or_never_match_is_a_config_error(
    glob: str, why: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=why):
        compile_public_uri(glob, tuple(TEMPLATES))
    path = tmp_path / "p.yaml"
    path.write_text(f"resources:\n  tenant_uri_templates: {TEMPLATES}\n  public_uris: ['{glob}']\n")
    with pytest.raises(ConfigError, match=r"resources\.public_uris\.0"):
        load_policy(path)


def test_policy_explain_names_the_public_uris_rule() -> None:
    outcome = decide(NARROW, "acme", {"method": "resources/read", "params": {"uri": GUIDE}}, None, None)
    assert outcome.decision == "allow" and outcome.rule == "resources.public_uris"
    lines = explain_lines(NARROW, "test", "acme", outcome)
    assert "rule: resources.public_uris" in lines
    assert any(GUIDE in line and "every tenant" in line for line in lines), lines
    foreign = {"method": "resources/read", "params": {"uri": "demo://resource/static/../dynamic/text/globex"}}
    assert decide(NARROW, "acme", foreign, None, None).decision == "deny"


def test_verify_still_reports_a_tenant_template_that_a_public_glob_covers() -> None:
    """A glob over an upstream template with a tenant-looking variable shares every tenant's URIs:
    `verify` must not count it as scoped."""
    template = "demo://resource/static/org/{org_id}/notes"
    assert tenant_variable(template) == "org_id"
    assert not template_covered(NARROW, template, "org_id")
    assert template_covered(NARROW, "demo://resource/dynamic/text/{org_id}", "org_id")
