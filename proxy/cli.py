"""mcp-tenant-proxy: run, check-config, mint-token, schema, demo, verify, policy.

README.md explains each command; docs/configuration.md is the reference of every config and policy key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Sequence

from proxy.config import ConfigError, ProxyConfig, load_config
from proxy.ops.log import configure_logging

EXIT_CONFIG = 2


async def serve(config: ProxyConfig) -> None:
    import structlog

    from proxy.http.server import start_server

    log = structlog.get_logger("proxy")
    runner, port = await start_server(config)
    # What start-up built (config, policies, keys, tenants' runtimes) lives as long as the process:
    # kept out of the cyclic collector's reach, each collection during requests only walks what
    # requests allocate, not every tenant's configuration.
    gc.collect()
    gc.freeze()
    log.info(
        "listening",
        host=config.listen.host,
        port=port,
        path=config.listen.path,
        tenants=len(config.tenants),
        tenant_templates=len(config.tenant_templates),
    )
    from proxy.ops.reload import reload_config

    stop, hurry = asyncio.Event(), asyncio.Event()  # the first SIGTERM/SIGINT drains, a second hurries
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: (hurry if stop.is_set() else stop).set())
    reloads: set[asyncio.Task[bool]] = set()

    def reload_soon() -> None:
        task = asyncio.create_task(reload_config(runner.app, only_if_changed=True))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_soon)
    await stop.wait()
    from proxy.ops.drain import drain_and_stop

    await drain_and_stop(runner, hurry)
    log.info("stopped")


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from proxy.runtime import Runtime

    Runtime.build(config)  # fail on secrets and keys before binding the port
    configure_logging(args.log_level, {"auto": None, "json": True, "console": False}[args.log_format])
    _use_uvloop()
    asyncio.run(serve(config))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from proxy.runtime import Runtime

    Runtime.build(config)  # keys, secrets and every policy compile, as `run` needs them
    templates = f", {len(config.tenant_templates)} tenant templates" if config.tenant_templates else ""
    summary = f"{len(config.tenants)} tenants{templates}, {len(config.auth.issuers)} issuers"
    if args.probe:
        from proxy.ops.probe import probe_config

        configure_logging("critical")  # the problems are the output, one line each
        problems = asyncio.run(probe_config(config))
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            return EXIT_CONFIG
        summary += "; every upstream, JWKS URL and state backend answered"
    print(f"{args.config}: ok ({summary})")
    return 0


def _tenant_list(config: ProxyConfig, limit: int = 10) -> str:
    names = sorted(config.tenants)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def cmd_mint_token(args: argparse.Namespace) -> int:
    from proxy.layers.auth.authenticator import mint_token

    config = load_config(args.config)
    if args.tenant not in config.tenants and not args.allow_unknown_tenant:
        print(
            f"mint-token: tenant {args.tenant!r} is not configured in {args.config} (tenants: "
            f"{_tenant_list(config)}); the proxy refuses its tokens with 403. "
            "--allow-unknown-tenant mints one anyway.",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        token = mint_token(config, args.issuer, args.tenant, args.sub, args.ttl, args.scope)
    except ValueError as exc:
        print(f"mint-token: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"Authorization: Bearer {token}" if args.header else token)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return asyncio.run(run_demo())


def cmd_schema(args: argparse.Namespace) -> int:
    if args.markdown:
        from proxy.ops.reference import reference_markdown

        print(reference_markdown(), end="")
        return 0
    if args.kind is None:
        print("schema: name config or policy, or give --markdown", file=sys.stderr)
        return EXIT_CONFIG
    from proxy.ops.schema import schema_text

    print(schema_text(args.kind), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-tenant-proxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve until SIGTERM/SIGINT")
    run.add_argument("--config", required=True)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="log lines on stderr: JSON lines, or console text for people (auto: console when stderr "
        "is a terminal); either way client-chosen values are bounded and cannot forge a line",
    )
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser("check-config", help="validate the config and every policy it names")
    check.add_argument("--config", required=True)
    check.add_argument(
        "--probe",
        action="store_true",
        help="also try what the config points at: every HTTP upstream answers an MCP handshake, every "
        "stdio program starts and completes one, every JWKS URL serves keys, the state backend "
        "accepts its credentials (one line per problem, exit 2 when any)",
    )
    check.set_defaults(handler=cmd_check_config)

    mint = commands.add_parser("mint-token", help="print a token signed with an issuer's configured key")
    mint.add_argument("--config", required=True)
    mint.add_argument("--issuer", required=True)
    mint.add_argument("--tenant", required=True)
    mint.add_argument("--sub", required=True)
    mint.add_argument("--ttl", type=int, default=3600)
    mint.add_argument("--scope", default=None)
    mint.add_argument(
        "--header", action="store_true", help="print a ready header line: Authorization: Bearer TOKEN"
    )
    mint.add_argument(
        "--allow-unknown-tenant",
        action="store_true",
        help="mint a token for a tenant the config does not define (the proxy answers it with 403)",
    )
    mint.set_defaults(handler=cmd_mint_token)

    schema = commands.add_parser("schema", help="print the JSON Schema of the config or policy files")
    schema.add_argument("kind", nargs="?", choices=["config", "policy"])
    schema.add_argument(
        "--markdown", action="store_true", help="print the configuration reference (docs/configuration.md)"
    )
    schema.set_defaults(handler=cmd_schema)

    demo = commands.add_parser(
        "demo", help="run demo upstreams for three tenants and the proxy, and show isolation"
    )
    demo.set_defaults(handler=cmd_demo)

    from proxy.verify.command import add_commands

    add_commands(commands)  # verify, policy suggest|test|explain
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
