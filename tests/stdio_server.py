"""A real stdio MCP server for the tests: the demo's notes service plus a few test tools.

Run as `python tests/stdio_server.py TENANT CANARY`; it speaks MCP on stdin/stdout until EOF.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from mcp.server.mcpserver import Context
from pydantic import BaseModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.demo_upstream import build_notes_server


class Answer(BaseModel):
    answer: str


def main() -> None:
    tenant, canary = sys.argv[1], sys.argv[2]
    server = build_notes_server(tenant, canary)

    @server.tool()
    def environment_names() -> list[str]:
        """The names (never the values) of the environment variables this process got."""
        return sorted(os.environ)

    @server.tool()
    def crash() -> str:
        """Exits the process at once, as a crashing server would."""
        os._exit(3)

    @server.tool()
    async def ask(question: str, ctx: Context) -> dict[str, Any]:
        """Asks the client (elicitation) and reports the answer."""
        result = await ctx.elicit(question, Answer)
        return {
            "action": result.action,
            "answer": result.data.answer if result.data else None,
            "canary": canary,
        }

    server.run("stdio")


if __name__ == "__main__":
    main()
