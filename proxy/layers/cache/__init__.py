"""Layer 2, cache: tenant-keyed response cache with per-tenant budgets and single flight."""
