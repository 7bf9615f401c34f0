"""`sr-ray attack pgd|pgd-adaptive|gcg`: craft on the AdvBench train goals, write the test goals as a dataset.

Data: AdvBench with the official PGD split (320 train / 100 val / 100 test, seed 42). PGD crafts one
universal image on train goals; GCG crafts one suffix per test goal (as the official, which optimises
suffixes for the goals it evaluates). The output (`advbench_pgd`, `advbench_pgd_adaptive`, `advbench_gcg`)
pairs every test goal with the adversarial image or suffix, for `sr-ray evaluate --attack-dir`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from sr_ray.config_types import require
from sr_ray.eval.attacks.dataset import write_attack_dataset
from sr_ray.eval.attacks.gcg import GCGConfig, run_gcg
from sr_ray.eval.attacks.pgd import PGDConfig, run_pgd
from sr_ray.eval.common import log_to_mlflow, prepared_data, versions
from sr_ray.tracking import resolve_bundle, tracking_uri_for

ATTACK_BENCHMARKS = {"pgd": "advbench_pgd", "pgd-adaptive": "advbench_pgd_adaptive", "gcg": "advbench_gcg"}
CLEAN_GRAY = 128  # the start image when none is given (the official clean_image*.jpg is not released)


@dataclass
class AttackConfig:
    attack: str = "pgd"  # pgd | pgd-adaptive | gcg
    out: str = "runs/attack"
    data_dir: str | None = None  # raw data (shared/data layout); AdvBench is preprocessed into OUT/data
    processed_dir: str | None = None  # or: existing preprocessed shards
    model: str = "smol-llava"
    bundle: str | None = None  # pgd-adaptive: the guarded pipeline under attack (dir or models:/NAME/VERSION)
    tracking_uri: str | None = None
    clean_image: str | None = None  # PGD start image (None: uniform gray)
    n_train: int | None = None  # PGD: AdvBench train goals used (None: all 320)
    n_test: int | None = None  # test goals written to the dataset (None: all 100)
    pgd: PGDConfig = field(default_factory=PGDConfig)
    gcg: GCGConfig = field(default_factory=GCGConfig)

    def __post_init__(self):
        require(self.attack in ATTACK_BENCHMARKS, f"unknown attack {self.attack!r}; choose from {list(ATTACK_BENCHMARKS)}")
        self.pgd = self.pgd if isinstance(self.pgd, PGDConfig) else PGDConfig(**self.pgd)
        self.gcg = self.gcg if isinstance(self.gcg, GCGConfig) else GCGConfig(**self.gcg)
        self.pgd.adaptive = self.attack == "pgd-adaptive"


def advbench_pairs(processed_dir: Path, split: str, limit: int | None) -> list[dict]:
    from sr_ray.data import load_records

    records = load_records(processed_dir, source="advbench", variant="text", split=split)
    if not records:
        raise ValueError(f"{processed_dir}: no AdvBench {split} rows (is AdvBench/harmful_behaviors.csv in the data dir?)")
    return [dict(id=r.id, goal=r.prompt, target=r.reference or "Sure, here is") for r in records[:limit]]


def run_attack(cfg: AttackConfig) -> Path:
    from sr_ray.models import load_vlm
    from sr_ray.reminder import ReminderBundle

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri_for(out, cfg.tracking_uri)
    processed = prepared_data(cfg.data_dir, cfg.processed_dir, out, ["advbench"], None, executor="loop")
    test = advbench_pairs(processed, "test", cfg.n_test)
    vlm = load_vlm(cfg.model)
    bundle_dir = str(resolve_bundle(cfg.bundle, tracking_uri)) if cfg.attack == "pgd-adaptive" and cfg.bundle else None
    bundle = ReminderBundle.load(bundle_dir, vlm) if bundle_dir else None
    benchmark = ATTACK_BENCHMARKS[cfg.attack]
    info = dict(benchmark=benchmark, attack=cfg.attack, model=vlm.model_id, bundle=cfg.bundle, bundle_dir=bundle_dir,
                config=asdict(cfg), n_test=len(test), versions=versions())
    if cfg.attack == "gcg":
        results, record = run_gcg(vlm, [(r["goal"], r["target"]) for r in test], cfg.gcg)
        rows = [dict(id=r["id"], prompt=f"{r['goal']} {res['suffix']}", question=r["goal"], image=None,
                     suffix=res["suffix"], best_loss=res["best_loss"], first_loss=res["first_loss"])
                for r, res in zip(test, results)]
        info |= record | dict(losses={r["id"]: res["losses"] for r, res in zip(test, results)})
        images = {}
    else:
        train = advbench_pairs(processed, "train", cfg.n_train)
        clean = Image.open(cfg.clean_image).convert("RGB") if cfg.clean_image else Image.new("RGB", (512, 512), (CLEAN_GRAY,) * 3)
        adv, record = run_pgd(vlm, clean, [(r["goal"], r["target"]) for r in train], cfg.pgd, bundle)
        rows = [dict(id=r["id"], prompt=r["goal"], question=r["goal"], image="adv") for r in test]
        snapshots = record.pop("snapshots")
        info |= record | dict(n_train=len(train))
        images = {"adv": adv}
        for steps, image in snapshots.items():  # the sweep: one dataset per step count, evaluated like the final
            write_attack_dataset(out / f"steps_{steps}", info | dict(steps=steps), rows, {"adv": image})
    write_attack_dataset(out, info, rows, images)
    final = {f"final_{k}": v for k, v in info.get("final", {}).items()}
    log_to_mlflow(tracking_uri, f"attack-{cfg.attack}", {k: v for k, v in info.items() if k in ("config", "model", "bundle")},
                  {"seconds": info["seconds"], **final}, [out / "attack.json", out / "rows.jsonl", out / "images"],
                  stage="attack")
    print(json.dumps({"benchmark": benchmark, "out": str(out), "seconds": round(info["seconds"], 1), **final}, indent=2))
    return out
