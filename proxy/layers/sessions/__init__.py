"""Layer 3, sessions: proxy-issued ids bound to (tenant, principal)."""
