"""Shared-state backends that implement the layers' backend Protocols."""
