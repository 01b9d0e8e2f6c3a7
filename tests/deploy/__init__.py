"""Checks of deploy/ (Kubernetes, Envoy, nginx, Prometheus, Grafana, Docker) without a cluster."""
