"""Redis: sessions, cache, limits and audit streams shared by replicas."""
