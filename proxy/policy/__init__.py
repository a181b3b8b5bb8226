"""Policy: tenant arguments, tool allow/deny, tenant-scoped resource URIs (layer 1 of isolation)."""
