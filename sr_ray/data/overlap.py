"""Keeping training data disjoint from evaluation data across sources.

Splits are drawn per source, but the sources share items: refusal_direction's harmful train split holds
AdvBench goals, some of which are in AdvBench's test split, and JailBreakV and MM-SafetyBench reuse public
questions. A row is evaluation data when its item text (`item_text`: the plain question behind it, else its prompt)
equals the item text of any test-split row of any source, and no training stage may read it. Prompts alone
would not do: FigStep and MM-SafetyBench image variants share one generic instruction across items.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path


def normalise(text: str) -> str:
    """Lower-case words and digits only: the same question with other punctuation or case is the same item."""
    return re.sub(r"[^a-z0-9]+", " ", str(text).lower()).strip()


def item_text(prompt: str | None, original_question: str | None) -> str:
    """What identifies a row's item across sources, normalised."""
    return normalise(original_question or prompt or "")


def evaluation_texts(out_dir: str | Path) -> frozenset[str]:
    """The item texts of every test-split record of a preprocessed output dir, all sources."""
    from sr_ray.data import SHARDS

    files = sorted(str(p) for p in (Path(out_dir) / SHARDS).glob("*.parquet"))
    return _test_item_texts(tuple((f, os.stat(f).st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=4)
def _test_item_texts(shards: tuple[tuple[str, int], ...]) -> frozenset[str]:
    """Read once per set of shard files (a rollout selects per selection and split); the mtimes in the key
    make a rewritten output dir read again."""
    import pyarrow.dataset as pads

    if not shards:
        return frozenset()
    table = pads.dataset([f for f, _ in shards], format="parquet").to_table(
        columns=["prompt", "original_question"], filter=pads.field("split") == "test")
    return frozenset(item_text(p, q) for p, q in
                     zip(table.column("prompt").to_pylist(), table.column("original_question").to_pylist()))
