"""The MCP wire protocol: JSON-RPC parsing, the header/body rules, SSE, and every error a client sees."""
