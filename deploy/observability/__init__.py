"""Grafana dashboard, Prometheus scrape config and the names they rely on."""
