"""docs/k8s/adapterd-inference-pool.yaml stays true: its adapterd flags are flags `adapterd serve` takes, its
probes are the server's routes, and the endpoint picker's profile scores by LoRA affinity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from adapterd.server.cli.main import build_parser

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "k8s" / "adapterd-inference-pool.yaml"


def documents() -> dict[str, Any]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(EXAMPLE.read_text())}


def test_the_example_runs_adapterd_serve_with_flags_it_takes() -> None:
    [container] = documents()["Deployment"]["spec"]["template"]["spec"]["containers"]
    args = build_parser("serve").parse_args(["serve", *container["args"]])
    assert args.store == Path("/store") and args.metrics_tenant_adapters and args.exit_when_unhealthy
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_the_pool_selects_the_replicas_and_the_picker_scores_lora_affinity() -> None:
    docs = documents()
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    pool = docs["InferencePool"]["spec"]
    assert pool["selector"]["matchLabels"] == labels and pool["targetPorts"] == [{"number": 8080}]
    picker = yaml.safe_load(docs["ConfigMap"]["data"]["epp-config.yaml"])
    [profile] = picker["schedulingProfiles"]
    scored = {plugin["pluginRef"] for plugin in profile["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= scored
    assert scored <= {plugin["type"] for plugin in picker["plugins"]}
