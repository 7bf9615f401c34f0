"""Typed settings of the guarded endpoint (`configs/serve.yaml`): model, reminder source, scaling, policy."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from sr_ray.config_types import require


@dataclass
class ScaleConfig:
    """One Serve deployment's replicas (Serve `autoscaling_config` + per-replica limits)."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8
    max_ongoing_requests: int = 16
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # per replica; 1 on GPU nodes gives each model replica its own GPU (presets/*serve*)
    # Requests waiting at each caller for a replica slot; beyond it they get 503 + Retry-After (-1: no bound).
    max_queued_requests: int = 64

    def __post_init__(self):
        require(self.min_replicas >= 0, f"min_replicas must be >= 0, got {self.min_replicas}")
        require(self.max_replicas >= max(1, self.min_replicas),
                f"max_replicas must be >= 1 and >= min_replicas ({self.min_replicas}), got {self.max_replicas}")
        require(self.max_ongoing_requests >= 1, f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        require(self.target_ongoing_requests > 0, f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        require(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus and num_gpus must be >= 0")

    def autoscaling_config(self) -> dict:
        return dict(min_replicas=self.min_replicas, max_replicas=self.max_replicas,
                    target_ongoing_requests=self.target_ongoing_requests,
                    upscale_delay_s=self.upscale_delay_s, downscale_delay_s=self.downscale_delay_s)


@dataclass
class BatchingConfig:
    # "continuous": requests join/leave the running batch between decode steps (sr_ray.reminder.scheduler);
    # "static": Serve's @serve.batch, a batch fixed when it starts (kept for `sr-ray bench serve --workload mixed`)
    scheduler: Literal["continuous", "static"] = "continuous"
    max_batch_size: int = 8  # rows decoded at once by a model replica
    kv_budget_tokens: int = 32768  # continuous: cache rows x columns; requests wait when it is full
    prefill_chunk_tokens: int = 128  # continuous: prompt tokens prefilled between two decode steps
    separate_check: bool = False  # the check as its own forward: bf16 never-flagged rows = plain (docs/core.md)
    # a check leaving at least this many rows idle runs apart over the checking rows (None: always fused; on a
    # GPU, where a wider step is nearly free, None is the better choice)
    split_check_min_idle: int | None = 4
    check_steps: Literal["shared", "own"] = "shared"  # continuous: rows check on the batch's shared steps
    stuck_after_s: float = 30.0  # check_health fails when one decode iteration runs longer
    batch_wait_timeout_s: float = 0.02  # static only
    max_concurrent_batches: int = 1  # static only: >1 lets a new batch start while one is still decoding


@dataclass
class GuardPolicy:
    enabled: bool = True  # the guard runs unless an admin key turns it off per request
    stream_mode: Literal["holdback", "stream_first"] = "holdback"
    mode: Literal["inplace", "official"] = "inplace"
    interval: int | None = None  # None: the bundle's (16 in the paper)
    threshold: float | None = None  # None: the bundle's (0.2 in the paper)
    # Per-request `safety.interval` / `safety.threshold` are accepted only inside these bounds.
    interval_bounds: tuple[int, int] = (8, 32)
    threshold_bounds: tuple[float, float] = (0.1, 0.5)


@dataclass
class Limits:
    max_body_bytes: int = 8 * 2**20
    max_image_bytes: int = 5 * 2**20
    max_image_pixels: int = 16 * 2**20  # checked from the header, before decoding (bomb guard)
    max_image_decoded_bytes: int = 64 * 2**20  # width x height x bytes per pixel of the decoded mode
    # Per ingress replica: bodies being handled, and decoded bytes of images being normalised (the
    # normaliser's working copies add ~5x the decoded bytes). Above the budget a request waits up to
    # `busy_wait_s`, then gets a 503 with Retry-After.
    max_inflight_body_bytes: int = 64 * 2**20
    max_inflight_decoded_bytes: int = 64 * 2**20
    busy_wait_s: float = 5.0
    max_image_side: int = 768  # larger images are shrunk (as the data pipeline does)
    max_images: int = 1  # the model takes one image per turn
    max_messages: int = 16
    max_text_chars: int = 32_000
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # the largest `max_tokens` a request may ask for
    default_max_tokens: int = 256
    max_stop: int = 4
    max_stop_chars: int = 64
    request_timeout_s: float = 120.0


@dataclass
class ImageFetchConfig:
    allow_remote: bool = False  # http(s) image URLs; `data:` URLs are always accepted
    allowed_hosts: list[str] = field(default_factory=list)
    timeout_s: float = 5.0


@dataclass
class ApiKey:
    id: str  # what the audit log records
    sha256: str  # hex sha256 of the key; the key itself is never stored (`printf %s KEY | sha256sum`)
    admin: bool = False


@dataclass
class ServeConfig:
    model: str = "smol-llava"  # tiny-llava | smol-llava | hub id | local dir
    served_model_name: str | None = None  # the `model` clients send; default: `model`
    bundle: str | None = None  # reminder bundle dir or MLflow `models:/<name>/<version>`
    probe: str | None = None  # without a bundle: a probe dir, paired with a freshly initialised soft prompt
    tracking_uri: str | None = None  # MLflow, for `models:/` bundles
    app_name: str = "sr_ray"
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    model_deployment: ScaleConfig = field(default_factory=ScaleConfig)
    ingress_deployment: ScaleConfig = field(default_factory=lambda: ScaleConfig(
        min_replicas=1, max_replicas=2, target_ongoing_requests=32, max_ongoing_requests=256, num_cpus=0.1,
        max_queued_requests=-1))
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    guard: GuardPolicy = field(default_factory=GuardPolicy)
    limits: Limits = field(default_factory=Limits)
    images: ImageFetchConfig = field(default_factory=ImageFetchConfig)
    api_keys: list[ApiKey] = field(default_factory=list)  # empty: no authentication (local use)
    audit_log: str | None = "serve_audit.jsonl"  # `{node}` -> host name: one file per node on shared storage
    audit_max_bytes: int = 64 * 2**20  # rotate above this; at most (audit_backups + 1) files are kept
    audit_backups: int = 4
    audit_max_field_chars: int = 256  # longer strings are cut (records stay <= 4 kB)
    allow_public_without_keys: bool = False  # a non-loopback `host` needs api_keys unless this is set
    default_temperature: float = 0.0  # used when a request sends none (0: greedy, reproducible)
    torch_threads: int | None = None  # per model replica; None: torch's default

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def reminder_version(self) -> str | None:
        """What responses, the audit log and metrics name as the reminder: `name/version` of a pinned
        `models:/` bundle, else the bundle or probe directory."""
        source = self.bundle or self.probe
        return source.removeprefix("models:/") if source else None

    def validate(self) -> "ServeConfig":
        require(1 <= self.port <= 65535, f"port must be 1-65535, got {self.port}")
        if self.guard.enabled and not (self.bundle or self.probe):
            from sr_ray.reminder.shipped import default_bundle

            self.bundle = default_bundle(self.model)  # the shipped bundle guards the embedded default
        if self.guard.enabled and not (self.bundle or self.probe):
            raise ValueError("guard.enabled needs a reminder: set `bundle` (dir or models:/name/version) or "
                             "`probe` (dir); or run with guard.enabled=false")
        idle = self.batching.split_check_min_idle
        require(idle is None or idle >= 0, f"batching.split_check_min_idle must be >= 0 or null, got {idle}")
        lo, hi = self.guard.interval_bounds
        if not 1 <= lo <= hi:
            raise ValueError(f"guard.interval_bounds must be 1 <= lo <= hi, got {self.guard.interval_bounds}")
        lo, hi = self.guard.threshold_bounds
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guard.threshold_bounds must be within [0, 1], got {self.guard.threshold_bounds}")
        limits = self.limits
        if limits.default_max_tokens > limits.max_tokens:
            raise ValueError("limits.default_max_tokens exceeds limits.max_tokens")
        for small, big in (("max_body_bytes", "max_inflight_body_bytes"),
                           ("max_image_decoded_bytes", "max_inflight_decoded_bytes")):
            if getattr(limits, small) > getattr(limits, big):  # such a request could never be admitted
                raise ValueError(f"limits.{small} exceeds limits.{big}")
        if self.audit_max_bytes < 4096 or self.audit_backups < 0:
            raise ValueError("audit_max_bytes must be >= 4096 (one record) and audit_backups >= 0")
        if not self.api_keys and not is_loopback(self.host) and not self.allow_public_without_keys:
            raise ValueError(f"host {self.host!r} is reachable from other machines but no api_keys are configured: "
                             "anyone could use the model. Add api_keys, bind 127.0.0.1, or set "
                             "allow_public_without_keys: true if a gateway in front authenticates")
        return self


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False
