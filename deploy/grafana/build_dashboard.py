"""Build ``pdserve-dashboard.json`` (Grafana, Prometheus data source) from ``panels.py``.

    python deploy/grafana/build_dashboard.py          # rewrites pdserve-dashboard.json

Edit the panels there, not the JSON: tests/deploy/test_observability.py fails when the two
differ, and checks every query against the metric names pdserve exports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # panels.py beside this script

from panels import DATASOURCE, ROWS, Panel

OUTPUT = Path(__file__).with_name("pdserve-dashboard.json")

PANEL_WIDTH = 12
PANEL_HEIGHT = 8


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, object]:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": PANEL_HEIGHT, "w": PANEL_WIDTH, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": t.expr,
                "legendFormat": t.legend,
            }
            for i, t in enumerate(panel.targets)
        ],
    }


def dashboard() -> dict[str, object]:
    """The dashboard as Grafana's JSON model."""
    panels: list[dict[str, object]] = []
    y = 0
    for title, row_panels in ROWS:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        for i, panel in enumerate(row_panels):
            x = (i % 2) * PANEL_WIDTH
            panels.append(_panel_json(panel, len(panels) + 1, x, y))
            if x:
                y += PANEL_HEIGHT
        if len(row_panels) % 2:
            y += PANEL_HEIGHT
    return {
        "uid": "pdserve-overview",
        "title": "pdserve",
        "description": "pdserve tiers: traffic, latency, load, KV transfer, GPU.",
        "tags": ["pdserve", "llm"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {
                        "query": 'label_values(up{job="pdserve"}, namespace)',
                        "refId": "namespace",
                    },
                    "definition": 'label_values(up{job="pdserve"}, namespace)',
                    "refresh": 2,
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {},
                    "hide": 0,
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
