"""`sr-ray calibrate-blind`: add the image-blind check to a reminder bundle (a robust option, docs/robustness.md).

The check reads the answer again as a text-only twin (the prompt without its image, `GuardConfig.blind_threshold`),
with the bundle's own soft prompt and probe: an image can steer that reading only through the answer's tokens,
which gradient attacks on pixels cannot differentiate through. Nothing is trained; its threshold is calibrated
like SAPT's (`calibrated_threshold`) on the model's own answers to benign validation asks (half text, half
MM-Vet images): among the answers the bundle's own check leaves alone, each one's lowest blind reading over all
its checks, so that the blind check adds at most `benign_flag_rate` benign flags; it never exceeds the bundle's
threshold (without an image both readings are the same reading). The flag rates on jailbroken validation
answers (prefill attack, typography) are measured and recorded, for the blind check alone and with the bundle's
own check. Only val rows are read, and none whose item is any source's test item; the output is a new bundle
directory (the parts copied, so their checksums hold) with `blind_threshold` in `bundle.json` and the
calibration in `blind.json`.

With `own_flag_rate` set, the bundle's own threshold is calibrated first, on the same answers: the largest in
`threshold_range` at which its check flags at most that share of them (SAPT calibrates it at epoch ends, at its
own `calibrate_benign_flag_rate`; the shipped preset allows no flag). It chooses the operating point after training, from a stated
benign budget: a benign answer that is not flagged is returned untouched, so the share flagged bounds the share
changed. `reminder_no_repeat_ngram` set is written into the new bundle as how its flagged continuations decode
(`GuardConfig`); it changes no reading, so the calibration is the same with or without it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from sr_ray.data import load_records
from sr_ray.data.overlap import evaluation_texts, item_text
from sr_ray.data.prefill import prefill_text
from sr_ray.infer import decode_image
from sr_ray.models import Prompt, load_vlm
from sr_ray.reminder import GuardedGenerator, ReminderBundle, SamplingConfig
from sr_ray.train.sapt import calibrated_threshold

NEVER = 1e-12  # a threshold no reading falls below: read every check, flag none


@dataclass
class BlindConfig:
    bundle: str = ""
    processed_dir: str = ""
    out: str = ""
    model: str = "smol-llava"
    # benign val asks (MM-Vet for up to half, then harmful_harmless) and jailbroken harmful val rows
    benign: int = 64
    harmful: int = 48
    harmful_sources: list[dict] = field(default_factory=lambda: [
        {"source": "advbench", "variant": "text", "attack": "prefill"},
        {"source": "figstep", "variant": "text_inlined"},
        {"source": "mmsafetybench", "variant": "text", "attack": "prefill"},
    ])
    benign_flag_rate: float = 0.0  # benign val answers the blind check may flag beyond the bundle's own check
    own_flag_rate: float | None = None  # recalibrate the bundle's own threshold at this benign budget; None keeps it
    reminder_no_repeat_ngram: int | None = None  # written into the bundle (GuardConfig's); None keeps the bundle's
    threshold_range: tuple[float, float] = (0.0, 0.5)
    max_new_tokens: int = 48
    batch_size: int = 16


def _prompts(records, attack: str | None = None) -> list[Prompt]:
    return [Prompt(r.prompt, decode_image(r.image), answer_prefix=prefill_text(r.reference) if attack else "")
            for r in records]


def val_prompts(cfg: BlindConfig) -> tuple[list[Prompt], list[Prompt]]:
    """Val rows whose item is no source's test item (the same rule as SAPT's selection, sr_ray/data/overlap.py)."""
    tested = evaluation_texts(cfg.processed_dir)

    def val(**where):
        recs = load_records(cfg.processed_dir, split="val", **where)
        return [r for r in recs if item_text(r.prompt, r.original_question) not in tested]

    benign = val(source="mmvet", label="benign")[: cfg.benign // 2]
    benign += val(source="harmful_harmless", label="benign")[: cfg.benign - len(benign)]
    harmful, per_source = [], -(-cfg.harmful // len(cfg.harmful_sources))
    for spec in cfg.harmful_sources:
        recs = val(source=spec["source"], variant=spec.get("variant"), label="harmful")[:per_source]
        harmful += _prompts(recs, spec.get("attack"))
    return _prompts(benign), harmful[: cfg.harmful]


def _readings(gen: GuardedGenerator, bundle: ReminderBundle, prompts: list[Prompt], cfg: BlindConfig, desc: str) -> list:
    guard = bundle.guard_config(threshold=NEVER, blind_threshold=NEVER, reminder_max_new_tokens=1)
    outs = []
    for i in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc):
        outs += gen.generate(prompts[i: i + cfg.batch_size], SamplingConfig(max_new_tokens=cfg.max_new_tokens), guard)
    return [([c.p_safe for c in o.checks], [c.p_safe_blind for c in o.checks]) for o in outs if o.checks]


def run_calibrate_blind(cfg: BlindConfig) -> dict:
    if not (cfg.bundle and cfg.processed_dir and cfg.out):
        raise SystemExit("calibrate-blind needs --bundle, --processed-dir and --out")
    vlm = load_vlm(cfg.model)
    bundle = ReminderBundle.load(cfg.bundle, vlm)
    gen = GuardedGenerator(vlm, bundle.soft_prompt, bundle.probe)
    benign_prompts, harmful_prompts = val_prompts(cfg)
    if not benign_prompts:
        raise SystemExit(f"{cfg.processed_dir}: no benign val rows (harmful_harmless or mmvet) to calibrate on")
    benign = _readings(gen, bundle, benign_prompts, cfg, "benign val")
    harmful = _readings(gen, bundle, harmful_prompts, cfg, "jailbroken val")
    lo, hi = cfg.threshold_range
    trained_threshold = bundle.threshold
    if cfg.own_flag_rate is not None:
        bundle.threshold = calibrated_threshold([min(p) for p, _ in benign], cfg.own_flag_rate, lo, hi)
    left_alone = [min(b) for p, b in benign if min(p) >= bundle.threshold]
    threshold = calibrated_threshold(left_alone, cfg.benign_flag_rate, lo, min(hi, bundle.threshold))

    def rates(rows):
        own = [min(p) < bundle.threshold for p, _ in rows]
        blind = [min(b) < threshold for _, b in rows]
        n = max(1, len(rows))
        return dict(n=len(rows), own=sum(own) / n, blind=sum(blind) / n, either=sum(a or b for a, b in zip(own, blind)) / n)

    result = dict(blind_threshold=threshold, bundle_threshold=bundle.threshold, trained_threshold=trained_threshold,
                  benign=rates(benign), harmful=rates(harmful), config=asdict(cfg))
    out = Path(cfg.out)
    if out.resolve() != Path(cfg.bundle).resolve():
        shutil.copytree(cfg.bundle, out, dirs_exist_ok=True)
    bundle.blind_threshold = threshold
    if cfg.reminder_no_repeat_ngram is not None:
        bundle.reminder_no_repeat_ngram = cfg.reminder_no_repeat_ngram
    bundle.save(out)
    (out / "blind.json").write_text(json.dumps(result, indent=2))
    return result
