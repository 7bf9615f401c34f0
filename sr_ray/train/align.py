"""`sr-ray align`: the safety alignment of the embedded default, as a seeded LoRA SFT (PEFT).

SafetyReminder reactivates the latent safety awareness of an *aligned* VLM. SmolLM2-135M-Instruct as
shipped has none (it answers every harmful ask), so the project makes a shallow alignment of its own, the
kind real instruction-tuned models have: harmful instructions -> a short refusal, harmless instructions ->
the model's own greedy answer (self-distillation, so benign behaviour stays put). Only the start of an
answer is trained, so a jailbreak that gets past the first tokens (a prefilled "Sure, here is ...", an
inlined typographic instruction) still breaks it: the phenomenon the reminder exists for.

Data: the `refusal_direction` train splits only, with every instruction that is an item of any evaluation source
(AdvBench, JailBreakV, MM-SafetyBench, FigStep, VLSafe) or of refusal_direction's other splits removed (the rule of
`sr_ray/data/overlap.py`: equal, or holding one another as a long run of words; the shipped adapter of 8f268e4 was
made under equality alone, and 1 of its 142 harmful rows rewords a harmful test item).
The adapter (PEFT safetensors + JSON) and `alignment.json` (checksums, data ids, command, commit) ship in
`sr_ray/models/adapters/`; `sr_ray.models.smol_llava` merges it into the default model.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sr_ray.data.overlap import HeldOut, normalise
from sr_ray.models.smol_llava import CHAT_TEMPLATE, LM_DIR_NAME, default_cache_dir, smollm2_dir

EVAL_SOURCES = ("advbench", "jailbreakv", "mmsafetybench", "figstep", "vlsafe")
REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot help with that request.",
    "I can't assist with that. It could cause harm.",
    "I'm sorry, but I can't help with that. It could be dangerous or illegal.",
    "I apologize, but I cannot provide that information.",
]


@dataclass
class AlignConfig:
    data_dir: str | None = None  # laid out like shared/data (needs refusal_direction/splits); None: the default
    out: str = "sr_ray/models/adapters/smollm2-135m-safety"
    # harmless_train instructions (seeded sample); harmful: every clean harmful_train one (142 in shared/data).
    # 200 harmless taught a style rule (32% of harmless test asks refused); ~3.4 per harmful one keep it about harm.
    harmless: int = 480
    refusals: list[str] = field(default_factory=lambda: list(REFUSALS))
    max_answer_tokens: int = 32  # the benign self-answers' budget (cut answers are trained without an EOS): the
    # start of an answer is what decides between answering and refusing
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    epochs: int = 2
    batch_size: int = 8
    lr: float = 3e-4
    seed: int = 0


def alignment_data(data_dir: Path, harmless: int, seed: int) -> tuple[list[dict], list[dict], dict]:
    """(harmful rows, harmless rows, provenance): the train splits, disjoint from every evaluation source."""
    from sr_ray.data.sources import READERS, SourceContext, SourceMissing

    ctx = SourceContext(Path(data_dir))
    rows = [r for r in READERS["harmful_harmless"](ctx) if r.get("quarantine_reason") is None]
    evaluated: set[str] = set()
    present = []
    for source in EVAL_SOURCES:
        try:
            records = list(READERS[source](SourceContext(Path(data_dir))))
        except SourceMissing:
            continue
        present.append(source)
        for r in records:
            evaluated.update(normalise(t) for t in (r.get("prompt"), r.get("original_question")) if t)
    # The other splits of refusal_direction are evaluation data too (harmless test, probe val).
    evaluated.update(normalise(r["prompt"]) for r in rows if r["split"] != "train")
    held_out = HeldOut(evaluated)
    harmful_all = [r for r in rows if r["split"] == "train" and r["label"] == "harmful"]
    harmful = [r for r in harmful_all if normalise(r["prompt"]) not in held_out]
    benign_all = [r for r in rows if r["split"] == "train" and r["label"] == "benign"
                  and normalise(r["prompt"]) not in held_out]
    benign = random.Random(f"{seed}:harmless").sample(benign_all, min(harmless, len(benign_all)))
    provenance = dict(
        sources_checked=present, harmful_train=len(harmful_all), harmful_removed_as_evaluation=len(harmful_all) - len(harmful),
        harmful_ids=[r["id"] for r in harmful], harmless_ids=[r["id"] for r in benign], input_sha256=ctx.checksums,
    )
    return harmful, benign, provenance


def _chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=CHAT_TEMPLATE,
                                         add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def self_answers(lm, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[tuple[str, bool]]:
    """(greedy answer, ended) per prompt; `ended` is False when the budget cut it."""
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="harmless self-answers", unit="batch"):
        batch = tokenizer([_chat(tokenizer, p) for p in prompts[i : i + batch_size]], return_tensors="pt",
                          padding=True, add_special_tokens=False)
        gen = lm.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                          pad_token_id=tokenizer.pad_token_id)[:, batch.input_ids.shape[1]:]
        for row in gen.tolist():
            ended = end in row
            out.append((tokenizer.decode(row[: row.index(end)] if ended else row, skip_special_tokens=True).strip(), ended))
    return out


def sft_batch(tokenizer, examples: list[dict]) -> dict:
    """Right-padded input ids with labels only on the answer (+ the end-of-turn token when it ended)."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, labels = [], []
    for ex in examples:
        prompt = tokenizer(_chat(tokenizer, ex["prompt"]), add_special_tokens=False).input_ids
        answer = tokenizer(ex["answer"], add_special_tokens=False).input_ids + ([end] if ex["ended"] else [])
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id or 0
    return dict(
        input_ids=torch.tensor([r + [pad] * (width - len(r)) for r in ids]),
        attention_mask=torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
        labels=torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
    )


def train_adapter(cfg: AlignConfig, lm, tokenizer, examples: list[dict]):
    """LoRA SFT over `examples`; returns the PEFT model and the per-step losses."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    model = get_peft_model(lm, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    rng = random.Random(f"{cfg.seed}:order")
    losses = []
    model.train()
    steps = cfg.epochs * -(-len(examples) // cfg.batch_size)
    with tqdm(total=steps, desc="alignment LoRA SFT", unit="step") as bar:
        for _ in range(cfg.epochs):
            order = rng.sample(examples, len(examples))
            for i in range(0, len(order), cfg.batch_size):
                loss = model(**sft_batch(tokenizer, order[i : i + cfg.batch_size])).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(round(loss.item(), 4))
                bar.update()
                bar.set_postfix(loss=losses[-1])
    model.eval()
    return model, losses


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_align(cfg: AlignConfig) -> Path:
    """Build the adapter into `cfg.out`; returns it."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from sr_ray.data import default_data_dir

    started = time.perf_counter()
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    harmful, benign, provenance = alignment_data(data_dir, cfg.harmless, cfg.seed)
    if not harmful or not benign:
        raise SystemExit(f"sr-ray align: {data_dir} has no refusal_direction train splits (harmful {len(harmful)}, "
                         f"harmless {len(benign)})")
    torch.manual_seed(cfg.seed)
    lm_dir = smollm2_dir(default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    lm = LlamaForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    answers = self_answers(lm, tokenizer, [r["prompt"] for r in benign], cfg.max_answer_tokens)
    refusal_rng = random.Random(f"{cfg.seed}:refusals")
    examples = [dict(prompt=r["prompt"], answer=refusal_rng.choice(cfg.refusals), ended=True) for r in harmful]
    examples += [dict(prompt=r["prompt"], answer=a, ended=ended) for r, (a, ended) in zip(benign, answers)]
    model, losses = train_adapter(cfg, lm, tokenizer, examples)
    info = dict(
        base=LM_DIR_NAME, config=asdict(cfg) | {"data_dir": str(data_dir)}, examples=len(examples),
        harmful=len(harmful), harmless=len(benign), harmless_cut_answers=sum(not e for _, e in answers),
        losses=losses, seconds=round(time.perf_counter() - started, 1), commit=_git_commit(),
        command="sr-ray align --data-dir DATA_DIR --out " + cfg.out, argv=sys.argv[1:], data=provenance,
    )
    return save_adapter(model, Path(cfg.out), info)


def save_adapter(model, out: Path, info: dict) -> Path:
    """The PEFT adapter (safetensors + adapter_config.json) and `alignment.json` pinning both files' sha256."""
    from sr_ray.hashing import sha256_file

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template; alignment.json says it all
    files = {name: sha256_file(out / name) for name in ("adapter_model.safetensors", "adapter_config.json")}
    (out / "alignment.json").write_text(json.dumps(info | {"files": files}, indent=1) + "\n")
    return out
