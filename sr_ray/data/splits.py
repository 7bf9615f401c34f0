"""Seeded, stable train/val/test splits.

A split is a function of (seed, source, item_id) only, never of row order, row count or machine, so
adding, removing or limiting rows never moves another row to a different split, and every variant
of one benchmark item lands in the same split (no text-variant-in-train / image-variant-in-test leak).
"""

from __future__ import annotations

import hashlib
from math import ceil

import numpy as np

from sr_ray.data.schema import SPLITS

ADVBENCH_PGD_SEED = 42
ADVBENCH_PGD_HOLDOUT = 200  # 520 -> 320 train, then 200 -> 100 val / 100 test


def hash_split(key: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """Map `key` to "train" / "val" / "test" with the given fractions, via sha256(seed:key)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def advbench_pgd_splits(n_rows: int) -> list[str]:
    """The official AdvBench split of the PGD/BAP protocol, per CSV data row (0-based).

    Safety-Reminder `script/Jailbreak/dataset_split.py` runs HF `datasets`
    `train_test_split(test_size=200, seed=42)` (train = 320) and then, on the 200 held back,
    `train_test_split(test_size=0.5, seed=42)`, whose "train" half is val and "test" half is test.
    HF builds each split from `np.random.default_rng(seed).permutation(n)`: the first `n_test`
    indices are test, the rest train (`n_test = ceil(test_size * n)` for a float). We replicate that
    with numpy so `datasets` is not a dependency.
    """
    if n_rows <= ADVBENCH_PGD_HOLDOUT:
        raise ValueError(f"AdvBench has {n_rows} rows; the PGD split needs more than {ADVBENCH_PGD_HOLDOUT}")
    first = np.random.default_rng(ADVBENCH_PGD_SEED).permutation(n_rows)
    held_back, train = first[:ADVBENCH_PGD_HOLDOUT], first[ADVBENCH_PGD_HOLDOUT:]
    second = np.random.default_rng(ADVBENCH_PGD_SEED).permutation(len(held_back))
    n_test = ceil(0.5 * len(held_back))
    test, val = held_back[second[:n_test]], held_back[second[n_test:]]
    splits = [""] * n_rows
    for name, indices in (("train", train), ("val", val), ("test", test)):
        for i in indices:
            splits[int(i)] = name
    return splits
