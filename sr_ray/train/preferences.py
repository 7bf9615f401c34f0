"""Preference rows (question, image, chosen, rejected, safe): what SAPT trains on.

They come from our rollouts (parquet, `rollout.py`) or from files in the official format (a JSON list or
JSONL with `question`, `image` (a path relative to the file, or none), `chosen`, `rejected`, `safe`).
A row that does not fit is kept aside with a reason (`Quarantined`), never dropped silently.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sr_ray.train.config import RecordSelection

log = logging.getLogger(__name__)
# chosen_ended: the chosen text ends on its own (False: a rollout answer cut by the token budget, which SAPT
# must not teach to end there).
# attack_prefix: the prefill a harmful row was rolled out under ("" for none), reused by validation.
PREFERENCE_COLUMNS = ["id", "source", "split", "prompt", "image", "safe", "chosen", "rejected", "origin", "chosen_ended",
                      "attack_prefix"]


@dataclass
class Quarantined:
    where: str
    reason: str


def select_records(data_dir: str | Path, selections: list[RecordSelection], label: str, split: str, seed: int) -> list:
    """Records of `label` in `split` from each selection, a seeded sample of at most its cap.

    Outside the test split, a record whose item is any source's test item is evaluation data and is left out
    (counted in the log), before sampling, so a cap still fills from clean rows.
    """
    from sr_ray.data import load_records
    from sr_ray.data.overlap import evaluation_texts, item_text

    held_out = evaluation_texts(data_dir) if split != "test" else frozenset()
    chosen = []
    for sel in selections:
        records = load_records(data_dir, source=sel.source, variant=sel.variant, split=split, label=label)
        clean = [r for r in records if item_text(r.prompt, r.original_question) not in held_out]
        if len(clean) < len(records):
            log.info("selection %s/%s %s %s: %d of %d records left out as another source's test items",
                     sel.source, sel.variant or "*", label, split, len(records) - len(clean), len(records))
        records = sorted(clean, key=lambda r: r.id)
        if not records:
            log.warning("selection %s/%s has no %s %s records in %s", sel.source, sel.variant or "*", label, split, data_dir)
        cap = sel.cap(split)
        if cap is not None and len(records) > cap:
            key = f"{seed}:{sel.source}:{sel.variant}:{split}:{label}" + (f":{sel.image}" if sel.image else "")
            records = random.Random(key).sample(records, cap)  # a noise-image selection draws its own rows
        chosen.extend(records)
    return chosen


def _as_bool(value) -> bool | None:
    if isinstance(value, bool):
        return value
    return {"true": True, "false": False, "1": True, "0": False}.get(str(value).strip().lower())


def read_official(path: str | Path, split: str = "train") -> tuple[list[dict], list[Quarantined]]:
    """Rows of an official-format preference file; images are read into bytes."""
    path = Path(path)
    text = path.read_text()
    try:
        entries = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        return [], [Quarantined(str(path), f"malformed JSON: {err}")]
    if not isinstance(entries, list):
        return [], [Quarantined(str(path), "top level is not a list")]
    rows, bad = [], []
    for i, entry in enumerate(entries):
        where = f"{path} entry {i}"
        if not isinstance(entry, dict):
            bad.append(Quarantined(where, "entry is not an object"))
            continue
        missing = [k for k in ("question", "chosen", "rejected") if not isinstance(entry.get(k), str) or not entry[k].strip()]
        safe = _as_bool(entry.get("safe"))
        if missing or safe is None:
            bad.append(Quarantined(where, f"needs non-empty strings question/chosen/rejected and a boolean safe (missing {missing})"))
            continue
        image = None
        if entry.get("image"):
            image_path = Path(entry["image"]) if Path(entry["image"]).is_absolute() else path.parent / entry["image"]
            if not image_path.is_file():
                bad.append(Quarantined(where, f"image not found: {image_path}"))
                continue
            image = image_path.read_bytes()
        rows.append(dict(id=f"{path.name}:{i}", source=path.name, split=str(entry.get("split") or split),
                         prompt=entry["question"], image=image, safe=safe, chosen=entry["chosen"],
                         rejected=entry["rejected"], origin="file", chosen_ended=True, attack_prefix=""))
    return rows, bad


def load_preferences(paths: list[str | Path]) -> tuple[pd.DataFrame, list[Quarantined]]:
    """All preference rows of rollout parquet files and official-format files."""
    frames, bad = [], []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"preference data {path} does not exist (run `sr-ray rollout` first?)")
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
            missing = set(PREFERENCE_COLUMNS) - set(frame.columns)
            if missing:
                raise ValueError(f"{path}: not a preference table, missing columns {sorted(missing)} "
                                 "(a rollout from before chosen_ended: run `sr-ray rollout` again)")
        else:
            rows, quarantined = read_official(path)
            bad += quarantined
            frame = pd.DataFrame(rows, columns=PREFERENCE_COLUMNS)
        frames.append(frame[PREFERENCE_COLUMNS])
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PREFERENCE_COLUMNS)
    return frame, bad


def sample_prefix(answer: str, rng: random.Random, p_empty: float = 1 / 3, min_chars: int = 20) -> tuple[str, str]:
    """(prefix, suffix) of `answer`, as the official `get_prefix` (SAPT.py:66-104).

    With probability `p_empty` the prefix is empty. Otherwise a length L ~ U[min_chars, len] is drawn
    (L = len for answers shorter than min_chars) and the answer is cut at the last space before L;
    up to 10 draws, then an empty prefix.
    """
    answer = answer.strip()
    if rng.random() < p_empty:
        return "", answer
    for _ in range(10):
        length = len(answer) if len(answer) < min_chars else rng.randint(min_chars, len(answer))
        cut = answer.rfind(" ", 0, length)
        if cut > 0:
            return answer[:cut].strip(), answer[cut:].strip()
    return "", answer
