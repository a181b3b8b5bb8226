"""Benchmark harness for mcp-tenant-proxy: `python -m bench.run` (see bench/README.md)."""
