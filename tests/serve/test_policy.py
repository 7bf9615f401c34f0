"""API keys, safety-option bounds, config loading and reminder loading (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sr_ray.config import load
from sr_ray.reminder import ArtifactError
from sr_ray.serve.config import ApiKey, GuardPolicy, ServeConfig
from sr_ray.serve.model import load_reminder
from sr_ray.serve.policy import ANONYMOUS, PolicyError, authenticate, resolve_safety, sha256_hex
from sr_ray.serve.protocol import SafetyOptions
from tests.bundles import constant_probe_bundle

KEYS = [ApiKey("alice", sha256_hex("alice-key")), ApiKey("ops", sha256_hex("ops-key"), admin=True)]
REPO = Path(__file__).resolve().parents[2]


def status_of(fn, *args) -> int:
    with pytest.raises(PolicyError) as err:
        fn(*args)
    return err.value.status


def test_authentication():
    assert authenticate(None, []) == ANONYMOUS  # no keys configured: open (local use)
    assert authenticate("Bearer alice-key", KEYS).key_id == "alice"
    assert authenticate("bearer ops-key", KEYS).admin
    for header in (None, "", "Bearer ", "Basic alice-key", "alice-key", "Bearer wrong", "Bearer alice-key2"):
        assert status_of(authenticate, header, KEYS) == 401


def test_safety_options_within_bounds_and_weakening_needs_admin():
    policy = GuardPolicy(interval_bounds=(8, 32), threshold_bounds=(0.1, 0.5))
    user, admin = authenticate("Bearer alice-key", KEYS), authenticate("Bearer ops-key", KEYS)
    default = resolve_safety(None, user, policy, True)
    assert (default.enabled, default.hold_back, default.interval, default.threshold) == (True, True, None, None)
    tuned = resolve_safety(SafetyOptions(interval=8, threshold=0.5), user, policy, True)
    assert (tuned.interval, tuned.threshold) == (8, 0.5)
    for options in (SafetyOptions(interval=4), SafetyOptions(interval=64), SafetyOptions(threshold=0.05),
                    SafetyOptions(threshold=0.9)):
        assert status_of(resolve_safety, options, user, policy, True) == 400
    for options in (SafetyOptions(enabled=False), SafetyOptions(stream_mode="stream_first")):
        assert status_of(resolve_safety, options, user, policy, True) == 403
        assert status_of(resolve_safety, options, ANONYMOUS, policy, True) == 403
        resolve_safety(options, admin, policy, True)
    off = resolve_safety(SafetyOptions(enabled=False), admin, policy, True)
    assert not off.enabled
    first = resolve_safety(SafetyOptions(stream_mode="stream_first"), admin, policy, True)
    assert first.enabled and not first.hold_back


def test_guard_without_reminder():
    off_server = GuardPolicy(enabled=False)
    assert not resolve_safety(None, ANONYMOUS, off_server, False).enabled
    assert status_of(resolve_safety, SafetyOptions(enabled=True), ANONYMOUS, off_server, False) == 400
    with pytest.raises(ValueError, match="guard.enabled needs a reminder"):
        ServeConfig(model="tiny-llava").validate()
    ServeConfig(model="tiny-llava", guard=off_server).validate()


def test_config_file_overrides_and_errors(tmp_path):
    assert load(ServeConfig, REPO / "configs" / "serve.yaml") == ServeConfig()
    cfg = load(ServeConfig, REPO / "configs" / "serve.yaml",
               sets=["model=tiny-llava", "limits.max_tokens=64", "guard.threshold_bounds=[0.2, 0.3]",
                     "api_keys=[{id: a, sha256: ff, admin: true}]"])
    assert cfg.model == "tiny-llava" and cfg.limits.max_tokens == 64 and cfg.guard.threshold_bounds == (0.2, 0.3)
    assert cfg.api_keys == [ApiKey("a", "ff", True)]
    with pytest.raises(ValueError, match="unknown keys \\['limits.max_tokenz'\\]"):
        load(ServeConfig, sets=["limits.max_tokenz=3"])
    with pytest.raises(ValueError, match="expected key.path=value"):
        load(ServeConfig, sets=["limits"])


def test_reminder_from_dir_fresh_prompt_and_tampered_bundle(tiny_llava, tmp_path):
    bundle = constant_probe_bundle(tiny_llava, tmp_path / "bundle", bias=1.5, interval=8)
    soft_prompt, probe, guard = load_reminder(ServeConfig(model="tiny-llava", bundle=str(bundle)), tiny_llava)
    assert probe.bias == 1.5 and guard.interval == 8 and soft_prompt.k == 4
    soft_prompt, probe, guard = load_reminder(ServeConfig(model="tiny-llava", probe=str(bundle / "probe")), tiny_llava)
    assert probe.bias == 1.5 and guard.interval == 16  # fresh soft prompt, the paper's interval
    meta = json.loads((bundle / "probe" / "meta.json").read_text())
    meta["sha256"] = "0" * 64
    (bundle / "probe" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="pinned checksum"):
        load_reminder(ServeConfig(model="tiny-llava", bundle=str(bundle)), tiny_llava)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_reminder(ServeConfig(model="tiny-llava", bundle=str(tmp_path / "missing")), tiny_llava)


def test_reminder_from_mlflow_model_uri(tiny_llava, tmp_path, monkeypatch):
    from sr_ray.tracking import default_tracking_uri, start_run
    from sr_ray.train.pyfunc import log_bundle

    monkeypatch.setenv("SR_RAY_CACHE", str(tmp_path / "cache"))
    uri = default_tracking_uri(tmp_path / "mlflow")
    bundle = constant_probe_bundle(tiny_llava, tmp_path / "bundle", bias=2.5)
    version = log_bundle(bundle, "sr_ray_reminder", model="tiny-llava", tracking_uri=uri,
                         run_id=start_run(uri, "serve-test", "bundle", stage="train"))
    cfg = ServeConfig(model="tiny-llava", bundle=f"models:/sr_ray_reminder/{version}", tracking_uri=uri)
    _, probe, _ = load_reminder(cfg, tiny_llava)
    assert probe.bias == 2.5
