"""Layer 4, context containment: summary-only audit, recent activity, sealed request state."""
