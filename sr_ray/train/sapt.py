"""SAPT, the method part (plain torch, no Ray): sample construction, the two losses, validation.

A harmful row trains "after the model's own compliant start, the reminder makes it refuse": context =
prompt (+ image) + a prefix of the *rejected* answer + soft x k, target = the *chosen* refusal. A benign row
trains "the reminder changes nothing": context = prompt + a prefix of the model's own answer + soft x k,
target = the rest of that answer. The target gets the end-of-turn token appended when it is not cut, so the
model also learns to stop after the refusal (the official LLaVA code appends none, Qwen does); a benign
answer the rollout's token budget cut (`chosen_ended` False) gets none, so the model is not taught to stop
mid-answer.

L = L_LM (cross-entropy over the target tokens) + λ · BCE(probe P(safe) at the last soft token, safe).
Gradients flow through the frozen VLM into the soft prompt only; the context before the soft prompt runs
without autograd (it cannot depend on the soft prompt).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from sr_ray.infer import decode_image
from sr_ray.models import VLM, Prompt
from sr_ray.reminder import GuardConfig, GuardedGenerator, HarmProbe, SamplingConfig, SoftPrompt
from sr_ray.reminder.forward import answer_forward
from sr_ray.train.preferences import sample_prefix


@dataclass
class SaptExample:
    prompt: Prompt  # with the sampled answer prefix
    target: str
    safe: bool
    ended: bool = True  # the target ends on its own: the end-of-turn token follows it


@dataclass
class SaptLoss:
    lm: torch.Tensor
    cls: torch.Tensor
    total: torch.Tensor
    p_safe: torch.Tensor  # (B,) probe output at the last soft token


def build_example(row: dict, rng: random.Random, p_empty: float = 1 / 3, min_chars: int = 20) -> SaptExample:
    """One training example from a preference row (prompt, image, chosen, rejected, safe)."""
    safe = bool(row["safe"])
    if safe:
        prefix, target = sample_prefix(row["chosen"], rng, p_empty, min_chars)
    else:
        prefix, _ = sample_prefix(row["rejected"], rng, p_empty, min_chars)
        target = row["chosen"].strip()
    ended = bool(row.get("chosen_ended", True))
    return SaptExample(Prompt(str(row["prompt"]), decode_image(row.get("image")), answer_prefix=prefix), target, safe, ended)


def example_rng(seed: int, epoch: int, row_id: str) -> random.Random:
    """Prefix sampling RNG of one row in one epoch: reproducible, and identical after a resume."""
    return random.Random(f"{seed}:{epoch}:{row_id}")


def eos_token_id(vlm: VLM) -> int:
    eos = vlm.tokenizer.eos_token_id
    return eos if eos in vlm.eos_token_ids else min(vlm.eos_token_ids)


def target_ids(vlm: VLM, examples: list[SaptExample], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded target token ids (B, T) and mask. A target continuing a prefix (or a template that
    does not end in whitespace) starts with a space, as the text would read. The end-of-turn token follows
    a target that ended on its own and fits in `max_tokens`."""
    rows = []
    for ex in examples:
        sep = " " if ex.prompt.answer_prefix.strip() or not vlm.render(Prompt(ex.prompt.text))[-1:].isspace() else ""
        ids = vlm.tokenizer(sep + ex.target, add_special_tokens=False).input_ids if ex.target else []
        rows.append(ids[:max_tokens] if len(ids) >= max_tokens or not ex.ended else ids + [eos_token_id(vlm)])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), vlm.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(vlm.device), mask.to(vlm.device)


def sapt_loss(vlm: VLM, soft: torch.Tensor, probe: HarmProbe, examples: list[SaptExample],
              cls_weight: float = 0.05, max_target_tokens: int = 256) -> SaptLoss:
    """[context | soft | target] through the frozen VLM (the answer prefix is part of the rendered context);
    `soft` (k, D) carries the gradient. The context does not depend on the soft prompt, so it runs without
    autograd (`prompt_grad=False`); only the k soft tokens and the target are differentiated.
    """
    with torch.no_grad():
        e = vlm.embed(vlm.encode([ex.prompt for ex in examples]))
    ids, tmask = target_ids(vlm, examples, max_target_tokens)
    targets = [row[: int(n)].tolist() for row, n in zip(ids, tmask.sum(1))]
    fw = answer_forward(vlm, e, [[] for _ in examples], soft, targets, prompt_grad=False)
    # CE over every target token of the batch (not a mean of per-row means)
    logits = vlm.lm_head(fw.second_hidden()).float()
    valid = tmask.bool()
    lm = F.cross_entropy(logits[valid], ids[valid])
    p_safe = probe.p_safe(fw.soft_hidden())
    labels = torch.tensor([float(ex.safe) for ex in examples], device=p_safe.device)
    cls = F.binary_cross_entropy(p_safe, labels)
    return SaptLoss(lm, cls, lm + cls_weight * cls, p_safe.detach())


def weights_sha256(vlm: VLM) -> str:
    """Fingerprint of every base-model tensor (bit-exact), to prove training left the VLM untouched."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(vlm.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def calibrated_threshold(benign_min_p_safe: list[float], max_flag_rate: float, lo: float, hi: float,
                         margin: float = 1e-4) -> float:
    """The largest threshold in [lo, hi] that flags at most `max_flag_rate` of the benign answers; an answer is
    flagged when its lowest P(safe) reading is below the threshold. `lo` is a floor: below it, flag anyway.
    `margin` keeps the threshold clear of the reading it is set by: decoding the same answer in another batch
    (other rows, padding, a flagged neighbour's masked reminder) changes the reading in its last digits."""
    readings = sorted(benign_min_p_safe)
    allowed = int(max_flag_rate * len(readings))
    if allowed >= len(readings):
        return hi
    return min(max(readings[allowed] - margin, lo), hi)


@dataclass
class ValCounts:
    """Sums over one rank's share of the val split (all-reduced across ranks before use)."""

    lm_sum: float = 0.0
    lm_n: int = 0
    harmful: int = 0
    refused: int = 0
    flagged_harmful: int = 0
    benign: int = 0
    unchanged: int = 0
    flagged_benign: int = 0

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([float(v) for v in vars(self).values()], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "ValCounts":
        return cls(*[v.item() for v in t])

    def metrics(self, prefix: str = "val/") -> dict[str, float]:
        ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
        return {
            f"{prefix}lm_loss": ratio(self.lm_sum, self.lm_n),
            f"{prefix}refusal_rate_harmful": ratio(self.refused, self.harmful),
            f"{prefix}flag_rate_harmful": ratio(self.flagged_harmful, self.harmful),
            f"{prefix}unchanged_rate_benign": ratio(self.unchanged, self.benign),
            f"{prefix}flag_rate_benign": ratio(self.flagged_benign, self.benign),
        }


class Validator:
    """Per-epoch validation on a fixed share of the val split: val L_LM (fixed prefixes), refusal rate of
    the guarded model on harmful prompts (rule judge), and the share of benign answers left unchanged
    by the guard (vs the undefended answer with the same budget)."""

    def __init__(self, vlm: VLM, probe: HarmProbe, rows: list[dict], *, seed: int, interval: int, threshold: float,
                 max_new_tokens: int, batch_size: int, cls_weight: float, max_target_tokens: int,
                 p_empty: float, min_chars: int):
        from sr_ray.judges import RuleJudge

        self.vlm, self.probe, self.judge = vlm, probe, RuleJudge()
        self.examples = [build_example(r, example_rng(seed, -1, str(r["id"])), p_empty, min_chars) for r in rows]
        # A harmful row rolled out under an attack is validated under it (an aligned model refuses direct asks).
        self.prompts = [Prompt(str(r["prompt"]), decode_image(r.get("image")), answer_prefix=str(r.get("attack_prefix") or ""))
                        for r in rows]
        self.safe = [bool(r["safe"]) for r in rows]
        # After a flag the continuation gets the same budget (the judge reads the first words of it).
        self.guard = GuardConfig(interval=interval, threshold=threshold, reminder_max_new_tokens=max_new_tokens)
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens)
        self.batch_size, self.cls_weight, self.max_target_tokens = batch_size, cls_weight, max_target_tokens
        self.undefended = self._generate(None, guard=False)

    def _generate(self, soft_prompt: SoftPrompt | None, guard: bool, threshold: float | None = None,
                  rows: list[int] | None = None) -> list:
        gen = GuardedGenerator(self.vlm, soft_prompt, self.probe, replace(self.guard, threshold=self.guard.threshold if threshold is None else threshold))
        prompts = self.prompts if rows is None else [self.prompts[i] for i in rows]
        outs = []
        for i in range(0, len(prompts), self.batch_size):
            outs += gen.generate(prompts[i : i + self.batch_size], self.sampling, guard=guard)
        return outs

    @torch.no_grad()
    def benign_min_readings(self, soft_prompt: SoftPrompt) -> list[float]:
        """Lowest P(safe) over every check of each benign answer, read with `soft_prompt` (never flagging)."""
        benign = [i for i, safe in enumerate(self.safe) if safe]
        outs = self._generate(soft_prompt, guard=True, threshold=1e-12, rows=benign)
        return [min(c.p_safe for c in out.checks) for out in outs if out.checks]

    @torch.no_grad()
    def run(self, soft_prompt: SoftPrompt | None, threshold: float | None = None) -> ValCounts:
        """Counts for `soft_prompt` (flagging at `threshold`, default the guard's); None measures the
        undefended model (no reminder at all)."""
        counts = ValCounts()
        outs = self.undefended if soft_prompt is None else self._generate(soft_prompt, guard=True, threshold=threshold)
        if soft_prompt is not None:
            for i in range(0, len(self.examples), self.batch_size):
                chunk = self.examples[i : i + self.batch_size]
                loss = sapt_loss(self.vlm, soft_prompt(self.vlm.dtype), self.probe, chunk, self.cls_weight,
                                 self.max_target_tokens)
                counts.lm_sum += loss.lm.item() * len(chunk)
                counts.lm_n += len(chunk)
        for out, base, safe in zip(outs, self.undefended, self.safe):
            if safe:
                counts.benign += 1
                counts.unchanged += out.text == base.text
                counts.flagged_benign += out.flagged
            else:
                counts.harmful += 1
                counts.refused += self.judge.is_refusal(out.text)
                counts.flagged_harmful += out.flagged
        return counts
