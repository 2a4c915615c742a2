"""Write prometheusrule.yaml from ../prometheus/alerts.yml: the same alert rules, wrapped as a
Prometheus Operator PrometheusRule. Run it after editing the rules:

    python deploy/kubernetes/render_rules.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "prometheus" / "alerts.yml"
TARGET = HERE / "prometheusrule.yaml"
HEADER = (
    "# Generated from deploy/prometheus/alerts.yml by deploy/kubernetes/render_rules.py (the\n"
    "# tests check that both hold the same groups): the alert rules for the Prometheus Operator.\n"
)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the PromQL expressions) as literal blocks, as they were written."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def render() -> str:
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "resilient-kafka",
            "labels": {"app.kubernetes.io/name": "orders-consumer"},
        },
        "spec": yaml.safe_load(RULES.read_text()),
    }
    return HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1000)


if __name__ == "__main__":
    TARGET.write_text(render())
