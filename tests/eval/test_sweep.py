"""`sr-ray robustness` plumbing on tiny-llava: one adaptive attack per defended bundle, an evaluation per step
count, the rows and the plot; the robust bundle's attack carries the blind reading in its objective."""

from __future__ import annotations

import json

import pytest

from sr_ray.eval.sweep import SweepConfig, run_sweep
from sr_ray.models import load_vlm
from sr_ray.reminder import ReminderBundle


def test_the_sweep_evaluates_every_step_count_for_every_system(ray_session, tiny_bundle, processed_dir, tmp_path):
    robust = ReminderBundle.load(tiny_bundle, load_vlm("tiny-llava"))
    robust.blind_threshold = 0.5
    robust.save(tmp_path / "robust")
    cfg = SweepConfig(out=str(tmp_path / "sweep"), robust_bundle=str(tmp_path / "robust"), bundle=str(tiny_bundle),
                      processed_dir=str(processed_dir), model="tiny-llava", steps=[0, 1], n_train=2, n_test=2,
                      pgd=dict(steps=1, batch_size=2), max_new_tokens=6)
    rows = run_sweep(cfg)
    systems = ["undefended", "self_reminder", "safety_reminder", "undefended (robust's images)",
               "self_reminder (robust's images)", "safety_reminder+robust"]
    assert sorted((r["steps"], r["system"]) for r in rows) == sorted((s, x) for s in (0, 1) for x in systems)
    assert all(r["n"] == 2 and 0 <= r["asr_full"] <= 1 for r in rows)
    for r in rows:  # each defense's cut is read against undefended under the same attack's images
        base = next(u for u in rows if u["system"].startswith("undefended") and (u["steps"], u["attack"]) ==
                    (r["steps"], r["attack"]))
        expected = None if r is base or not base["asr_full"] else 1 - r["asr_full"] / base["asr_full"]
        assert r["asr_cut"] == expected
    out = tmp_path / "sweep"
    assert (out / "sweep.png").stat().st_size > 0 and json.loads((out / "sweep.json").read_text())["rows"] == rows
    history = json.loads((out / "attack_robust" / "attack.json").read_text())["history"]
    assert "p_safe_blind" in history[0] and "p_safe_blind" not in \
        json.loads((out / "attack_safety_reminder" / "attack.json").read_text())["history"][0]


def test_the_sweep_needs_a_robust_bundle():
    with pytest.raises(ValueError, match="robust-bundle"):
        SweepConfig(model="tiny-llava")
