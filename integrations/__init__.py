"""Integrations of discache with other libraries (installed as discache.integrations)."""
