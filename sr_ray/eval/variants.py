"""Attacks as evaluation variants: `--attacks prefill,pgd=DIR` turns every harmful benchmark row into one more
row per attack, under the benchmark key `<benchmark>+<attack>`, judged and summarised like the plain rows.

- `prefill`: the answer is forced to start with the harmful target text (the prefilling attack). AdvBench rows
  use their official target ("Sure, here is ..."); the others a generic affirmative start. Only what the model
  writes after the prefill is judged.
- `pgd=DIR`: the universal adversarial image of an `sr-ray attack pgd` (or pgd-adaptive) output replaces the
  row's image (text-only rows gain it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sr_ray.data.prefill import prefill_text
from sr_ray.eval.attacks.dataset import IMAGES, read_attack_info


@dataclass(frozen=True)
class AttackVariant:
    name: str
    image: bytes | None = None  # pgd: the adversarial image (PNG bytes)

    def apply(self, row: dict) -> dict:
        out = dict(row, benchmark=f"{row['benchmark']}+{self.name}", key=f"{row['benchmark']}+{self.name}|{row['id']}",
                   attack=self.name)
        if self.name == "prefill":
            out["answer_prefix"] = prefill_text(row.get("target"))
        else:
            out["image"] = self.image
        return out


def parse_attacks(specs: list[str]) -> list[AttackVariant]:
    """`["prefill", "pgd=DIR"]` -> variants; a pgd directory must be an `sr-ray attack pgd*` output."""
    variants = []
    for spec in specs:
        name, _, value = spec.partition("=")
        if name == "prefill" and not value:
            variants.append(AttackVariant("prefill"))
        elif name == "pgd" and value:
            info = read_attack_info(value)
            image = Path(value) / IMAGES / "adv.png"
            if not info["attack"].startswith("pgd") or not image.is_file():
                raise ValueError(f"--attacks pgd={value}: not a PGD attack output (attack {info['attack']!r}, needs {image})")
            variants.append(AttackVariant(info["attack"].replace("-", "_"), image.read_bytes()))
        else:
            raise ValueError(f"unknown attack {spec!r}; use prefill or pgd=DIR (an `sr-ray attack pgd` output)")
    return variants


def with_attacks(rows: list[dict], variants: list[AttackVariant]) -> list[dict]:
    """`rows` plus, for every harmful row, one attacked copy per variant."""
    return rows + [v.apply(r) for v in variants for r in rows if r["label"] == "harmful"]
