"""Guard settings: the bundle's values, each explicit override beating them, and the bundle's (calibrated)
threshold beating the one stored in its probe, read through the engine on a tiny model."""

from __future__ import annotations

import pytest
import torch

from sr_ray.infer import InferenceConfig, system_request
from sr_ray.models import Prompt
from sr_ray.reminder import GuardConfig, GuardedGenerator, HarmProbe, ReminderBundle, SamplingConfig, SoftPrompt
from sr_ray.reminder.guard import PAPER_INTERVAL, PAPER_THRESHOLD

P_SAFE = 0.3  # the probe below reads this on every answer


def constant_probe(vlm, threshold: float) -> HarmProbe:
    bias = float(torch.logit(torch.tensor(P_SAFE)))
    return HarmProbe(torch.zeros(vlm.hidden_size), bias, threshold, base_model_id=vlm.model_id)


def test_override_replaces_only_what_is_given():
    base = GuardConfig(interval=8, threshold=0.4)
    assert base.override(interval=None, threshold=None, mode=None) == base
    assert base.override(interval=12, mode="official") == GuardConfig(interval=12, threshold=0.4, mode="official")
    assert base == GuardConfig(interval=8, threshold=0.4)  # a copy: the bundle's guard is never changed
    assert GuardConfig().interval == PAPER_INTERVAL and GuardConfig().threshold is None


def test_bundle_values_hold_unless_overridden(tiny_vlm):
    probe = constant_probe(tiny_vlm, threshold=PAPER_THRESHOLD)
    bundle = ReminderBundle(SoftPrompt.from_text(tiny_vlm), probe, tiny_vlm.model_id, interval=8, threshold=0.35)
    assert (bundle.guard_config().interval, bundle.guard_config().threshold) == (8, 0.35)  # not the probe's 0.2
    tuned = bundle.guard_config(interval=None, threshold=0.5, mode="official")
    assert (tuned.interval, tuned.threshold, tuned.mode) == (8, 0.5, "official")
    # the evaluation's systems: its config's interval / threshold over the bundle's, the official schedule
    _, guard = system_request("safety_reminder_official", Prompt("hi"), bundle, InferenceConfig(interval=4))
    assert (guard.interval, guard.threshold, guard.mode, guard.schedule, guard.check_at_end) == (
        4, 0.35, "official", "official", False)
    _, guard = system_request("safety_reminder", Prompt("hi"), bundle, InferenceConfig(threshold=0.1))
    assert (guard.interval, guard.threshold, guard.mode) == (8, 0.1, "inplace")


@pytest.mark.parametrize("probe_threshold, bundle_threshold, flagged", [(0.2, 0.4, True), (0.4, 0.2, False)])
def test_the_bundle_threshold_beats_the_probes_in_the_engine(tiny_vlm, probe_threshold, bundle_threshold, flagged):
    """P(safe) is 0.3 everywhere: only the threshold that wins decides whether the answer is flagged."""
    probe = constant_probe(tiny_vlm, probe_threshold)
    bundle = ReminderBundle(SoftPrompt.from_text(tiny_vlm), probe, tiny_vlm.model_id, interval=4,
                            threshold=bundle_threshold)
    sampling = SamplingConfig(max_new_tokens=6, ignore_eos=True)
    with_bundle = GuardedGenerator(tiny_vlm, bundle.soft_prompt, probe, bundle.guard_config()).generate(
        [Prompt("hello")], sampling)[0]
    assert with_bundle.flagged == flagged and with_bundle.checks[0].p_safe == pytest.approx(P_SAFE, abs=1e-4)
    bare = GuardedGenerator(tiny_vlm, bundle.soft_prompt, probe, GuardConfig(interval=4)).generate(
        [Prompt("hello")], sampling)[0]
    assert bare.flagged == (P_SAFE < probe_threshold)  # a bare probe: its own threshold
