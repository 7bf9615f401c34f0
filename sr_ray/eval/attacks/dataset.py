"""The on-disk form of an attack's output, a dataset the evaluation runner reads like a benchmark.

    ATTACK_DIR/attack.json   what was run: benchmark key, attack, model, bundle, config, loss curve, timings
    ATTACK_DIR/rows.jsonl    one evaluation row per line: id, prompt, image (a file under images/ or null), ...
    ATTACK_DIR/images/*.png  adversarial images, exactly the pixels the attack optimised
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

ATTACK_JSON, ROWS_JSONL, IMAGES = "attack.json", "rows.jsonl", "images"


def write_attack_dataset(out: str | Path, info: dict, rows: list[dict], images: dict[str, Image.Image]) -> Path:
    """`rows[i]["image"]` names a key of `images` (saved as images/<key>.png) or is None."""
    out = Path(out)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(out / IMAGES / f"{name}.png")
    with open(out / ROWS_JSONL, "w") as f:
        for row in rows:
            image = row.get("image")
            f.write(json.dumps({**row, "image": f"{IMAGES}/{image}.png" if image else None}, ensure_ascii=False) + "\n")
    (out / ATTACK_JSON).write_text(json.dumps(info, indent=2))
    return out


def read_attack_info(directory: str | Path) -> dict:
    path = Path(directory) / ATTACK_JSON
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {ATTACK_JSON}; not an `sr-ray attack` output")
    return json.loads(path.read_text())


def attack_rows(directory: str | Path) -> tuple[str, list[dict]]:
    """(benchmark key, inference rows with image bytes) of an attack output."""
    directory = Path(directory)
    info = read_attack_info(directory)
    key = info["benchmark"]
    rows = []
    for line in (directory / ROWS_JSONL).read_text().splitlines():
        r = json.loads(line)
        image = (directory / r["image"]).read_bytes() if r.get("image") else None
        rows.append(dict(key=f"{key}|{r['id']}", benchmark=key, id=r["id"], source=info["attack"],
                         variant=info["attack"], category=r.get("category") or key, prompt=r["prompt"], image=image,
                         label="harmful", question=r.get("question") or r["prompt"]))
    return key, rows
