"""Reminder bundles that ship with the package (`sr_ray/reminder/bundles/<model id>/`), the default of every
`--bundle` for their model: `sr-ray serve`, `generate` and `evaluate` guard the embedded default out of the box.

Each shipped bundle carries `training.json` beside its `bundle.json`: the exact command, commit, data splits and
validation figures that made it (see docs/results.md).
"""

from __future__ import annotations

from pathlib import Path

from sr_ray.reminder.bundle import BUNDLE_JSON

BUNDLES_DIR = Path(__file__).parent / "bundles"


def shipped_bundle(model: str) -> Path | None:
    """The shipped bundle directory for `model` (a model id such as `smol-llava`), or None."""
    path = BUNDLES_DIR / model
    return path if (path / BUNDLE_JSON).is_file() else None


def default_bundle(model: str) -> str | None:
    """`--bundle`'s default for `model`: its shipped bundle, if one ships."""
    path = shipped_bundle(model)
    return str(path) if path else None
