"""Commands: run, check-config, mint-token, demo, verify, policy (see CONTRACT.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from proxy.config import ConfigError, ProxyConfig, load_config
from proxy.ops.log import configure_logging

EXIT_CONFIG = 2


async def start_server(config: ProxyConfig) -> tuple[web.AppRunner, int]:
    """Start serving `config`; returns the runner and the bound port."""
    from proxy.app import create_app
    from proxy.http.server import ProxyRunner

    app = create_app(config)
    runner = ProxyRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=config.listen.shutdown_grace_seconds,
        access_log=None,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.listen.host, config.listen.port, reuse_address=True)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else config.listen.port
    return runner, port


async def serve(config: ProxyConfig) -> None:
    import structlog

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

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def reload_soon() -> None:
        task = asyncio.create_task(reload_config(runner.app))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_soon)
    await stop.wait()
    log.info("draining")
    await runner.cleanup()
    log.info("stopped")


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from proxy.runtime import Runtime

    Runtime.build(config)  # fail on secrets and keys before binding the port
    configure_logging(args.log_level)
    _use_uvloop()
    asyncio.run(serve(config))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from proxy.runtime import Runtime

    Runtime.build(config)  # keys, secrets and every policy compile, as `run` needs them
    templates = f", {len(config.tenant_templates)} tenant templates" if config.tenant_templates else ""
    print(f"{args.config}: ok ({len(config.tenants)} tenants{templates}, {len(config.auth.issuers)} issuers)")
    return 0


def cmd_mint_token(args: argparse.Namespace) -> int:
    from proxy.layers.auth.authenticator import mint_token

    config = load_config(args.config)
    try:
        token = mint_token(config, args.issuer, args.tenant, args.sub, args.ttl, args.scope)
    except ValueError as exc:
        print(f"mint-token: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(token)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return asyncio.run(run_demo())


def cmd_schema(args: argparse.Namespace) -> int:
    from proxy.ops.schema import schema_text

    print(schema_text(args.kind), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-tenant-proxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve until SIGTERM/SIGINT")
    run.add_argument("--config", required=True)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser("check-config", help="validate the config and every policy it names")
    check.add_argument("--config", required=True)
    check.set_defaults(handler=cmd_check_config)

    mint = commands.add_parser("mint-token", help="print a token signed with an issuer's configured key")
    mint.add_argument("--config", required=True)
    mint.add_argument("--issuer", required=True)
    mint.add_argument("--tenant", required=True)
    mint.add_argument("--sub", required=True)
    mint.add_argument("--ttl", type=int, default=3600)
    mint.add_argument("--scope", default=None)
    mint.set_defaults(handler=cmd_mint_token)

    schema = commands.add_parser("schema", help="print the JSON Schema of the config or policy files")
    schema.add_argument("kind", choices=["config", "policy"])
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
