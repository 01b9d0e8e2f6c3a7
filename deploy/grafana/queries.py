"""The dashboard's building blocks: panels, their PromQL targets, and the query helpers every
row of ``panels.py`` uses (the namespace matcher first, rates over Grafana's interval).
"""

from __future__ import annotations

from dataclasses import dataclass

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'namespace=~"$namespace"'
"""Label matcher every query starts with (the namespace variable; all by default)."""
QUANTILES = (0.5, 0.9, 0.99)
NOT_OK = 'code!="OK"'
NOT_HEALTH = 'route!="/health"'
"""HTTP API matcher: leaves out /health, which load balancers' checks (Envoy's every 5 s per
pod) call far more often than clients call anything else."""
HTTP_5XX = NOT_HEALTH + ',status=~"5.."'
HTTP_4XX = NOT_HEALTH + ',status=~"4.."'


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[Target, ...]
    description: str = ""


def rate(metric: str, extra: str = "") -> str:
    matchers = f"{SEL},{extra}" if extra else SEL
    return f"rate({metric}{{{matchers}}}[$__rate_interval])"


def quantiles(
    histogram: str, by: str = "tier", qs: tuple[float, ...] = QUANTILES
) -> tuple[Target, ...]:
    """p50/p90/p99 (or ``qs``) of a histogram, one line per ``by`` value."""
    return tuple(
        Target(
            f"histogram_quantile({q}, sum by (le, {by}) ({rate(histogram + '_bucket')}))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in qs
    )


def gauge(metric: str, how: str = "sum", by: str = "tier, pod") -> str:
    return f"{how} by ({by}) ({metric}{{{SEL}}})"
