"""Who is calling: bearer JWT verification and the tenant it names (layer 1's foundation)."""
