"""The serve metrics layer records each series twice: into the replica's own registry (`GET /metrics`) and
through Ray's metrics, read back here from the node's Ray metrics export port in the session's real Ray."""

from __future__ import annotations

import uuid

from prometheus_client.parser import text_string_to_metric_families

from sr_ray.serve.metrics import ServeMetrics
from tests.serve.conftest import scrape_ray

OURS = ("status", "stream", "route", "le")  # the serve layer's own labels (+ model_version), not Ray's


def record(metrics: ServeMetrics) -> None:
    """What two answered chat completions, one refused request and an audit failure record."""
    metrics.in_flight.inc()
    metrics.in_flight.inc()
    metrics.first_token.labels("true").observe(0.02)
    metrics.finished(200, False, 0.3, prompt_tokens=5, completion_tokens=7,
                     safety={"checks_run": 3, "flagged": True, "tokens_dropped": 2})
    metrics.finished(200, True, 0.07, prompt_tokens=0, completion_tokens=0,  # zero counts: Ray refuses inc(0)
                     safety={"checks_run": 1, "flagged": False, "tokens_dropped": 0})
    metrics.finished(500, False, 9.0)  # failed: counted by the recorder only
    metrics.in_flight.dec()
    for status in (200, 200, 401):
        metrics.requests.labels(status, "false", "chat").inc()
    metrics.audit_failures.inc()


def by_series(samples, prefix: str = "") -> dict:
    """{(name without prefix, our labels): value}; `_created` and Ray's bucket-midpoint `_sum` left out."""
    return {(s.name.removeprefix(prefix), tuple((k, float(v) if k == "le" else v)
                                                for k, v in sorted(s.labels.items()) if k in OURS)): s.value
            for s in samples if not s.name.endswith(("_created", "_sum"))}


def test_local_registry_and_ray_twins_have_the_same_series():
    metrics = ServeMetrics("reminder/7")
    record(metrics)
    local = by_series(s for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples)
    assert local[("sr_ray_requests_total", (("route", "chat"), ("status", "200"), ("stream", "false")))] == 2
    assert local[("sr_ray_requests_in_flight", ())] == 1
    assert local[("sr_ray_guard_interventions_total", ())] == 1 and local[("sr_ray_prompt_tokens_total", ())] == 5
    assert local[("sr_ray_request_latency_seconds_bucket", (("le", 0.25), ("stream", "false")))] == 0
    assert local[("sr_ray_request_latency_seconds_bucket", (("le", 0.5), ("stream", "false")))] == 1
    assert 'sr_ray_model_info{model_version="reminder/7"} 1.0' in metrics.render().decode()
    twin = metrics.requests.cluster.info
    assert twin["name"] == "sr_ray_requests" and twin["tag_keys"] == ("status", "stream", "route", "model_version")
    assert twin["default_tags"] == {"model_version": "reminder/7"}
    assert metrics.latency.cluster.info["boundaries"] == [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]


def test_ray_exports_what_the_replica_recorded(ray_session):
    version = f"metrics-test/{uuid.uuid4().hex[:8]}"  # this test's series only, whatever else the process records
    metrics = ServeMetrics(version)
    record(metrics)
    expected = by_series(s for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples)

    def mine(samples):
        return by_series((s for s in samples if s.name.startswith("ray_sr_ray_")
                          and s.labels.get("model_version") == version), prefix="ray_")

    exported = mine(scrape_ray(lambda samples: mine(samples) == expected))
    assert exported == expected
    assert exported[("sr_ray_requests_total", (("route", "chat"), ("status", "401"), ("stream", "false")))] == 1
    assert exported[("sr_ray_model_info", ())] == 1
