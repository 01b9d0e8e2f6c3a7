"""GPU telemetry through NVML (nvidia-ml-py), as Prometheus metrics; one clear "no GPU" state.

NVML is initialised when the collector is built (at an entry point), never at import time.
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)


class GpuCollector(Collector):
    """Per-device utilization, memory, power and temperature; ``pdserve_gpu_available`` 0 and
    nothing else when NVML or a GPU is absent."""

    def __init__(self, tier: str) -> None:
        self._tier = tier
        self._nvml = None
        self.reason = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # NVMLError_LibraryNotFound and friends: no GPU here
            self.reason = f"no GPU: {type(exc).__name__}"
        log.info("gpu_telemetry", available=self._nvml is not None, reason=self.reason or None)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        available = GaugeMetricFamily(
            "pdserve_gpu_available", "1 when NVML sees GPUs.", labels=["tier"]
        )
        available.add_metric([self._tier], 1.0 if self._nvml is not None else 0.0)
        yield available
        if self._nvml is None:
            return
        nv = self._nvml
        labels = ["tier", "gpu"]
        util = GaugeMetricFamily(
            "pdserve_gpu_utilization_ratio", "GPU busy fraction.", labels=labels
        )
        used = GaugeMetricFamily("pdserve_gpu_memory_used_bytes", "GPU memory used.", labels=labels)
        total = GaugeMetricFamily("pdserve_gpu_memory_total_bytes", "GPU memory.", labels=labels)
        power = GaugeMetricFamily("pdserve_gpu_power_watts", "GPU power draw.", labels=labels)
        temp = GaugeMetricFamily(
            "pdserve_gpu_temperature_celsius", "GPU temperature.", labels=labels
        )
        try:
            for index in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                key = [self._tier, str(index)]
                util.add_metric(key, nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                memory = nv.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric(key, float(memory.used))
                total.add_metric(key, float(memory.total))
                power.add_metric(key, nv.nvmlDeviceGetPowerUsage(handle) / 1000.0)
                temp.add_metric(key, float(nv.nvmlDeviceGetTemperature(handle, 0)))
        except nv.NVMLError as exc:
            log.warning("gpu_telemetry_failed", error=str(exc))
        yield from (util, used, total, power, temp)


def register_gpu_metrics(registry: CollectorRegistry, tier: str) -> GpuCollector:
    collector = GpuCollector(tier)
    registry.register(collector)
    return collector
