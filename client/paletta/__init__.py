"""Paletta Python SDK."""
