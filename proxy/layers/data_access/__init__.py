"""Layer 1, data access: tenant arguments, tool rules, tenant-scoped URIs, the upstream's catalog."""
