"""Eval-area fixtures: a tiny PGD attack dataset and one full evaluation run on tiny-llava."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def pgd_attack_dir(processed_dir, tmp_path_factory):
    """A 2-step PGD run on tiny-llava: an `advbench_pgd` dataset of 3 test goals (and the 1-step image's)."""
    from sr_ray.eval.attacks.runner import AttackConfig, run_attack

    out = tmp_path_factory.mktemp("attack_pgd")
    cfg = AttackConfig(attack="pgd", out=str(out), processed_dir=str(processed_dir), model="tiny-llava",
                       n_train=4, n_test=3, pgd=dict(steps=2, batch_size=2, snapshots=[1]))
    return run_attack(cfg)


@pytest.fixture(scope="session")
def eval_run(ray_session, tiny_bundle, processed_dir, pgd_attack_dir, tmp_path_factory):
    """One full `evaluate` on tiny-llava: all four systems, the demo benchmarks with their prefill and PGD
    variants, the PGD dataset, awareness."""
    from sr_ray.eval.runner import EvaluateConfig, evaluate

    out = tmp_path_factory.mktemp("eval_run")
    cfg = EvaluateConfig(out=str(out), bundle=str(tiny_bundle), processed_dir=str(processed_dir), model="tiny-llava",
                         limit=2, max_new_tokens=12, reminder_max_new_tokens=8, attack_dirs=[str(pgd_attack_dir)],
                         attacks=["prefill", f"pgd={pgd_attack_dir}"],
                         awareness=dict(limit=2, max_new_tokens=12), concurrency=1)
    return out, evaluate(cfg)
