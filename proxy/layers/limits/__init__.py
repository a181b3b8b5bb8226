"""Per-tenant capacity: rate, concurrency and the upstream circuit breaker."""
