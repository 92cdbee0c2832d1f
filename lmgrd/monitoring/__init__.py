"""What operators watch: Prometheus metrics, the HTTP endpoints (status page, /metrics, /healthz) and the
usage log. Sees the daemon through the typing Protocols in :mod:`lmgrd.daemon.api` and its typed events.
"""
