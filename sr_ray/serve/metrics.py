"""Prometheus metrics of one ingress replica (`GET /metrics`, text format). Each replica has its own
registry, so a scrape through the Serve proxy sees the replica that answered; scrape replicas directly
(or sum over scrapes) for fleet totals."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self, model_version: str | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        # Prometheus' info pattern: join on it (`* on() group_left(model_version) sr_ray_model_info`) to label
        # any series with the reminder version this replica serves
        Gauge("sr_ray_model_info", "The reminder version this replica serves (value 1)", ["model_version"],
              registry=r).labels(model_version or "none").set(1)
        # every request but /health and /metrics, refused ones included; route: chat|models|openapi|other
        self.requests = Counter("sr_ray_requests", "Requests by HTTP status (a stream's outcome), mode and route",
                                ["status", "stream", "route"], registry=r)
        self.audit_failures = Counter("sr_ray_audit_write_failures", "Audit records the disk refused", registry=r)
        self.prompt_tokens = Counter("sr_ray_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.completion_tokens = Counter("sr_ray_completion_tokens", "Tokens emitted to clients", registry=r)
        self.checks = Counter("sr_ray_guard_checks", "Probe checks run", registry=r)
        self.interventions = Counter("sr_ray_guard_interventions", "Answers the probe flagged (reminder kept)",
                                     registry=r)
        self.dropped_tokens = Counter("sr_ray_guard_dropped_tokens", "Held-back tokens discarded at a flag",
                                      registry=r)
        self.in_flight = Gauge("sr_ray_requests_in_flight", "Chat completions being served", registry=r)
        self.latency = Histogram("sr_ray_request_latency_seconds", "Request latency, to the last byte",
                                 ["stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("sr_ray_time_to_first_token_seconds", "Time to the first released text",
                                     ["stream"], buckets=LATENCY_BUCKETS, registry=r)

    def finished(self, status: int, stream: bool, latency_s: float, prompt_tokens: int = 0,
                 safety: dict | None = None, completion_tokens: int = 0) -> None:
        """Latency and token counts of one chat completion (the request itself is counted by the recorder)."""
        mode = "true" if stream else "false"
        if status != 200:
            return
        self.latency.labels(mode).observe(latency_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        if safety:
            self.checks.inc(safety["checks_run"])
            self.interventions.inc(int(safety["flagged"]))
            self.dropped_tokens.inc(safety["tokens_dropped"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
