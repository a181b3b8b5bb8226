"""The commands of this package: `verify` and `policy suggest|test|explain`.

verify           exit 0: no findings; 1: findings; 2: could not run (the reason on stderr)
policy suggest   prints a commented policy; exit 2 when the upstream cannot be reached
policy test      exit 0: every case passed; 1: a case failed; 2: a file could not be read
policy explain   prints the decision and the rule that made it; exit 2 on bad input
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from proxy.config import ConfigError, load_config
from proxy.verify.client import VerifyError
from proxy.verify.report import EXIT_CLEAN, EXIT_COULD_NOT_RUN, EXIT_FINDINGS


def add_commands(commands: Any) -> None:
    """Add `verify` and `policy` to the CLI's subcommands."""
    verify = commands.add_parser("verify", help="check that a running deployment keeps its tenants apart")
    verify.add_argument("--config", required=True)
    verify.add_argument("--tenants", required=True, help="comma-separated tenant ids, e.g. acme,globex")
    verify.add_argument("--url", default=None, help="the proxy's MCP endpoint (default: listen.public_url)")
    verify.add_argument("--token", action="append", default=[], metavar="TENANT=TOKEN",
                        help="a tenant's token (default: minted with an issuer of the config)")  # fmt: skip
    verify.add_argument("--probe", action="store_true", help="also run the probes, which write canaries")
    verify.add_argument("--json", action="store_true", help="print one JSON document")
    verify.add_argument("--accept", action="append", default=[], metavar="FINDING_ID",
                        help="a reviewed finding that no longer fails the run")  # fmt: skip
    verify.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    verify.set_defaults(handler=cmd_verify)

    policy = commands.add_parser("policy", help="suggest, test and explain policies")
    actions = policy.add_subparsers(dest="policy_command", required=True)
    suggest = actions.add_parser("suggest", help="print a policy derived from a tenant's upstream")
    suggest.add_argument("--config", required=True)
    suggest.add_argument("--tenant", required=True)
    suggest.add_argument("--timeout", type=float, default=30.0)
    suggest.set_defaults(handler=cmd_policy_suggest)

    test = actions.add_parser("test", help="run policy test cases (YAML) against the policy engine")
    test.add_argument("files", nargs="+", type=Path)
    test.add_argument("--policy", type=Path, default=None, help="for files that name no policy or config")
    test.add_argument("--config", type=Path, default=None, help="for files that name no policy or config")
    test.set_defaults(handler=cmd_policy_test)

    explain = actions.add_parser("explain", help="show which rule decides a request")
    source = explain.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="the tenant's policy is the one the config names")
    source.add_argument("--policy", type=Path)
    explain.add_argument("--tenant", required=True)
    explain.add_argument("--request", required=True, help="JSON: {method, params}, or @FILE")
    explain.add_argument("--schema", default=None, help="JSON: the tool's or prompt's input schema, or @FILE")
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(handler=cmd_policy_explain)


def _could_not_run(command: str, reason: str, as_json: bool = False) -> int:
    print(f"{command}: {reason}", file=sys.stderr)
    if as_json:
        print(json.dumps({"exit_code": EXIT_COULD_NOT_RUN, "error": reason}))
    return EXIT_COULD_NOT_RUN


def _tokens(pairs: list[str]) -> dict[str, str]:
    tokens = {}
    for pair in pairs:
        tenant, sep, token = pair.partition("=")
        if not sep or not tenant or not token:
            raise VerifyError(f"--token {pair.partition('=')[0]}=...: write it as TENANT=TOKEN")
        tokens[tenant] = token
    return tokens


def cmd_verify(args: argparse.Namespace) -> int:
    from proxy.verify.run import tokens_for, verify

    try:
        config = load_config(args.config)
        tenants = tuple(dict.fromkeys(t.strip() for t in args.tenants.split(",") if t.strip()))
        if not tenants:
            raise VerifyError("--tenants names no tenant")
        tokens = tokens_for(config, tenants, _tokens(args.token))
        url = args.url or config.listen.resource_url
        accepted = frozenset(args.accept)
        run = verify(
            config, tenants, url, tokens, probes=args.probe, request_timeout=args.timeout, accepted=accepted
        )
        report = asyncio.run(run)
    except (VerifyError, ConfigError) as exc:
        return _could_not_run("verify", str(exc), args.json)
    print(report.json_text() if args.json else report.text().rstrip("\n"))
    return report.exit_code


def cmd_policy_suggest(args: argparse.Namespace) -> int:
    from proxy.verify.suggest import inspect_upstream, suggest_policy

    try:
        config = load_config(args.config)
        if config.tenant_config(args.tenant) is None:
            raise VerifyError(f"tenant {args.tenant!r} is not configured in {config.source}")
        view = asyncio.run(inspect_upstream(config, args.tenant, args.timeout))
    except (VerifyError, ConfigError) as exc:
        return _could_not_run("policy suggest", str(exc))
    print(suggest_policy(view), end="")
    return EXIT_CLEAN


def cmd_policy_test(args: argparse.Namespace) -> int:
    from proxy.verify.policy_tests import run_file

    results: list[tuple[str, str | None]] = []
    try:
        for path in args.files:
            results.extend(run_file(path, args.policy, args.config))
    except ConfigError as exc:
        return _could_not_run("policy test", str(exc))
    for label, failure in results:
        print(f"PASS {label}" if failure is None else f"FAIL {label}: {failure}")
    failed = sum(1 for _, failure in results if failure is not None)
    print(f"{len(results)} cases: {len(results) - failed} passed, {failed} failed")
    return EXIT_FINDINGS if failed else EXIT_CLEAN


def _json_argument(option: str, text: str) -> Any:
    try:
        raw = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
        return json.loads(raw)
    except (OSError, ValueError) as exc:
        raise VerifyError(f"{option}: not JSON ({exc})") from None


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from proxy.verify.policy_tests import PolicySource, decide, explain_lines, outcome_json

    try:
        request = _json_argument("--request", args.request)
        schema = _json_argument("--schema", args.schema) if args.schema else None
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            raise VerifyError('--request: give {"method": ..., "params": {...}}')
        source = PolicySource(args.policy, args.config)
        path = source.path_for(args.tenant)
        policy = source.policy_for(args.tenant)
    except (VerifyError, ConfigError) as exc:
        return _could_not_run("policy explain", str(exc))
    outcome = decide(policy, args.tenant, request, None, schema if isinstance(schema, dict) else None)
    if args.json:
        print(
            json.dumps(
                {"tenant": args.tenant, "policy": str(path) if path else None, **outcome_json(outcome)}
            )
        )
    else:
        name = f"{path.stem} ({path})" if path is not None else "none (the tenant has no policy)"
        print("\n".join(explain_lines(policy, name, args.tenant, outcome)))
    return EXIT_CLEAN
