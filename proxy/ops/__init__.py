"""Operating the proxy: health and readiness, hot reload, metrics, logs, reports, schemas."""
