"""Shared fixtures and hypothesis settings."""
from hypothesis import HealthCheck, settings

settings.register_profile(
    "discache", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("discache")
