"""Reminder bundles for tests, built in-process on a tiny model (no training)."""

from __future__ import annotations

import torch


def constant_probe_bundle(vlm, directory, bias: float, interval: int = 4):
    """A bundle whose probe ignores the hidden state: P(safe) = sigmoid(bias) at every check (bias -9 flags
    every answer, +9 never does). Returns the saved directory."""
    from sr_ray.reminder import HarmProbe, ReminderBundle, SoftPrompt

    probe = HarmProbe(torch.zeros(vlm.hidden_size), bias=bias, base_model_id=vlm.model_id)
    return ReminderBundle(SoftPrompt.from_text(vlm), probe, vlm.model_id, interval=interval).save(directory)
