"""Driver-side pieces of SAPT: the train/val split of the preference rows and the bundle's checkpoint choice."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from sr_ray.train.config import SaptConfig
from sr_ray.train.trainer import pick_checkpoint, split_preferences


def prefs(n_train: int, n_val: int) -> pd.DataFrame:
    rows = [dict(id=f"{split}{i}", split=split, safe=i % 2 == 0) for split, n in (("train", n_train), ("val", n_val))
            for i in range(n)]
    return pd.DataFrame(rows)


def test_split_caps_val_per_label_with_a_seed():
    cfg = SaptConfig(val_limit=3, batch_size=4, num_workers=2)
    train, val = split_preferences(prefs(8, 20), cfg)
    assert len(train) == 8 and (train["split"] == "train").all()
    assert val.groupby("safe").size().to_dict() == {False: 3, True: 3}
    assert split_preferences(prefs(8, 20), cfg)[1]["id"].tolist() == val["id"].tolist()
    with pytest.raises(ValueError, match="fewer than one batch"):
        split_preferences(prefs(3, 2), cfg)
    one_kind = prefs(8, 0).assign(safe=True)
    with pytest.raises(ValueError, match="harmful"):
        split_preferences(one_kind, cfg)


def result(*metrics) -> SimpleNamespace:
    return SimpleNamespace(best_checkpoints=[(f"ckpt{m['epoch']}", m) for m in metrics])


def test_bundle_checkpoint_best_by_val_score_then_loss():
    r = result(
        {"epoch": 0, "val/score": 1.25, "val/lm_loss": 2.0},
        {"epoch": 2, "val/score": 1.5, "val/lm_loss": 1.9},
        {"epoch": 1, "val/score": 1.5, "val/lm_loss": 1.7},  # ties on score: the lower loss wins
        {"epoch": 3, "val/score": float("nan"), "val/lm_loss": 1.0},
    )
    assert pick_checkpoint(r, "best")[0] == "ckpt1"
    assert pick_checkpoint(r, "last")[0] == "ckpt3"
