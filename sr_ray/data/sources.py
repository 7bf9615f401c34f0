"""Readers for the real benchmark formats, one per source, in a data directory laid out like
`shared/data` (see its README and each PROVENANCE.md).

A reader yields pipeline rows (dicts over `PIPELINE_SCHEMA`), all variants of one item together.
It never raises on a bad row: a malformed CSV row, JSON line or entry becomes a row with a
`quarantine_reason`. A source whose files are absent raises `SourceMissing` and is skipped.
Images are not opened here; rows carry `image_path` or a `render_style` for the decode stage.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sr_ray.data.schema import empty_row
from sr_ray.data.splits import advbench_pgd_splits
from sr_ray.data.typography import FIGSTEP_PROMPT, figstep_image_text, inline_image_text

FIGSTEP_PAPER_CATEGORIES = frozenset(
    {"Illegal Activity", "Hate Speech", "Malware Generation", "Physical Harm", "Fraud", "Adult Content", "Privacy Violation"}
)
MMSB_PAPER_SCENARIOS = frozenset({"01", "02", "03", "04", "05", "06", "07", "09"})
VLSAFE_CAPTION_LABEL = "[Image description (COCO caption standing in for the image, which is not available)]:"
RESPONSE_SAFE_LABELS = {"true": "safe", "false": "unsafe"}


class SourceMissing(Exception):
    """The source's files are not in the data directory."""


@dataclass
class SourceContext:
    """What a reader needs: the data dir, optional user image dirs, and a record of input checksums."""

    root: Path
    mmsafetybench_images: Path | None = None
    coco_dir: Path | None = None
    jailbreakv_images: Path | None = None
    checksums: dict[str, str] = field(default_factory=dict)

    def require(self, *relpaths: str) -> None:
        if not any((self.root / p).exists() for p in relpaths):
            raise SourceMissing(f"none of {', '.join(relpaths)} in {self.root}")

    def read_text(self, relpath: str) -> str:
        data = (self.root / relpath).read_bytes()
        self.checksums[relpath] = hashlib.sha256(data).hexdigest()
        return data.decode("utf-8", errors="replace")


def row(source: str, item_id: str, variant: str, prompt: str | None, label: str, provenance: str, **extra) -> dict:
    out = empty_row()
    out.update(
        id=f"{source}:{item_id}:{variant}", item_id=item_id, source=source, variant=variant,
        prompt=prompt, label=label, provenance=provenance, paper_subset=False,
    )
    out.update(extra)
    return out


def bad_row(source: str, item_id: str, provenance: str, reason: str) -> dict:
    return row(source, item_id, "unparsed", None, None, provenance, quarantine_reason=reason)


def csv_rows(
    ctx: SourceContext, relpath: str, columns: tuple[str, ...], rejoin_last: bool = False
) -> Iterator[tuple[int, dict | str]]:
    """(data row index, dict) per CSV row, or (index, reason) for a row that does not fit the header.

    `rejoin_last`: the last column is free text that upstream wrote with unquoted commas; extra
    fields are joined back into it (lossless), instead of quarantining the row.
    """
    reader = csv.reader(io.StringIO(ctx.read_text(relpath), newline=""))
    header = next(reader, None)
    if header is None or [h.strip() for h in header[: len(columns)]] != list(columns):
        yield -1, f"malformed CSV header {header!r}; expected {list(columns)!r}"
        return
    index = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield index, f"malformed CSV row (line {reader.line_num}): {err}"
        else:
            if not fields:  # a blank line is no row (as csv.DictReader)
                continue
            if rejoin_last and len(fields) > len(header):
                fields = fields[: len(header) - 1] + [",".join(fields[len(header) - 1 :])]
            if len(fields) != len(header):
                yield index, f"malformed CSV row (line {reader.line_num}): {len(fields)} fields, header has {len(header)}"
            else:
                yield index, dict(zip(header, fields))
        index += 1


def json_pairs(text: str):
    """json.loads that keeps duplicate keys of the top-level object visible (as a list of pairs)."""
    return json.loads(text, object_pairs_hook=lambda pairs: pairs)


def _as_dict(pairs) -> dict | None:
    return dict(pairs) if isinstance(pairs, list) and all(isinstance(p, tuple) for p in pairs) else None


def read_figstep(ctx: SourceContext) -> Iterator[dict]:
    ctx.require("FigStep/question/safebench.csv", "FigStep/question/SafeBench-Tiny.csv")
    # SafeBench-Tiny is a subset of SafeBench (same items, separately rendered images): read it only
    # where the full CSV is absent (the vendored demo data).
    name, relpath = next(
        (name, f"FigStep/question/{csv_name}")
        for name, csv_name in (("SafeBench", "safebench.csv"), ("SafeBench-Tiny", "SafeBench-Tiny.csv"))
        if (ctx.root / "FigStep/question" / csv_name).exists()
    )
    columns = ("dataset", "category_id", "task_id", "category_name", "question", "instruction")
    for index, rec in csv_rows(ctx, relpath, columns):
        where = f"{relpath} data row {index}"
        if isinstance(rec, str):
            yield bad_row("figstep", f"{name}-row{index}", where, rec)
            continue
        if not (rec["category_id"].isdigit() and rec["task_id"].isdigit()):
            yield bad_row("figstep", f"{name}-row{index}", where, "malformed CSV row: category_id/task_id not integers")
            continue
        item = f"{rec['dataset']}-{rec['category_id']}-{rec['task_id']}"
        instruction = rec["instruction"].strip()
        if not instruction:
            yield bad_row("figstep", item, where, "empty prompt: FigStep instruction is empty")
            continue
        image = f"FigStep/images/{name}/query_{rec['dataset']}_{rec['category_id']}_{rec['task_id']}_6.png"
        common = dict(category=rec["category_name"], original_question=instruction,
                      paper_subset=rec["category_name"] in FIGSTEP_PAPER_CATEGORIES)
        yield row("figstep", item, "image", FIGSTEP_PROMPT, "harmful", f"{where}; image {image}",
                  image_path=str(ctx.root / image), **common)
        yield row("figstep", item, "text_inlined", inline_image_text(figstep_image_text(instruction), FIGSTEP_PROMPT),
                  "harmful", f"{where}; text of image {image} inlined", **common)
    yield from _figstep_benign(ctx)


def _figstep_benign(ctx: SourceContext) -> Iterator[dict]:
    relpath = "FigStep/question/benign_sentences_without_harmful_phase.csv"
    if not (ctx.root / relpath).exists():
        return
    for index, rec in csv_rows(ctx, relpath, ("sentence",), rejoin_last=True):
        item, where = f"benign-{index}", f"{relpath} data row {index}"
        if isinstance(rec, str):
            yield bad_row("figstep", item, where, rec)
            continue
        sentence = rec["sentence"].strip()
        if not sentence:
            yield bad_row("figstep", item, where, "empty prompt: benign sentence is empty")
            continue
        common = dict(category="benign", original_question=sentence)
        yield row("figstep", item, "image", FIGSTEP_PROMPT, "benign", f"{where}; image rendered locally (FigStep layout)",
                  render_style="figstep", render_text=sentence, **common)
        yield row("figstep", item, "text_inlined", inline_image_text(figstep_image_text(sentence), FIGSTEP_PROMPT),
                  "benign", f"{where}; image text inlined", **common)


def read_mmsafetybench(ctx: SourceContext) -> Iterator[dict]:
    files = sorted((ctx.root / "MM-SafetyBench/processed_questions").glob("*.json"))
    if not files:
        raise SourceMissing(f"no MM-SafetyBench/processed_questions/*.json in {ctx.root}")
    for path in files:
        scenario, relpath = path.stem, f"MM-SafetyBench/processed_questions/{path.name}"
        try:
            pairs = json_pairs(ctx.read_text(relpath))
        except json.JSONDecodeError as err:
            yield bad_row("mmsafetybench", f"{scenario}-file", relpath, f"malformed JSON file: {err}")
            continue
        if _as_dict(pairs) is None:
            yield bad_row("mmsafetybench", f"{scenario}-file", relpath, "malformed JSON file: top level is not an object")
            continue
        seen = set()
        for qid, entry in pairs:
            item, where = f"{scenario}-{qid}", f"{relpath} key {qid!r}"
            entry = _as_dict(entry)
            if qid in seen:
                yield bad_row("mmsafetybench", f"{item}-dup", where, "duplicate question id in JSON object")
                continue
            seen.add(qid)
            missing = [k for k in ("Question", "Key Phrase", "Rephrased Question") if entry is None or not isinstance(entry.get(k), str)]
            if missing:
                yield bad_row("mmsafetybench", item, where, f"malformed JSON entry: missing/non-string {missing}")
                continue
            yield from _mmsb_variants(ctx, scenario, qid, item, where, entry)


def _mmsb_variants(ctx: SourceContext, scenario: str, qid: str, item: str, where: str, e: dict) -> Iterator[dict]:
    common = dict(category=scenario, original_question=e["Question"], paper_subset=scenario[:2] in MMSB_PAPER_SCENARIOS)
    key_phrase, rephrased = e["Key Phrase"], e["Rephrased Question"]
    yield row("mmsafetybench", item, "text", e["Question"], "harmful", where, **common)
    yield row("mmsafetybench", item, "typo", rephrased, "harmful", f"{where}; TYPO image rendered locally from Key Phrase",
              render_style="mmsafetybench_typo", render_text=key_phrase, **common)
    yield row("mmsafetybench", item, "typo_text_inlined", inline_image_text(key_phrase, rephrased), "harmful",
              f"{where}; Key Phrase inlined", **common)
    if ctx.mmsafetybench_images is not None:
        for variant, folder, prompt in (("sd_typo", "SD_TYPO", rephrased), ("sd", "SD", e.get("Rephrased Question(SD)"))):
            image = ctx.mmsafetybench_images / scenario / folder / f"{qid}.jpg"
            yield row("mmsafetybench", item, variant, prompt, "harmful", f"{where}; image {image}", image_path=str(image), **common)


def read_vlsafe(ctx: SourceContext) -> Iterator[dict]:
    relpath = "VLSafe/harmlessness_examine.jsonl"
    ctx.require(relpath)
    for number, line in enumerate(ctx.read_text(relpath).splitlines(), start=1):
        item, where = f"line{number}", f"{relpath} line {number}"
        try:
            rec = json.loads(line)
            query, caption, image_id = rec["query"], rec["caption"], rec["image_id"]
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            yield bad_row("vlsafe", item, where, f"malformed JSON line: {type(err).__name__}: {err}")
            continue
        if not str(query).strip():
            yield bad_row("vlsafe", item, where, "empty prompt: query is empty")
            continue
        common = dict(original_question=query, paper_subset=True)
        yield row("vlsafe", item, "text", f"{VLSAFE_CAPTION_LABEL} {caption}\n\n{query}", "harmful",
                  f"{where}; COCO image {image_id} replaced by its caption", **common)
        if ctx.coco_dir is not None:
            image = ctx.coco_dir / image_id
            if not image.exists() and (ctx.coco_dir / "train2017" / image_id).exists():
                image = ctx.coco_dir / "train2017" / image_id
            yield row("vlsafe", item, "image", query, "harmful", f"{where}; image {image}", image_path=str(image), **common)


def read_mmvet(ctx: SourceContext) -> Iterator[dict]:
    relpath = "MM-Vet/mm-vet.json"
    ctx.require(relpath)
    try:
        pairs = json_pairs(ctx.read_text(relpath))
    except json.JSONDecodeError as err:
        yield bad_row("mmvet", "file", relpath, f"malformed JSON file: {err}")
        return
    if _as_dict(pairs) is None:
        yield bad_row("mmvet", "file", relpath, "malformed JSON file: top level is not an object")
        return
    seen = set()
    for key, entry in pairs:
        entry, where = _as_dict(entry), f"{relpath} key {key!r}"
        if key in seen or entry is None or not all(isinstance(entry.get(k), str) for k in ("imagename", "question")):
            reason = "duplicate key in JSON object" if key in seen else "malformed JSON entry: needs string imagename, question"
            yield bad_row("mmvet", f"{key}-dup" if key in seen else key, where, reason)
            continue
        seen.add(key)
        image = f"MM-Vet/images/{entry['imagename']}"
        yield row("mmvet", key, "image", entry["question"], "benign", f"{where}; image {image}",
                  image_path=str(ctx.root / image), reference=entry.get("answer"),
                  category="+".join(entry.get("capability") or []) or None, paper_subset=True)


def read_advbench(ctx: SourceContext) -> Iterator[dict]:
    relpath = "AdvBench/harmful_behaviors.csv"
    ctx.require(relpath)
    rows = list(csv_rows(ctx, relpath, ("goal", "target")))
    # `split` is the official PGD split (320/100/100 over the file's data rows), not the hash split.
    splits = advbench_pgd_splits(len(rows)) if len(rows) > 200 else [None] * len(rows)
    for (index, rec), split in zip(rows, splits):
        item, where = f"row{index}", f"{relpath} data row {index}"
        if isinstance(rec, str):
            yield bad_row("advbench", item, where, rec)
            continue
        yield row("advbench", item, "text", rec["goal"], "harmful", where, reference=rec["target"],
                  original_question=rec["goal"], split=split, paper_subset=True)


def read_jailbreakv(ctx: SourceContext) -> Iterator[dict]:
    mini, redteam = "JailBreakV_28K/mini_JailBreakV_28K.csv", "JailBreakV_28K/RedTeam_2K.csv"
    ctx.require(mini, redteam)
    if (ctx.root / mini).exists():
        columns = ("id", "jailbreak_query", "redteam_query", "format", "policy", "image_path")
        for index, rec in csv_rows(ctx, mini, columns):
            where = f"{mini} data row {index}"
            if isinstance(rec, str):
                yield bad_row("jailbreakv", f"mini-row{index}", where, rec)
                continue
            item = f"mini-{rec['id']}"
            common = dict(category=rec["policy"], original_question=rec["redteam_query"])
            yield row("jailbreakv", item, "text", rec["jailbreak_query"], "harmful", f"{where}; format {rec['format']}", **common)
            if ctx.jailbreakv_images is not None:
                image = ctx.jailbreakv_images / rec["image_path"]
                yield row("jailbreakv", item, "image", rec["jailbreak_query"], "harmful", f"{where}; image {image}",
                          image_path=str(image), **common)
    if (ctx.root / redteam).exists():
        for index, rec in csv_rows(ctx, redteam, ("id", "question", "policy", "from")):
            where = f"{redteam} data row {index}"
            if isinstance(rec, str):
                yield bad_row("jailbreakv", f"redteam-row{index}", where, rec)
                continue
            yield row("jailbreakv", f"redteam-{rec['id']}", "redteam", rec["question"], "harmful",
                      f"{where}; from {rec['from']}", category=rec["policy"], original_question=rec["question"])


def _json_list(ctx: SourceContext, relpath: str) -> Iterator[tuple[int, dict | None, str]]:
    """(index, entry or None, provenance) for a JSON-list file; a malformed file yields one None entry."""
    try:
        entries = json.loads(ctx.read_text(relpath))
    except json.JSONDecodeError as err:
        yield -1, None, f"{relpath}: malformed JSON file: {err}"
        return
    if not isinstance(entries, list):
        yield -1, None, f"{relpath}: malformed JSON file: top level is not a list"
        return
    for index, entry in enumerate(entries):
        yield index, entry if isinstance(entry, dict) else None, f"{relpath} index {index}"


def read_harmful_harmless(ctx: SourceContext) -> Iterator[dict]:
    files = [(kind, split) for kind in ("harmful", "harmless") for split in ("train", "val", "test")]
    ctx.require(*(f"refusal_direction/splits/{k}_{s}.json" for k, s in files))
    for kind, split in files:
        relpath = f"refusal_direction/splits/{kind}_{split}.json"
        if not (ctx.root / relpath).exists():
            continue
        for index, entry, where in _json_list(ctx, relpath):
            item = f"{kind}_{split}-{index}"
            if entry is None or not isinstance(entry.get("instruction"), str):
                yield bad_row("harmful_harmless", item, where, "malformed JSON entry: needs string instruction")
                continue
            yield row("harmful_harmless", item, "text", entry["instruction"], "harmful" if kind == "harmful" else "benign",
                      where, category=entry.get("category"), split=split, paper_subset=True)


def read_safetyreminder_responses(ctx: SourceContext) -> Iterator[dict]:
    folder = "SafetyReminder_JailbreakEvalBenchmark"
    ctx.require(f"{folder}/SPA_VL.json", f"{folder}/AdvBench_with_adv_attack.json")
    for variant, name in (("spa_vl", "SPA_VL.json"), ("advbench_pgd", "AdvBench_with_adv_attack.json")):
        if not (ctx.root / folder / name).exists():
            continue
        for index, entry, where in _json_list(ctx, f"{folder}/{name}"):
            item = f"{variant}-{entry.get('id', index) if entry else index}"
            if entry is None or not all(isinstance(entry.get(k), str) for k in ("question", "response")):
                yield bad_row("safetyreminder_responses", item, where, "malformed JSON entry: needs string question, response")
                continue
            question = entry["question"].strip()
            yield row("safetyreminder_responses", item, variant, question, "harmful", f"{where}; LLaVA-1.5-7B response",
                      reference=entry["response"], judge_label=RESPONSE_SAFE_LABELS.get(str(entry.get("safe")), "unknown"),
                      category=entry.get("category"), original_question=question, paper_subset=True)


def read_alpacaeval(ctx: SourceContext) -> Iterator[dict]:
    relpath = "AlpacaEval/results/text_davinci_003/model_outputs.json"
    ctx.require(relpath)
    for index, entry, where in _json_list(ctx, relpath):
        if entry is None or not isinstance(entry.get("instruction"), str):
            yield bad_row("alpacaeval", f"row{index}", where, "malformed JSON entry: needs string instruction")
            continue
        # Two upstream reference outputs are empty: they become "no reference", not an empty one.
        yield row("alpacaeval", f"row{index}", "text", entry["instruction"], "benign", f"{where}; reference by text-davinci-003",
                  reference=entry.get("output") or None, category=entry.get("dataset"))


READERS: dict[str, Callable[[SourceContext], Iterator[dict]]] = {
    "figstep": read_figstep,
    "mmsafetybench": read_mmsafetybench,
    "vlsafe": read_vlsafe,
    "mmvet": read_mmvet,
    "advbench": read_advbench,
    "jailbreakv": read_jailbreakv,
    "harmful_harmless": read_harmful_harmless,
    "safetyreminder_responses": read_safetyreminder_responses,
    "alpacaeval": read_alpacaeval,
}
