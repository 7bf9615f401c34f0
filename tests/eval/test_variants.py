"""Attack variants of the harmful benchmarks (`--attacks prefill,pgd=DIR`): which rows, what changes, bad specs."""

from __future__ import annotations

import pytest

from sr_ray.data.prefill import PREFILL_GENERIC
from sr_ray.eval.variants import AttackVariant, parse_attacks, with_attacks

ROWS = [
    dict(key="advbench|a", benchmark="advbench", id="a", label="harmful", prompt="goal", image=None, target="Sure, here is x"),
    dict(key="vlsafe|b", benchmark="vlsafe", id="b", label="harmful", prompt="q", image=b"png", target=None),
    dict(key="mmvet|c", benchmark="mmvet", id="c", label="benign", prompt="what?", image=b"png", target=None),
]


def test_every_harmful_row_gets_one_attacked_copy_and_benign_rows_none():
    out = with_attacks(ROWS, [AttackVariant("prefill"), AttackVariant("pgd", b"adv")])
    assert out[:3] == ROWS  # the plain rows are untouched
    attacked = {r["key"]: r for r in out[3:]}
    assert sorted(attacked) == ["advbench+pgd|a", "advbench+prefill|a", "vlsafe+pgd|b", "vlsafe+prefill|b"]
    assert attacked["advbench+prefill|a"]["answer_prefix"] == "Sure, here is x"  # the official target
    assert attacked["vlsafe+prefill|b"]["answer_prefix"] == PREFILL_GENERIC
    assert attacked["vlsafe+prefill|b"]["image"] == b"png"  # prefill leaves the image alone
    assert attacked["advbench+pgd|a"]["image"] == b"adv" and attacked["vlsafe+pgd|b"]["image"] == b"adv"
    assert {r["benchmark"] for r in out[3:]} == {"advbench+prefill", "advbench+pgd", "vlsafe+prefill", "vlsafe+pgd"}


@pytest.mark.parametrize("spec, match", [("prefill=x", "unknown attack"), ("gcg", "unknown attack"), ("pgd", "unknown attack")])
def test_bad_specs_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_attacks([spec])


def test_pgd_needs_an_attack_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an `sr-ray attack` output"):
        parse_attacks([f"pgd={tmp_path}"])
