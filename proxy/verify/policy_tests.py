"""`policy test` and `policy explain`: the policy engine's decisions, without any upstream.

A test file (YAML) names a policy (or a config, whose tenants name theirs) and lists cases:

    policy: ../policies/default.yaml        # or  config: ../proxy.yaml
    schemas:                                # optional: input schemas of tools and prompts, by name
      search_notes: {type: object, properties: {query: {$ref: "#/$defs/Q"}}, $defs: {...}}
    cases:
      - name: acme cannot name globex
        tenant: acme
        request: {method: tools/call, params: {name: list_notes, arguments: {tenant_id: globex}}}
        expect: {deny: tenant_arguments}
      - tenant: acme
        request: {method: tools/call, params: {name: list_notes, arguments: {}}}
        expect: {rewrite: {arguments: {tenant_id: acme}}}   # params after the rewrite, key by key
      - tenant: acme
        client_answer: {action: accept, content: {org_id: acme}}   # an answer to a server request
        expect: allow

`expect` is `allow`, `{rewrite: PARAMS}`, `{deny: RULE}` or `{answer: RESULT}` (a completion the
proxy answers itself), optionally with `spoof: true|false` and `argument: NAME`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from proxy.config import ConfigError, StrictModel, TenantId, format_validation_error, load_config, read_yaml
from proxy.layers.data_access.engine import Action, Decision, apply_rewrites, evaluate, evaluate_answer
from proxy.layers.data_access.policy import Policy, load_policy
from proxy.types import JsonObject


class Expectation(StrictModel):
    allow: Literal[True] | None = None
    rewrite: JsonObject | None = Field(default=None, description="params after the rewrite, key by key")
    deny: str | None = Field(default=None, description="the rule that refuses the request")
    answer: JsonObject | None = None
    spoof: bool | None = None
    argument: str | None = None

    @model_validator(mode="after")
    def _one_decision(self) -> Expectation:
        given = [k for k in ("allow", "rewrite", "deny", "answer") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("expect exactly one of allow, rewrite, deny, answer")
        return self

    @property
    def decision(self) -> str:
        return next(k for k in ("allow", "rewrite", "deny", "answer") if getattr(self, k) is not None)


class Case(StrictModel):
    name: str | None = None
    tenant: TenantId
    request: JsonObject | None = None
    client_answer: JsonObject | None = None
    input_schema: JsonObject | None = None
    policy: str | None = None
    expect: Literal["allow"] | Expectation

    @model_validator(mode="after")
    def _one_message(self) -> Case:
        if (self.request is None) == (self.client_answer is None):
            raise ValueError("give exactly one of request, client_answer")
        return self

    @property
    def expectation(self) -> Expectation:
        return self.expect if isinstance(self.expect, Expectation) else Expectation(allow=True)


class TestFile(StrictModel):
    policy: str | None = None
    config: str | None = None
    schemas: dict[str, JsonObject] = Field(default_factory=dict)
    cases: list[Case] = Field(min_length=1)


@dataclass(frozen=True)
class Outcome:
    """A decision as a test and an operator read it."""

    decision: str  # allow | rewrite | deny | answer
    rule: str | None
    reason: str | None
    params: JsonObject  # the params as the upstream would get them
    answer: JsonObject | None
    spoof: bool
    argument: str | None
    rewrites: tuple[str, ...]

    def describe(self) -> str:
        if self.decision == "deny":
            return f"deny by {self.rule} ({self.reason})"
        if self.decision == "rewrite":
            return f"rewrite to {json.dumps(self.params, ensure_ascii=False)}"
        if self.decision == "answer":
            return f"answer {json.dumps(self.answer, ensure_ascii=False)}"
        return "allow"


def decide(policy: Policy | None, tenant: str, request: JsonObject | None, answer: JsonObject | None,
           schema: JsonObject | None) -> Outcome:  # fmt: skip
    """What the proxy does with a request (or a client's answer) of `tenant` under `policy`."""
    params = request.get("params") if request is not None else None
    params = copy.deepcopy(params) if isinstance(params, dict) else {}
    if policy is None:
        return Outcome("allow", None, "the tenant has no policy", params, None, False, None, ())
    if answer is not None:
        decision = evaluate_answer(policy, tenant, {"result": answer})
        params = {"result": copy.deepcopy(answer)}
    else:
        method = request.get("method") if request is not None else None
        decision = evaluate(policy, tenant, method if isinstance(method, str) else None, params, schema)
    return _outcome(decision, params)


def _outcome(decision: Decision, params: JsonObject) -> Outcome:
    kind = {
        Action.FORWARD: "allow", Action.REWRITE: "rewrite", Action.DENY: "deny",
        Action.HIDE_RESOURCE: "deny", Action.ANSWER: "answer",
    }[decision.action]  # fmt: skip
    rule, reason = decision.rule, decision.reason if decision.rule else None
    if decision.action is Action.REWRITE and rule is None:
        rule = "tenant_arguments"
        reason = "tenant arguments the schema declares and the request left out are filled in"
    if decision.action is Action.HIDE_RESOURCE:
        reason = f"{decision.uri!r} names another tenant: answered exactly as an unknown resource"
    elif decision.rule == "resources.public_uris":
        reason = f"{decision.uri!r} is one of resources.public_uris: shared by every tenant of the upstream"
    apply_rewrites(params, decision.rewrites)
    rewrites = tuple(
        f"{'.'.join(str(p) for p in r.path)} <- {json.dumps(r.value)}" for r in decision.rewrites
    )
    return Outcome(kind, rule, reason, params, decision.answer, decision.spoof, decision.argument, rewrites)


def mismatch(expected: Expectation, outcome: Outcome) -> str | None:
    """Why the outcome is not the expected one, or None when it is."""
    want = expected.decision
    if outcome.decision != want:
        return f"expected {want}, got {outcome.describe()}"
    if expected.deny is not None and expected.deny != outcome.rule:
        return f"expected deny by {expected.deny}, got {outcome.describe()}"
    if expected.rewrite is not None:
        for key, value in expected.rewrite.items():
            if outcome.params.get(key) != value:
                return f"expected {key} rewritten to {json.dumps(value)}, got {outcome.describe()}"
    if expected.answer is not None and expected.answer != outcome.answer:
        return f"expected answer {json.dumps(expected.answer)}, got {outcome.describe()}"
    if expected.spoof is not None and expected.spoof != outcome.spoof:
        return f"expected spoof {expected.spoof}, got {outcome.spoof} ({outcome.describe()})"
    if expected.argument is not None and expected.argument != outcome.argument:
        return f"expected argument {expected.argument!r}, got {outcome.argument!r} ({outcome.describe()})"
    return None


class PolicySource:
    """Where a case's policy comes from: a policy file, or the tenant's policy in a config."""

    def __init__(self, policy: Path | None, config: Path | None) -> None:
        self.policy_path = policy
        self.config = load_config(config) if config is not None and policy is None else None
        self._loaded: dict[Path, Policy] = {}

    def path_for(self, tenant: str) -> Path | None:
        if self.policy_path is not None:
            return self.policy_path
        if self.config is None:
            raise ConfigError(
                "policy test", "", "no policy: give policy: or config: in the file, or --policy"
            )
        tenant_config = self.config.tenant_config(tenant)
        if tenant_config is None:
            raise ConfigError(self.config.source, "tenants", f"tenant {tenant!r} is not configured")
        return self.config.policy_file(tenant_config.policy) if tenant_config.policy else None

    def policy_for(self, tenant: str, override: Path | None = None) -> Policy | None:
        path = override or self.path_for(tenant)
        if path is None:
            return None
        if path not in self._loaded:
            self._loaded[path] = load_policy(path)
        return self._loaded[path]


def load_test_file(path: Path) -> TestFile:
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(path, "", "a policy test file must be a YAML mapping with cases")
    try:
        return TestFile.model_validate(raw)
    except ValidationError as exc:
        raise format_validation_error(path, exc) from None


def run_file(
    path: Path, default_policy: Path | None, default_config: Path | None
) -> list[tuple[str, str | None]]:
    """(case label, failure or None) of every case of one test file."""
    tests = load_test_file(path)
    here = path.resolve().parent
    source = PolicySource(
        here / tests.policy if tests.policy else None if tests.config else default_policy,
        here / tests.config if tests.config else None if tests.policy else default_config,
    )
    results = []
    for number, case in enumerate(tests.cases, start=1):
        label = f"{path}: {case.name or f'case {number}'}"
        policy = source.policy_for(case.tenant, here / case.policy if case.policy else None)
        name = case.request.get("params", {}).get("name") if case.request is not None else None
        schema = case.input_schema or (tests.schemas.get(name) if isinstance(name, str) else None)
        outcome = decide(policy, case.tenant, case.request, case.client_answer, schema)
        results.append((label, mismatch(case.expectation, outcome)))
    return results


def explain_lines(policy: Policy | None, policy_name: str, tenant: str, outcome: Outcome) -> list[str]:
    lines = [f"tenant {tenant}, policy {policy_name}", f"decision: {outcome.decision}"]
    if outcome.rule is not None:
        lines.append(f"rule: {outcome.rule}")
    if outcome.reason is not None:
        lines.append(f"reason: {outcome.reason}")
    if outcome.decision == "allow" and policy is not None and outcome.rule is None:
        lines.append(
            "reason: no rule refuses or changes it (tools allowed, tenant arguments absent or the caller's)"
        )
    lines.extend(f"rewrite: {line}" for line in outcome.rewrites)
    if outcome.decision == "rewrite":
        lines.append(f"params sent upstream: {json.dumps(outcome.params, ensure_ascii=False)}")
    if outcome.answer is not None:
        lines.append(f"answered by the proxy: {json.dumps(outcome.answer, ensure_ascii=False)}")
    if outcome.spoof:
        lines.append("spoof attempt: yes (counted in mcp_proxy_spoof_attempts_total and audited)")
    return lines


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    return {
        "decision": outcome.decision,
        "rule": outcome.rule,
        "reason": outcome.reason,
        "argument": outcome.argument,
        "spoof": outcome.spoof,
        "rewrites": list(outcome.rewrites),
        "params": outcome.params,
        "answer": outcome.answer,
    }
