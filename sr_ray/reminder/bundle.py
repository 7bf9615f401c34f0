"""The reminder bundle: everything a replica or evaluation needs besides the base model itself.

Layout: `bundle.json` + `soft_prompt/` + `probe/` (each safetensors + JSON). The bundle records the base
model id, the guard settings it was trained for and the data manifest checksum, and pins the checksums of
its two parts so a swapped file is caught at load time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sr_ray.reminder.artifacts import META, ArtifactError
from sr_ray.reminder.guard import PAPER_INTERVAL, PAPER_THRESHOLD, GuardConfig
from sr_ray.reminder.probe import HarmProbe
from sr_ray.reminder.soft_prompt import SoftPrompt

BUNDLE_JSON = "bundle.json"


@dataclass
class ReminderBundle:
    soft_prompt: SoftPrompt
    probe: HarmProbe
    base_model_id: str
    interval: int = PAPER_INTERVAL
    threshold: float = PAPER_THRESHOLD  # calibrated by SAPT when configured; wins over the probe's
    data_checksum: str = ""
    blind_threshold: float | None = None  # the image-blind check it carries (calibrated by `sr-ray calibrate-blind`)
    reminder_no_repeat_ngram: int | None = None  # GuardConfig's: how its flagged continuations are decoded

    def guard_config(self, **overrides) -> GuardConfig:
        """The guard this bundle was trained for (and the defenses it carries), each given (not None) override applied."""
        return GuardConfig(interval=self.interval, threshold=self.threshold,
                           blind_threshold=self.blind_threshold,
                           reminder_no_repeat_ngram=self.reminder_no_repeat_ngram).override(**overrides)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.soft_prompt.save(directory / "soft_prompt")
        self.probe.save(directory / "probe")
        part_sha = {p: json.loads((directory / p / META).read_text())["sha256"] for p in ("soft_prompt", "probe")}
        info = dict(base_model_id=self.base_model_id, interval=self.interval, threshold=self.threshold,
                    data_checksum=self.data_checksum, blind_threshold=self.blind_threshold,
                    reminder_no_repeat_ngram=self.reminder_no_repeat_ngram, parts=part_sha, k=self.soft_prompt.k,
                    hidden_size=self.soft_prompt.hidden_size)
        (directory / BUNDLE_JSON).write_text(json.dumps(info, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path, vlm=None) -> "ReminderBundle":
        directory = Path(directory)
        if not (directory / BUNDLE_JSON).exists():
            raise ArtifactError(f"{directory}: no {BUNDLE_JSON}; not a reminder bundle")
        info = json.loads((directory / BUNDLE_JSON).read_text())
        for part, sha in info["parts"].items():
            if json.loads((directory / part / META).read_text()).get("sha256") != sha:
                raise ArtifactError(f"{directory}/{part}: does not match the bundle's pinned checksum")
        soft_prompt = SoftPrompt.load(directory / "soft_prompt", vlm)
        probe = HarmProbe.load(directory / "probe", vlm)
        return cls(soft_prompt, probe, info["base_model_id"], info["interval"], info["threshold"],
                   info.get("data_checksum", ""), info.get("blind_threshold"), info.get("reminder_no_repeat_ngram"))
