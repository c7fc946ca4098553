"""Prometheus integration: a load-generating service, alerting rules and a Grafana dashboard."""
