"""One record schema for every benchmark: the `Record` dataclass and its Arrow twin.

Shards hold `RECORD_SCHEMA` columns. While a row travels through the pipeline it also carries
`PIPELINE_ONLY_COLUMNS` (where its image comes from and, if it went bad, why); those are split off
before the shards are written, and rows with a `quarantine_reason` go to `quarantine.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pyarrow as pa

LABELS = ("harmful", "benign")
SPLITS = ("train", "val", "test")

SOURCES = (
    "figstep",
    "mmsafetybench",
    "vlsafe",
    "mmvet",
    "advbench",
    "jailbreakv",
    "harmful_harmless",
    "safetyreminder_responses",
    "alpacaeval",
)


@dataclass(frozen=True)
class Record:
    """One model-ready example. `image` is RGB, EXIF-transposed, max side <= the run's `max_side`."""

    id: str  # "<source>:<item_id>:<variant>", unique within a run
    item_id: str  # the benchmark item; all variants of one item share it (and hence the split)
    source: str
    variant: str
    category: str | None  # the benchmark's own category (FigStep category_name, MM-SafetyBench scenario, ...)
    prompt: str  # the text the model receives
    image: bytes | None  # PNG or JPEG bytes
    image_sha256: str | None  # of `image`
    label: str  # "harmful" | "benign": whether the request is harmful
    reference: str | None  # reference answer / target / recorded response, if any
    split: str  # "train" | "val" | "test"
    provenance: str  # file and line/key it came from; how the image was made
    paper_subset: bool  # in the subset the SafetyReminder paper evaluates (FigStep 7 categories, MM-SB 01-07+09, ...)
    original_question: str | None  # the plain harmful question a judge is shown (FigStep `instruction`, MM-SB `Question`)
    judge_label: str | None  # safetyreminder_responses only: "safe" | "unsafe" | "unknown" for `reference`
    chat_prompt: str | None = None  # optional tokenise stage: `prompt` after the model's chat template
    input_ids: list[int] | None = None  # optional tokenise stage

    @classmethod
    def from_row(cls, row: dict) -> "Record":
        return cls(**{f.name: row.get(f.name) for f in fields(cls)})


RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("item_id", pa.string()),
        ("source", pa.string()),
        ("variant", pa.string()),
        ("category", pa.string()),
        ("prompt", pa.string()),
        ("image", pa.binary()),
        ("image_sha256", pa.string()),
        ("label", pa.string()),
        ("reference", pa.string()),
        ("split", pa.string()),
        ("provenance", pa.string()),
        ("paper_subset", pa.bool_()),
        ("original_question", pa.string()),
        ("judge_label", pa.string()),
    ]
)
TOKENIZED_FIELDS = [pa.field("chat_prompt", pa.string()), pa.field("input_ids", pa.list_(pa.int32()))]

# Where the image comes from: a file (`image_path`) or a local rendering (`render_style` of `render_text`).
PIPELINE_ONLY_COLUMNS = ("image_path", "render_style", "render_text", "quarantine_reason")
PIPELINE_SCHEMA = RECORD_SCHEMA
for _name in PIPELINE_ONLY_COLUMNS:
    PIPELINE_SCHEMA = PIPELINE_SCHEMA.append(pa.field(_name, pa.string()))


def empty_row() -> dict:
    return {name: None for name in PIPELINE_SCHEMA.names}
