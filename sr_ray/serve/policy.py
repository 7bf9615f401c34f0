"""Who may call and what they may ask the guard to do (the audit trail is in `sr_ray.serve.audit`).

- API keys: `Authorization: Bearer <key>`; the server knows only each key's sha256, compared in constant
  time. No keys configured means no authentication (local use); then nobody is an admin.
- Safety options: `interval` / `threshold` only within the server's bounds; weakening the guard (turning
  it off, or `stream_first`) needs an admin key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from sr_ray.serve.config import ApiKey, GuardPolicy
from sr_ray.serve.protocol import SafetyOptions


class PolicyError(Exception):
    """A request refused by policy; rendered as an OpenAI-style error with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


@dataclass(frozen=True)
class Principal:
    key_id: str
    admin: bool


ANONYMOUS = Principal("anonymous", admin=False)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def authenticate(authorization: str | None, keys: list[ApiKey]) -> Principal:
    if not keys:
        return ANONYMOUS
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise PolicyError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
    digest = sha256_hex(token.strip())
    match = None
    for key in keys:  # compare against every key: timing does not reveal which one matched
        if hmac.compare_digest(digest, key.sha256.lower()):
            match = key
    if match is None:
        raise PolicyError(401, "invalid API key", "authentication_error")
    return Principal(match.id, match.admin)


@dataclass(frozen=True)
class GuardChoice:
    enabled: bool
    hold_back: bool
    interval: int | None  # the request's; None: the server's (its `guard:` config, else the bundle's)
    threshold: float | None


def resolve_safety(options: SafetyOptions | None, principal: Principal, policy: GuardPolicy,
                   reminder_loaded: bool) -> GuardChoice:
    """The guard settings for one request, or `PolicyError` (400 out of bounds, 403 not allowed)."""
    opts = options or SafetyOptions()
    enabled = policy.enabled if opts.enabled is None else opts.enabled
    hold_back = (opts.stream_mode or policy.stream_mode) == "holdback"
    if enabled and not reminder_loaded:
        raise PolicyError(400, "this server has no reminder loaded, so the guard cannot run", param="safety.enabled")
    weakened = (policy.enabled and not enabled) or (policy.stream_mode == "holdback" and not hold_back)
    if weakened and not principal.admin:
        raise PolicyError(403, "turning the guard off or streaming unchecked tokens needs an admin key",
                          "permission_error", "safety")
    for name, value, (lo, hi) in (("interval", opts.interval, policy.interval_bounds),
                                  ("threshold", opts.threshold, policy.threshold_bounds)):
        if value is not None and not lo <= value <= hi:
            raise PolicyError(400, f"safety.{name}={value} is outside the server's bounds [{lo}, {hi}]",
                              param=f"safety.{name}")
    return GuardChoice(enabled, hold_back, opts.interval, opts.threshold)
