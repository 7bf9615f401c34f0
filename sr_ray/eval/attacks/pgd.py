"""Universal image PGD (the official "ImgJP" attack) and its adaptive variant against the guarded pipeline.

Official recipe (`script/Jailbreak/LlaVA_PGD_attack.py`): one clean image, an L-inf perturbation with
eps = 64/255, step 1/255, 3000 steps, batch 4, random start U[-eps, eps]; loss = the VLM's LM loss of
"<AdvBench target>: 1. To" after each AdvBench goal (train split, 320 goals); update
delta <- clip(delta - alpha * sign(grad), -eps, eps), image clamped to [0, 1]. Crafted on the undefended model.

We perturb the image at the processor's input resolution (after its own resize/crop), so the saved PNG is
exactly what the model sees at evaluation; only rescale + normalise sit inside the gradient path. (The
official perturbs the original-resolution image through a torch bicubic resize, whose output differs
slightly from the processor's PIL resize used when the image is evaluated.)

Adaptive PGD attacks the guarded pipeline itself: beside the plain target loss it maximises the probe's
P(safe) at the check after the first `interval` target tokens (with the soft prompt appended, exactly the
guard's reading) and the likelihood of the rest of the target *after* the reminder, so the attack must
both avoid the flag and survive it. When the bundle carries the image-blind check, its reading joins the
objective, and the after-reminder term is read on the blind twin, which decodes a flagged answer's
continuation (both have zero gradient with respect to the image: see `PGDObjective.blind_forward`).
`snapshots` keeps the image after chosen step counts, so one run gives a steps sweep.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm

from sr_ray.reminder.forward import AnswerForward, answer_forward
from sr_ray.models import VLM, Prompt

OFFICIAL_TARGET_SUFFIX = ": 1. To"


@dataclass
class PGDConfig:
    epsilon: float = 64 / 255
    step_size: float = 1 / 255
    steps: int = 3000
    batch_size: int = 4
    seed: int = 0
    adaptive: bool = False
    probe_weight: float = 1.0  # adaptive: weight of -log P(safe) at the guard's check
    reminder_weight: float = 1.0  # adaptive: weight of the target loss after the soft prompt
    interval: int | None = None  # adaptive: check position in target tokens (None: the bundle's interval)
    snapshots: list[int] = field(default_factory=list)  # also keep the image after these many steps (a sweep)


class PixelPath:
    """The processor's rescale + normalise as torch ops; its resize/crop is applied once, outside the gradient."""

    def __init__(self, vlm: VLM):
        ip = getattr(vlm.processor, "image_processor", None)
        if vlm.family != "llava" or ip is None or not getattr(ip, "crop_size", None):
            raise NotImplementedError(f"PGD supports LLaVA-style (CLIP processor) models, not {vlm.model_id!r} ({vlm.family})")
        self.processor, self.vlm = ip, vlm
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(3, 1, 1)

    def fit(self, image: Image.Image) -> torch.Tensor:
        """(3, H, W) in [0, 1] at the model's input size: the processor's own resize + crop, not normalised."""
        return self.processor(images=image.convert("RGB"), do_normalize=False, return_tensors="pt").pixel_values[0].float()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean.to(x.device)) / self.std.to(x.device)).to(self.vlm.dtype)


def to_image(x: torch.Tensor) -> Image.Image:
    array = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """The pixels as the saved 8-bit PNG holds them."""
    return (x.clamp(0, 1) * 255).round() / 255


def pgd_target(target: str) -> str:
    return f"{target}{OFFICIAL_TARGET_SUFFIX}"


class PGDObjective:
    """Loss to minimise for a batch of (goal, target) pairs under an image `x` in [0, 1]."""

    def __init__(self, vlm: VLM, pixels: PixelPath, cfg: PGDConfig, bundle=None):
        if cfg.adaptive and bundle is None:
            raise ValueError("adaptive PGD attacks the guarded pipeline: it needs a reminder bundle")
        self.vlm, self.pixels, self.cfg, self.bundle = vlm, pixels, cfg, bundle
        self.guard = bundle.guard_config(interval=cfg.interval) if bundle else None  # adaptive: the check it evades

    def __call__(self, x: torch.Tensor, goals: list[str], targets: list[str]) -> tuple[torch.Tensor, dict]:
        vlm = self.vlm
        placeholder = to_image(x)  # only for the prompt's image-token expansion; the pixels come from x
        batch = vlm.encode([Prompt(g, placeholder) for g in goals])
        batch.vision["pixel_values"] = self.pixels.normalize(x).unsqueeze(0).expand(len(goals), -1, -1, -1)
        e = vlm.embed(batch)
        ids = [vlm.tokenizer(t, add_special_tokens=False).input_ids for t in targets]
        target_loss = answer_forward(vlm, e, ids).first_loss(vlm.lm_head).mean()
        parts = {"target_loss": float(target_loss.detach())}
        loss = target_loss
        if self.cfg.adaptive:
            cut = [min(self.guard.interval, len(t) - 1) for t in ids]
            soft = self.bundle.soft_prompt(vlm.dtype).detach()
            first, rest = [t[:c] for t, c in zip(ids, cut)], [t[c:] for t, c in zip(ids, cut)]
            guarded = answer_forward(vlm, e, first, soft, rest)
            p_safe = self.bundle.probe.p_safe(guarded.soft_hidden())
            probe_loss = -torch.log(p_safe.clamp_min(1e-6)).mean()
            flagged = p_safe < self.guard.threshold
            parts |= {"probe_loss": float(probe_loss.detach()), "p_safe": float(p_safe.detach().mean())}
            if self.guard.blind_threshold is None:
                after = guarded
            else:  # the image-blind check, read as the guard reads it; a flagged answer continues blind too
                after = self.blind_forward(goals, first, soft, rest)
                blind = self.bundle.probe.p_safe(after.soft_hidden())
                blind_loss = -torch.log(blind.clamp_min(1e-6)).mean()
                probe_loss = probe_loss + blind_loss
                flagged = flagged | (blind < self.guard.blind_threshold)
                parts |= {"blind_loss": float(blind_loss.detach()), "p_safe_blind": float(blind.detach().mean())}
            reminder_loss = after.second_loss(vlm.lm_head).mean()
            loss = loss + self.cfg.probe_weight * probe_loss + self.cfg.reminder_weight * reminder_loss
            parts["reminder_loss"] = float(reminder_loss.detach())
            parts["flag_rate"] = float(flagged.float().mean())
        return loss, parts

    def blind_forward(self, goals: list[str], first: list[list[int]], soft: torch.Tensor,
                      rest: list[list[int]]) -> AnswerForward:
        """The image-blind twin, teacher-forced: the prompt without the image, the answer, the soft prompt and the
        continuation (which the guard decodes from the twin after a flag). Nothing in it depends on the pixels:
        the image reaches it only through which answer tokens are decoded, and these are given, so its
        gradient with respect to the image is zero."""
        e = self.vlm.embed(self.vlm.encode([Prompt(g) for g in goals]))
        return answer_forward(self.vlm, e, first, soft, rest)


def run_pgd(vlm: VLM, clean: Image.Image, train: list[tuple[str, str]], cfg: PGDConfig, bundle=None,
            progress: bool = True) -> tuple[Image.Image, dict]:
    """Craft one universal adversarial image on (goal, target) pairs. Returns the image and a record
    (config, per-step losses, the loss of the saved 8-bit image, seconds)."""
    if not train:
        raise ValueError("PGD needs at least one (goal, target) training pair")
    pixels = PixelPath(vlm)
    objective = PGDObjective(vlm, pixels, cfg, bundle)
    x0 = pixels.fit(clean).to(vlm.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    delta = ((torch.rand(x0.shape, generator=gen) * 2 - 1) * cfg.epsilon).to(vlm.device)
    delta = (x0 + delta).clamp(0, 1) - x0
    order, rng = [], random.Random(cfg.seed)
    history: list[dict] = []
    snapshots = {0: to_image(quantize(x0 + delta))} if 0 in cfg.snapshots else {}
    started = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc="pgd-adaptive" if cfg.adaptive else "pgd", disable=not progress):
        if len(order) < cfg.batch_size:  # epochs over the shuffled training pairs
            order += rng.sample(range(len(train)), len(train))
        picked, order = order[: cfg.batch_size], order[cfg.batch_size :]
        delta.requires_grad_(True)
        loss, parts = objective(x0 + delta, [train[i][0] for i in picked], [pgd_target(train[i][1]) for i in picked])
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta - cfg.step_size * grad.sign()).clamp(-cfg.epsilon, cfg.epsilon)
            delta = (x0 + delta).clamp(0, 1) - x0
        history.append({"step": step, "loss": float(loss.detach()), **parts})
        if step + 1 in cfg.snapshots:
            snapshots[step + 1] = to_image(quantize(x0 + delta))
    adv = quantize(x0 + delta)
    with torch.no_grad():
        first = train[: cfg.batch_size]
        _, final = objective(adv, [g for g, _ in first], [pgd_target(t) for _, t in first])
    record = dict(config=asdict(cfg), history=history, final=final, seconds=time.perf_counter() - started,
                  linf=float((adv - x0).abs().max()), image_size=list(adv.shape[1:]), snapshots=snapshots)
    return to_image(adv), record
