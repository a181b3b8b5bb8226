"""Per-tenant upstream MCP servers behind one interface: HTTP and stdio."""
