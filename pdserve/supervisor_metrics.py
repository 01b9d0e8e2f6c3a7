"""The launcher's own Prometheus metrics: what happened to each child ``pdserve up`` supervises.

Served at ``/metrics`` on the port after the workers' (``--metrics-base-port`` + 1 + prefill
+ decode) when ``--metrics-base-port`` is given, beside the gateway's and the workers' own:

* ``pdserve_worker_exits_total{worker,reason}``: a child's process ended (``reason``: the
  signal's name, ``exit_<code>``, or ``start_timeout`` for one killed for not serving in time);
* ``pdserve_worker_port_unavailable_total{worker,port}``: a start not made because a port the
  child binds was taken;
* ``pdserve_worker_restarts_total{worker}``: a child started again after a failure;
* ``pdserve_worker_up{worker}``: 1 while the child reports SERVING;
* ``pdserve_worker_gave_up{worker}``: 1 once the launcher gave up on the child.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from server_runtime.metrics import serve_metrics


class SupervisorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._exits = Counter(
            "pdserve_worker_exits_total",
            "Child processes of pdserve up that ended, by reason (signal, exit code, timeout)",
            ["worker", "reason"],
            registry=self.registry,
        )
        self._ports = Counter(
            "pdserve_worker_port_unavailable_total",
            "Starts not made because a port the child binds was taken",
            ["worker", "port"],
            registry=self.registry,
        )
        self._restarts = Counter(
            "pdserve_worker_restarts_total",
            "Children started again after a failure",
            ["worker"],
            registry=self.registry,
        )
        self._up = Gauge(
            "pdserve_worker_up", "1 while the child serves", ["worker"], registry=self.registry
        )
        self._gave_up = Gauge(
            "pdserve_worker_gave_up",
            "1 once the launcher gave up restarting the child",
            ["worker"],
            registry=self.registry,
        )

    def exited(self, worker: str, reason: str) -> None:
        self._exits.labels(worker, reason).inc()

    def port_unavailable(self, worker: str, port: int) -> None:
        self._ports.labels(worker, str(port)).inc()

    def restarted(self, worker: str) -> None:
        self._restarts.labels(worker).inc()

    def set_up(self, worker: str, up: bool) -> None:
        self._up.labels(worker).set(1 if up else 0)

    def gave_up(self, worker: str) -> None:
        self._gave_up.labels(worker).set(1)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose the metrics at ``http://host:port/metrics`` (0: off)."""
        serve_metrics(port, self.registry, host)
