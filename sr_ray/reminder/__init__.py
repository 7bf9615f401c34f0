"""The SafetyReminder method core: plain torch + transformers, no Ray (runs in a notebook, actor or replica)."""

from sr_ray.reminder.artifacts import ArtifactError
from sr_ray.reminder.bundle import ReminderBundle
from sr_ray.reminder.engine import Check, GuardedGenerator, GuardedOutput, SamplingConfig, StepEvent
from sr_ray.reminder.guard import GuardConfig
from sr_ray.reminder.probe import HarmProbe
from sr_ray.reminder.soft_prompt import DEFAULT_INIT_TEXT, SoftPrompt

__all__ = [
    "ArtifactError", "Check", "DEFAULT_INIT_TEXT", "GuardConfig", "GuardedGenerator", "GuardedOutput",
    "HarmProbe", "ReminderBundle", "SamplingConfig", "SoftPrompt", "StepEvent",
]
