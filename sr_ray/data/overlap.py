"""Keeping training data disjoint from evaluation data across sources.

Splits are drawn per source, but the sources share items: refusal_direction's harmful train split holds
AdvBench goals, some of which are in AdvBench's test split, and JailBreakV and MM-SafetyBench reuse public
questions. A row is evaluation data when its item text (`item_text`: the plain question behind it, else its prompt)
equals the item text of any test-split row of any source, or either holds the other as a run of whole words of
at least `MIN_WORDS` words, and no training stage may read it. Prompts alone would not do: FigStep and
MM-SafetyBench image variants share one generic instruction across items. Equality alone did not do either: the
sources reword items by adding a clause ("... insider trading" in a test split, "... insider trading and avoid
getting caught" in AdvBench's train split), which left 3 of the 643 harmful train rows of the shipped bundle's
rollout near-copies of test items.
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


MIN_WORDS = 6  # shorter shared runs are stock phrases ("list of details on the"), not the same item


class HeldOut:
    """Normalised item texts that count as evaluation data; `text in held_out` applies the rule above."""

    def __init__(self, texts):
        self.texts = frozenset(texts)
        # " a b c \n d e f " : a run of words found here lies inside one text (no text holds a newline)
        self._joined = "\n".join(f" {t} " for t in self.texts)
        self._by_head: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for t in self.texts:
            words = tuple(t.split())
            if len(words) >= MIN_WORDS:
                self._by_head.setdefault(words[:MIN_WORDS], []).append(words)

    def __len__(self) -> int:
        return len(self.texts)

    def __contains__(self, text: str) -> bool:
        if text in self.texts:
            return True
        words = tuple(text.split())
        if len(words) < MIN_WORDS:
            return False
        if f" {text} " in self._joined:  # a held-out text holds this one
            return True
        for i in range(len(words) - MIN_WORDS + 1):  # this text holds a held-out one
            for held in self._by_head.get(words[i:i + MIN_WORDS], ()):
                if words[i:i + len(held)] == held:
                    return True
        return False


def evaluation_texts(out_dir: str | Path) -> HeldOut:
    """The item texts of every test-split record of a preprocessed output dir, all sources."""
    from sr_ray.data import SHARDS

    files = sorted(str(p) for p in (Path(out_dir) / SHARDS).glob("*.parquet"))
    return _test_item_texts(tuple((f, os.stat(f).st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=4)
def _test_item_texts(shards: tuple[tuple[str, int], ...]) -> HeldOut:
    """Read once per set of shard files (a rollout selects per selection and split); the mtimes in the key
    make a rewritten output dir read again."""
    import pyarrow.dataset as pads

    if not shards:
        return HeldOut(())
    table = pads.dataset([f for f, _ in shards], format="parquet").to_table(
        columns=["prompt", "original_question"], filter=pads.field("split") == "test")
    return HeldOut(item_text(p, q) for p, q in
                   zip(table.column("prompt").to_pylist(), table.column("original_question").to_pylist()))
