"""`PreprocessConfig`: every knob of the data pipeline, with defaults that fit the paper's use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sr_ray.config_types import require
from sr_ray.data.images import ImageLimits


@dataclass
class PreprocessConfig:
    data_dir: str | None = None  # laid out like shared/data; None: sr_ray.data.default_data_dir()
    out_dir: str = "runs/data"  # gets shards/*.parquet, manifest.json, quarantine.jsonl
    sources: list[str] | None = None  # None = every source found in data_dir
    variants: list[str] | None = None  # None = every variant
    limit_per_source: int | None = None  # first N rows (file order) per source; None = all
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)  # train/val/test where a source has no official split
    max_image_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_side: int = 768
    num_cpus: int | None = None  # for ray.init when no Ray session is running; None = all cores
    rows_per_block: int = 32  # Ray Data block / batch size for the decode stage
    cpus_per_task: float = 1.0  # CPUs each decode task reserves (Ray Data `num_cpus`)
    executor: Literal["ray", "loop"] = "ray"  # "loop": one process (for debugging and the benchmark)
    progress: bool = True
    mmsafetybench_images: str | None = None  # user folder <scenario>/{SD_TYPO,SD}/<id>.jpg (upstream imgs/)
    coco_dir: str | None = None  # COCO train2017 images, for VLSafe `image` rows
    jailbreakv_images: str | None = None  # JailBreakV-28K dataset folder that `image_path` is relative to
    tokenizer: str | None = None  # local dir of a tokenizer/processor: adds chat_prompt + input_ids (for training)

    def __post_init__(self):
        if self.data_dir is None:  # $SR_RAY_DATA_DIR, ../shared/data, else the vendored demo data
            from sr_ray.data import default_data_dir

            self.data_dir = str(default_data_dir())
        self.split_fractions = tuple(float(f) for f in self.split_fractions)
        require(len(self.split_fractions) == 3 and abs(sum(self.split_fractions) - 1.0) <= 1e-9,
                f"split_fractions must be 3 numbers summing to 1, got {self.split_fractions}")

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_pixels, self.max_side)

    def optional_dir(self, name: str) -> Path | None:
        value = getattr(self, name)
        return Path(value).expanduser().resolve() if value else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
