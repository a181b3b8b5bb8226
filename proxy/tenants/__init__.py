"""Which configuration serves a tenant, and the tenant runtimes built from it."""
