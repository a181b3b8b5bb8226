"""The HTTP edge: the MCP endpoint, its flows and relay, app keys, the server."""
