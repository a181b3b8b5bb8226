"""stdio upstreams: local MCP servers run as processes that each belong to one tenant."""
