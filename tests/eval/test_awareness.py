"""Which answers the delayed-awareness analysis reads."""

from __future__ import annotations

from sr_ray.eval.awareness import awareness_rows
from sr_ray.eval.variants import AttackVariant, with_attacks


def _rows():
    rows = [dict(benchmark="advbench", id=f"a{i}", key=f"advbench|a{i}", label="harmful", category="x", target="Sure")
            for i in range(4)]
    rows += [dict(benchmark="harmless", id=f"h{i}", key=f"harmless|h{i}", label="benign", category="y") for i in range(4)]
    return rows


def test_harmful_answers_come_from_the_attacked_variants_when_there_are_any():
    picked = awareness_rows(with_attacks(_rows(), [AttackVariant("prefill")]), limit=3)
    harmful = [r for r in picked if r["label"] == "harmful"]
    benign = [r for r in picked if r["label"] == "benign"]
    assert len(harmful) == 3 and all(r["benchmark"] == "advbench+prefill" and r["answer_prefix"] for r in harmful)
    assert len(benign) == 3 and all(r["benchmark"] == "harmless" for r in benign)


def test_without_attacks_the_plain_harmful_answers_are_read():
    picked = awareness_rows(_rows(), limit=2)
    assert sorted(r["benchmark"] for r in picked) == ["advbench", "advbench", "harmless", "harmless"]
