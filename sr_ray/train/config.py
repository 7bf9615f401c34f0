"""Typed configs of the three training stages (read by `sr_ray.config.load`: YAML < preset < flags < --set).

Dataclass defaults are the paper's (SafetyReminder §4: k=4, AdamW 1e-4 / wd 0.01, batch 4, 50 epochs,
λ=0.05, 256+256 probe prompts). The YAML files in `configs/` size the runs for this machine (the CPU demo);
the presets in `configs/presets/` size them for GPU clusters (sections `rollout`, `fit_probe`, `train`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sr_ray.config_types import ConfigError, require
from sr_ray.reminder.guard import PAPER_INTERVAL, PAPER_THRESHOLD
from sr_ray.reminder.soft_prompt import DEFAULT_INIT_TEXT

OFFICIAL_REJECTED = "I'm sorry, but I cannot help with that."  # the official constant (DPO_dataset.py:24)
DEFAULT_REFUSALS = [
    "I'm sorry, but I cannot help with that request.",
    "I cannot assist with that. It could cause harm.",
    "I'm sorry, but I can't help with that. It could be dangerous or illegal.",
    "I apologize, but I cannot provide that information because it could be used to hurt people.",
]


@dataclass
class RecordSelection:
    """Rows of one source (and variant) of the preprocessed data, capped per split (None = all)."""

    source: str
    variant: str | None = None
    train: int | None = None
    val: int | None = None
    attack: str | None = None  # rollouts only: "prefill" forces the answer to start with the harmful target
    # rollouts only: "noise" asks with a seeded random-noise image in place of the row's own (an attacker's
    # image need not be related; without such rows SAPT learns "an image, so safe")
    image: str | None = None

    def __post_init__(self):
        if self.attack not in (None, "prefill"):
            raise ConfigError(f"selection {self.source}: attack must be null or prefill, got {self.attack!r}")
        if self.image not in (None, "noise"):
            raise ConfigError(f"selection {self.source}: image must be null or noise, got {self.image!r}")

    def cap(self, split: str) -> int | None:
        return getattr(self, split)


@dataclass
class StageConfig:
    """What every stage shares: where outputs and the MLflow store live."""

    work_dir: str = "runs"
    model: str = "smol-llava"
    model_kwargs: dict = field(default_factory=dict)  # e.g. {image_tokens: 64} for smol-llava
    tracking_uri: str | None = None  # None: sqlite:///<work_dir>/mlflow.db
    experiment: str = "sr-ray"
    seed: int = 0

    def path(self, value: str | None, default: str) -> Path:
        """`value`, else `work_dir/default`, absolute (Ray workers run in other directories)."""
        return Path(value).expanduser().resolve() if value else (Path(self.work_dir) / default).resolve()


@dataclass
class RolloutConfig(StageConfig):
    """On-policy rollouts: the base VLM answers the training prompts (Ray Data actor pool)."""

    data_dir: str | None = None  # preprocessed shards (run_preprocess out_dir); None: <work_dir>/data
    out: str | None = None  # parquet; None: <work_dir>/rollout/rollout.parquet
    harmful: list[RecordSelection] = field(default_factory=lambda: [
        RecordSelection("figstep", "text_inlined"), RecordSelection("mmsafetybench", "text"),
        RecordSelection("advbench"), RecordSelection("jailbreakv", "text"),
    ])
    benign: list[RecordSelection] = field(default_factory=lambda: [
        RecordSelection("harmful_harmless", train=256, val=64), RecordSelection("mmvet"),
    ])
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    refusals: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSALS))  # chosen texts for harmful rows
    max_new_tokens: int = 256
    batch_size: int = 8
    concurrency: int = 1  # actors in the pool (one model load each)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # 1 on GPU nodes: Ray gives each actor its own GPU (the presets set it)


@dataclass
class ProbeFitConfig(StageConfig):
    """Harm probe on final-norm hidden states: PCA-20 -> first 4 -> logistic regression (the official
    `script/SAPT/train_classfier.py`)."""

    data_dir: str | None = None  # None: <work_dir>/data
    out_dir: str | None = None  # None: <work_dir>/probe
    harmful: list[RecordSelection] = field(default_factory=lambda: [RecordSelection("harmful_harmless", train=256)])
    benign: list[RecordSelection] = field(default_factory=lambda: [RecordSelection("harmful_harmless", train=256, val=256)])
    # "prompt_end": last prompt token, text only (official). "soft_token": last soft token after a sampled
    # prefix of the rollout's answer (needs `rollout`), i.e. where the probe is applied at decode time.
    feature: Literal["prompt_end", "soft_token"] = "prompt_end"
    rollout: str | None = None  # None: <work_dir>/rollout/rollout.parquet
    n_components: int = 20
    top_m: int = 4
    threshold: float = PAPER_THRESHOLD
    batch_size: int = 16
    num_cpus: float = 1.0  # resources of the feature-extraction task
    num_gpus: float = 0.0


@dataclass
class SaptConfig(StageConfig):
    """Safety-Activation Prompt Tuning on Ray Train + DeepSpeed (the official `script/SAPT/train.py`)."""

    train_data: list[str] = field(default_factory=list)  # rollout parquet / official JSON(L); []: <work_dir>/rollout/rollout.parquet
    probe: str | None = None  # probe dir; None: <work_dir>/probe/probe
    data_dir: str | None = None  # for the manifest checksum recorded in the bundle; None: <work_dir>/data
    out_dir: str | None = None  # None: <work_dir>/sapt (bundle, plots, Ray Train storage)
    # method (paper defaults)
    k: int = 4
    init_text: str = DEFAULT_INIT_TEXT
    init_from: str | None = None  # warm start: a bundle (or soft_prompt) dir whose soft prompt SAPT continues from
    epochs: int = 50
    batch_size: int = 4  # global, split evenly across workers
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: Literal["constant", "cosine"] = "constant"  # constant: the paper; cosine: decay to 0 by the end
    cls_weight: float = 0.05  # λ of the probe BCE
    p_empty_prefix: float = 1 / 3
    min_prefix_chars: int = 20
    max_target_tokens: int = 256  # longer targets are cut (and then get no EOS)
    # guard the bundle is trained for, and per-epoch validation
    interval: int = PAPER_INTERVAL
    threshold: float = PAPER_THRESHOLD
    # None: flag at `threshold` (the paper's 0.2). A rate: every epoch the threshold is re-chosen on the val
    # split, as the largest one in `threshold_range` that flags at most this share of the benign val answers
    # read with that epoch's soft prompt; the bundle keeps its epoch's threshold. (A probe fit on prompt-end
    # states reads differently at the soft token: on the CPU demo 0.2 flagged about half the harmful answers.)
    calibrate_benign_flag_rate: float | None = None
    threshold_range: tuple[float, float] = (0.05, 0.5)
    val_limit: int | None = 128  # per label (harmful / benign) of the val split
    val_every: int = 1  # validate every N epochs (and after the last); only validated epochs can become the bundle
    val_max_new_tokens: int = 256
    val_batch_size: int = 8
    # distribution
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    bf16: bool = False
    zero_stage: int = 2
    max_failures: int = 1
    run_name: str | None = None  # reuse a name to resume that run; None: a fresh unique name
    registered_model: str = "safety-reminder"
    model_aliases: list[str] = field(default_factory=list)  # registry aliases moved to the new version, e.g. [champion]
    # The bundle's epoch: "best" = highest val/score (refusal rate on harmful + unchanged rate on benign val
    # prompts; ties: lower val L_LM, then later); "last" = the final epoch. The official picks one by hand.
    bundle_from: Literal["best", "last"] = "best"

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.threshold_range = tuple(self.threshold_range)
        for name in ("epochs", "batch_size", "num_workers", "k", "interval", "val_batch_size"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.cpus_per_worker >= 0, f"cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        require(self.batch_size % self.num_workers == 0,
                f"batch_size {self.batch_size} must be divisible by num_workers {self.num_workers}")
        require(self.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0-3, got {self.zero_stage}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
