"""Serving metrics, recorded twice: through Ray's metrics (the cluster-wide view) and into this replica's own
Prometheus registry (`GET /metrics`).

Cluster-wide: every series goes through `ray.serve.metrics` (Ray's `ray.util.metrics` with Serve's
`deployment`/`replica`/`application` tags added inside a replica), which each node's Ray metrics agent exports
on its metrics export port as `ray_<name>`; Prometheus finds every node through Ray's service discovery file
(docs/operations.md, "Prometheus metrics"). Each series also carries `model_version`, the reminder version this replica
serves. `GET /metrics` through the Serve proxy shows only the replica that answered; it stays for a single
replica, a local `sr-ray serve` without Prometheus, and for looking at one replica's counts.
"""

from __future__ import annotations

import prometheus_client as prom
from prometheus_client import CollectorRegistry, generate_latest
from ray.serve import metrics as ray_metrics

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Series:
    """One metric in both views, with the prometheus_client calls the serve layer makes (`labels(...)`, `inc`,
    `dec`, `set`, `observe`). Ray's gauges only `set`, so a gauge's values are kept here, per label values."""

    def __init__(self, local, cluster, label_names: tuple[str, ...], values: tuple[str, ...] = (),
                 gauge_values: dict | None = None):
        self.local, self.cluster, self.label_names, self.values = local, cluster, label_names, values
        self.gauge_values = gauge_values  # None: not a gauge

    def labels(self, *values) -> Series:
        values = tuple(map(str, values))
        return Series(self.local.labels(*values), self.cluster, self.label_names, values, self.gauge_values)

    @property
    def tags(self) -> dict[str, str]:
        return dict(zip(self.label_names, self.values))

    def inc(self, amount: float = 1) -> None:
        amount = float(amount)  # Ray takes int or float only (not numpy scalars)
        if self.gauge_values is not None:
            return self.set(self.gauge_values.get(self.values, 0) + amount)
        if amount > 0:  # Ray refuses to add 0 to a counter; a no-op anyway
            self.local.inc(amount)
            self.cluster.inc(amount, tags=self.tags)

    def dec(self, amount: float = 1) -> None:
        self.inc(-amount)

    def set(self, value: float) -> None:
        self.gauge_values[self.values] = value
        self.local.set(value)
        self.cluster.set(value, tags=self.tags)

    def observe(self, value: float) -> None:
        self.local.observe(value)
        self.cluster.observe(value, tags=self.tags)


class ServeMetrics:
    def __init__(self, model_version: str | None = None):
        self.registry = CollectorRegistry()
        self.model_version = model_version or "none"
        # Prometheus' info pattern: join on it (`* on() group_left(model_version) sr_ray_model_info`) to label
        # any local series with the reminder version this replica serves
        self._series(prom.Gauge, "sr_ray_model_info", "The reminder version this replica serves (value 1)",
                     ("model_version",)).labels(self.model_version).set(1)
        # every request but /health and /metrics, refused ones included; route: chat|models|openapi|other
        self.requests = self._series(prom.Counter, "sr_ray_requests",
                                     "Requests by HTTP status (a stream's outcome), mode and route",
                                     ("status", "stream", "route"))
        self.audit_failures = self._series(prom.Counter, "sr_ray_audit_write_failures",
                                           "Audit records the disk refused")
        self.prompt_tokens = self._series(prom.Counter, "sr_ray_prompt_tokens", "Prompt tokens of served requests")
        self.completion_tokens = self._series(prom.Counter, "sr_ray_completion_tokens", "Tokens emitted to clients")
        self.checks = self._series(prom.Counter, "sr_ray_guard_checks", "Probe checks run")
        self.interventions = self._series(prom.Counter, "sr_ray_guard_interventions",
                                          "Answers the probe flagged (reminder kept)")
        self.dropped_tokens = self._series(prom.Counter, "sr_ray_guard_dropped_tokens",
                                           "Held-back tokens discarded at a flag")
        self.in_flight = self._series(prom.Gauge, "sr_ray_requests_in_flight", "Chat completions being served")
        self.latency = self._series(prom.Histogram, "sr_ray_request_latency_seconds",
                                    "Request latency, to the last byte", ("stream",))
        self.first_token = self._series(prom.Histogram, "sr_ray_time_to_first_token_seconds",
                                        "Time to the first released text", ("stream",))

    def _series(self, kind, name: str, doc: str, label_names: tuple[str, ...] = ()) -> Series:
        """`kind` is the prometheus_client class; its Ray twin has the same name, description and tags, plus
        `model_version` as a default tag. A counter is exported as `ray_<name>_total` by Ray, `<name>_total` here."""
        histogram = kind is prom.Histogram
        local = kind(name, doc, label_names, registry=self.registry,
                     **({"buckets": LATENCY_BUCKETS} if histogram else {}))
        cluster = getattr(ray_metrics, kind.__name__)(
            name, doc, **({"boundaries": list(LATENCY_BUCKETS)} if histogram else {}),
            tag_keys=tuple(dict.fromkeys((*label_names, "model_version"))))
        cluster.set_default_tags({"model_version": self.model_version})
        return Series(local, cluster, label_names, gauge_values={} if kind is prom.Gauge else None)

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
