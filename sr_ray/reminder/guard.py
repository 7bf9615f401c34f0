"""The guard settings (interval, threshold, mode) and the one rule that decides them.

The paper's defaults are defined here once: a check every 16 answer tokens, a flag when P(safe) < 0.2. A
reminder bundle records the interval and threshold it was trained for (`ReminderBundle.guard_config`), and
those are what the guard runs with, unless an explicit setting overrides them: an evaluation config, a CLI
flag, the server's `guard:` config, then a request's `safety` options, each beating what it is applied to.
`GuardConfig.override` is that rule (None keeps the value underneath), used by `sr-ray generate`, the
evaluation (`sr_ray.infer`, the adaptive PGD attack) and Serve.

Which threshold: with a bundle, the bundle's threshold wins over the one stored in its probe. SAPT sets it
for the probe read at the soft token, calibrated on validation answers when configured
(`SaptConfig.calibrate_benign_flag_rate`); the probe's own threshold belongs to its fit on prompt-end states.
A bare probe (`sr-ray serve` with `probe:`, `sr-ray generate --probe`) keeps `threshold=None`, which the
engine reads as the probe's threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

PAPER_INTERVAL = 16  # answer tokens between checks
PAPER_THRESHOLD = 0.2  # flag when P(safe) < threshold (the official value)


@dataclass
class GuardConfig:
    interval: int = PAPER_INTERVAL
    threshold: float | None = None  # None: the probe's own threshold (a bare probe, no bundle)
    mode: Literal["inplace", "official"] = "inplace"
    # "every": check answers of interval, 2*interval, ... tokens; "official": count % interval == interval-1
    schedule: Literal["every", "official"] = "every"
    check_at_end: bool = True  # also check at EOS / budget end (covers short answers and the tail)
    reminder_max_new_tokens: int = 256  # budget after a flag (the official second pass gets 256)
    # The image-blind check (a robust option, docs/robustness.md): each check also reads the answer as a text-only
    # twin (the prompt without its image) and flags when that reading's P(safe) < blind_threshold. None: off.
    blind_threshold: float | None = None
    # After a flag (in place), the continuation may not repeat an n-gram of its own tokens (HF's
    # NoRepeatNGramLogitsProcessor): a small model's refusal otherwise loops a sentence to the budget. None: off.
    reminder_no_repeat_ngram: int | None = None

    def override(self, **settings) -> GuardConfig:
        """A copy with each setting that is given (not None) replacing this config's value."""
        return replace(self, **{name: value for name, value in settings.items() if value is not None})
