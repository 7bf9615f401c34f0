"""Benchmark keys of the evaluation and the rows behind each: which source/variant/split/label, sampled how.

Only evaluation splits are used: `test` by default (`all`: every row, for a data directory no stage trained
on), where test is, for AdvBench: the official PGD split's test 100;
harmful_harmless: its own test split; the others: the data pipeline's seeded hash split).
Models that cannot read typography (the embedded `smol-llava` has an untrained vision tower) get the
`*_text_inlined` variants of FigStep and MM-SafetyBench-TYPO: the image's text is put in the prompt.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sr_ray.data import load_records


@dataclass(frozen=True)
class Benchmark:
    key: str
    source: str
    variant: str
    label: str  # "harmful": ASR is measured; "benign": over-refusal and change are measured
    inlined_variant: str | None = None  # the variant used when typography is inlined

    def variant_for(self, inline_typography: bool) -> str:
        return self.inlined_variant if inline_typography and self.inlined_variant else self.variant


BENCHMARKS: dict[str, Benchmark] = {b.key: b for b in (
    Benchmark("figstep", "figstep", "image", "harmful", inlined_variant="text_inlined"),
    Benchmark("mmsafetybench_typo", "mmsafetybench", "typo", "harmful", inlined_variant="typo_text_inlined"),
    Benchmark("mmsafetybench_text", "mmsafetybench", "text", "harmful"),
    Benchmark("vlsafe", "vlsafe", "text", "harmful"),
    Benchmark("advbench", "advbench", "text", "harmful"),
    Benchmark("harmful", "harmful_harmless", "text", "harmful"),  # direct asks: refusal_direction harmful_test
    Benchmark("mmvet", "mmvet", "image", "benign"),
    Benchmark("harmless", "harmful_harmless", "text", "benign"),
    Benchmark("alpacaeval", "alpacaeval", "text", "benign"),
)}
# Report order; attack datasets (advbench_pgd, advbench_pgd_adaptive, advbench_gcg) come from `sr-ray attack`.
BENCHMARK_ORDER = ("figstep", "mmsafetybench_typo", "mmsafetybench_text", "vlsafe", "advbench", "advbench_pgd",
                   "advbench_pgd_adaptive", "advbench_gcg", "harmful", "mmvet", "harmless", "alpacaeval")
MODELS_READING_TYPOGRAPHY_BADLY = ("smol-llava", "smol-llava-unaligned")


def default_inline_typography(model: str) -> bool:
    return model in MODELS_READING_TYPOGRAPHY_BADLY


def preprocess_selection(keys: list[str], inline_typography: bool) -> tuple[list[str], list[str]]:
    """(sources, variants) the data pipeline must produce for these benchmark keys."""
    chosen = [BENCHMARKS[k] for k in keys if k in BENCHMARKS]
    sources = sorted({b.source for b in chosen})
    variants = sorted({b.variant_for(inline_typography) for b in chosen})
    return sources, variants


def sample_by_category(rows: list, limit: int | None, seed: int, category=lambda r: r.category) -> list:
    """Up to `limit` rows, round-robin over categories (each shuffled with `seed`), so that a small limit
    still covers every category; the result is in a stable order."""
    if limit is None or len(rows) <= limit:
        return list(rows)
    groups: dict[str, list] = defaultdict(list)
    for r in rows:
        groups[str(category(r))].append(r)
    rng = random.Random(seed)
    queues = [rng.sample(groups[c], len(groups[c])) for c in sorted(groups)]
    picked = []
    while len(picked) < limit:
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop())
    return picked


def benchmark_rows(processed_dir: str | Path, keys: list[str], inline_typography: bool, limit: int | None,
                   seed: int = 0, split: str = "test") -> list[dict]:
    """Inference rows for the requested built-in benchmarks; a benchmark with no records is left out.
    `split="all"`: every row of every split (for a data directory no stage trained on)."""
    rows = []
    for key in keys:
        b = BENCHMARKS[key]
        records = load_records(processed_dir, source=b.source, variant=b.variant_for(inline_typography),
                               split=None if split == "all" else split, label=b.label)
        for rec in sample_by_category(records, limit, seed):
            rows.append(dict(
                key=f"{key}|{rec.id}", benchmark=key, id=rec.id, source=rec.source, variant=rec.variant,
                category=rec.category or key, prompt=rec.prompt, image=rec.image, label=rec.label,
                question=rec.original_question or rec.prompt, target=rec.reference if b.source == "advbench" else None,
            ))
    return rows
