"""`sr-ray bench guard`: what a check costs, ours vs the official implementation, measured side by side.

Variants, all greedy on the same prompt (an image context of `image_tokens` tokens + a question):
- plain:    our decode loop with the guard off;
- guarded:  fused incremental checks every `interval` tokens, probe never flags;
- separate: the same checks as their own k-wide forward after the token forward (`separate_check=True`,
            bit-identical to plain decoding in every dtype; docs/core.md);
- blind:    the fused checks plus the image-blind twin (`GuardConfig.blind_threshold`, a robust option): the
            row decodes beside a text-only copy of itself, both checked in the same forward;
- official: the official check (SAPT.py:122-181): every interval, deepcopy the KV cache, then a no-cache
            full forward over prompt + image + answer + soft tokens, re-encoding the image;
- flagged:  a probe that flags at the first check, ours (in place) and the official re-prefill.
Runs are interleaved (plain, guarded, separate, blind, official, plain, ...) so machine drift hits all alike.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from transformers import DynamicCache

from sr_ray.models import VLM, Prompt, load_vlm
from sr_ray.reminder.engine import GuardedGenerator, SamplingConfig
from sr_ray.reminder.guard import PAPER_INTERVAL, GuardConfig
from sr_ray.reminder.probe import HarmProbe
from sr_ray.reminder.soft_prompt import SoftPrompt


@dataclass
class GuardBenchConfig:
    model: str = "smol-llava"
    new_tokens: int = 256
    interval: int = PAPER_INTERVAL
    image_tokens: int = 576  # LLaVA-1.5's image context
    repeats: int = 3
    dtype: str = "float32"
    prompt: str = "Describe this image in detail, then write a long story about it."


@torch.no_grad()
def official_style_generate(vlm: VLM, prompt: Prompt, soft: torch.Tensor, probe: HarmProbe, n: int, interval: int) -> list[int]:
    """Greedy decode with the official safety check: cache copy + no-cache full re-forward, image re-encoded."""
    batch = vlm.encode([prompt])
    cache = DynamicCache(config=vlm.text_config)
    e = vlm.embed(batch)
    logits = vlm.lm_head(vlm.hidden(e.embeds, e.attention_mask, e.position_ids, cache)[:, -1])
    answer: list[int] = []
    mask, pos = e.attention_mask, e.next_pos
    for count in range(n):
        if count % interval == interval - 1:
            copy.deepcopy(cache)  # the official deep-copies model_kwargs, KV cache included, then drops it
            ids = torch.cat([batch.input_ids, torch.tensor([answer], device=vlm.device)], 1)
            full = vlm.embed(type(batch)(ids, torch.ones_like(ids), batch.vision), suffix=soft)
            h = vlm.hidden(full.embeds, full.attention_mask, full.position_ids)[:, -1]
            probe.p_safe(h)
        token = int(logits[0].argmax())  # like the other variants, EOS does not end the run
        answer.append(token)
        mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
        h = vlm.hidden(vlm.embed_tokens(torch.tensor([[token]], device=vlm.device)), mask,
                       vlm.positions(pos[:, None]), cache)
        pos = pos + 1
        logits = vlm.lm_head(h[:, -1])
    return answer


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_guard_bench(cfg: GuardBenchConfig) -> dict:
    extra = dict(image_tokens=cfg.image_tokens) if cfg.model.startswith("smol-llava") else {}
    vlm = load_vlm(cfg.model, dtype=cfg.dtype, **extra)
    soft = SoftPrompt.from_text(vlm)
    never = HarmProbe(torch.zeros(vlm.hidden_size), 30.0, base_model_id=vlm.model_id)
    always = HarmProbe(torch.zeros(vlm.hidden_size), -30.0, base_model_id=vlm.model_id)
    image = Image.effect_noise((336, 336), 64).convert("RGB")
    prompt = Prompt(cfg.prompt, image)
    image_ctx = int((vlm.encode([prompt]).input_ids == vlm.model.config.image_token_id).sum())
    sampling = SamplingConfig(max_new_tokens=cfg.new_tokens, ignore_eos=True)  # every variant decodes the full budget
    guard = GuardConfig(interval=cfg.interval, check_at_end=False)  # same checks as the official loop
    guarded = GuardedGenerator(vlm, soft, never, guard)
    separate = GuardedGenerator(vlm, soft, never, guard, separate_check=True)
    blind = GuardedGenerator(vlm, soft, never, replace(guard, blind_threshold=0.0))  # twin read, never flags
    flagged_ours = GuardedGenerator(vlm, soft, always, GuardConfig(interval=cfg.interval, reminder_max_new_tokens=32))
    flagged_official = GuardedGenerator(vlm, soft, always, GuardConfig(
        interval=cfg.interval, mode="official", schedule="official", check_at_end=False, reminder_max_new_tokens=32))

    times = {"plain": [], "guarded": [], "separate": [], "blind": [], "official": []}
    tokens = {}
    for _ in range(cfg.repeats):
        t, out = _timed(lambda: guarded.generate([prompt], sampling, guard=False)[0])
        times["plain"].append(t)
        tokens["plain"] = out.prefix_ids
        t, out = _timed(lambda: guarded.generate([prompt], sampling)[0])
        times["guarded"].append(t)
        tokens["guarded"] = out.prefix_ids
        t, out = _timed(lambda: separate.generate([prompt], sampling)[0])
        times["separate"].append(t)
        tokens["separate"] = out.prefix_ids
        t, out = _timed(lambda: blind.generate([prompt], sampling)[0])
        times["blind"].append(t)
        tokens["blind"] = out.prefix_ids
        t, ids = _timed(lambda: official_style_generate(vlm, prompt, soft(vlm.dtype), never, cfg.new_tokens, cfg.interval))
        times["official"].append(t)
        tokens["official"] = ids
    ours_flag = flagged_ours.generate([prompt], sampling)[0]
    official_flag = flagged_official.generate([prompt], sampling)[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "plain_s": med["plain"],
        "guarded_s": med["guarded"],
        "official_s": med["official"],
        "separate_s": med["separate"],
        "ratio_guarded_plain": med["guarded"] / med["plain"],
        "ratio_separate_plain": med["separate"] / med["plain"],
        "separate_identical_to_plain": tokens["separate"] == tokens["plain"],
        "blind_s": med["blind"],
        "ratio_blind_plain": med["blind"] / med["plain"],
        "blind_identical_to_plain": tokens["blind"] == tokens["plain"],
        "ratio_official_guarded": med["official"] / med["guarded"],
        "extra_prefill_tokens_on_flag": ours_flag.extra_prefill_tokens,
        "official_extra_prefill_tokens_on_flag": official_flag.extra_prefill_tokens,
        "flag_position_ours": ours_flag.flagged_at,
        "flag_position_official": official_flag.flagged_at,
        "outputs_identical": tokens["plain"] == tokens["guarded"] == tokens["official"],
        "tokens_generated": len(tokens["plain"]),
        "image_context_tokens": image_ctx,
        "all_times_s": times,
        "settings": asdict(cfg) | {"device": str(vlm.device), "dtype": str(vlm.dtype),
                                    "torch_threads": torch.get_num_threads()},
    }


def format_table(r: dict) -> str:
    rows = [
        ("plain greedy (guard off)", f"{r['plain_s']:.2f} s", "1.00x"),
        ("guarded, fused checks", f"{r['guarded_s']:.2f} s", f"{r['ratio_guarded_plain']:.3f}x plain"),
        ("guarded, separate check forward", f"{r['separate_s']:.2f} s", f"{r['ratio_separate_plain']:.3f}x plain"),
        ("guarded + image-blind twin", f"{r['blind_s']:.2f} s", f"{r['ratio_blind_plain']:.3f}x plain"),
        ("official-style checks", f"{r['official_s']:.2f} s", f"{r['ratio_official_guarded']:.2f}x guarded"),
        ("extra prefill on flag (ours)", str(r["extra_prefill_tokens_on_flag"]), "tokens"),
        ("extra prefill on flag (official)", str(r["official_extra_prefill_tokens_on_flag"]), "tokens"),
    ]
    width = max(len(a) for a, _, _ in rows)
    lines = [f"{a:<{width}}  {b:>10}  {c}" for a, b, c in rows]
    lines.append(f"tokens={r['tokens_generated']} image_ctx={r['image_context_tokens']} "
                 f"identical_outputs={r['outputs_identical']}")
    return "\n".join(lines)


def save_result(result: dict, out: str | Path | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
